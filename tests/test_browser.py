"""End to end in a real browser: `streamlit run app.py`, driven by headless Chromium (issue 4).

The bundled SmolLM2 goes through load -> importance -> allocation -> compress -> side by side with
small settings (4 calibration windows of 128 tokens, "paper" whitening, 512 evaluation tokens, 16
new tokens). Statistics and factors come from the disk cache after the first run; a cold first run
factors all 210 matrices (about a minute on an idle 2-core CPU, several under load).
Screenshots go to tests/artifacts/. Debian's chromium is required: without it this test FAILS.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-quic"]
SLOW = 300_000  # ms for a step that computes (statistics, factoring, evaluation) on a cold cache


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def wait_for_server(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"streamlit exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"streamlit did not answer on {url} within {timeout} s")


@pytest.fixture
def server(tmp_path):
    port = free_port()
    env = dict(os.environ, DIPSVD_STUDIO_CALIB_WINDOWS="4", DIPSVD_STUDIO_SEQLEN="128",
               DIPSVD_STUDIO_EVAL="wiki", DIPSVD_STUDIO_EVAL_TOKENS="512", DIPSVD_STUDIO_NEW_TOKENS="16",
               # One intra-op thread: on a CPU shared with other jobs, torch's two OpenMP threads per process
               # oversubscribe the cores (an eigendecomposition ran 10x slower that way here).
               OMP_NUM_THREADS="1")
    env.pop("DIPSVD_STUDIO_DEFAULT_MODEL", None)  # the bundled SmolLM2
    log = open(tmp_path / "streamlit.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
                             "--server.address", "localhost"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://localhost:{port}"
    try:
        wait_for_server(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.copy(tmp_path / "streamlit.log", ARTIFACTS / "streamlit.log") if ARTIFACTS.exists() else None


@pytest.mark.slow
def test_studio_in_a_real_browser(server):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} not found: this test needs Debian's chromium. Install it with "
                    "`apt-get update && apt-get install -y chromium` (.ci/run does this before make test)")
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})

        def shot(name: str) -> None:
            page.wait_for_timeout(1500)  # let plotly finish drawing
            page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

        def go(title: str) -> None:
            page.get_by_test_id("stSidebarNav").get_by_text(title, exact=True).click()
            expect(page.get_by_role("heading", name=title, exact=True)).to_be_visible(timeout=30_000)

        def no_errors() -> None:
            errors = page.get_by_test_id("stAlertContentError").all_inner_texts()
            assert not errors, errors

        try:
            page.goto(server)
            expect(page.get_by_role("heading", name="Model and data", exact=True)).to_be_visible(timeout=60_000)
            shot("1-model-data")
            page.get_by_role("button", name="Load model and collect statistics").click()
            expect(page.get_by_text("Decoder blocks")).to_be_visible(timeout=SLOW)
            expect(page.get_by_text("dequantized from a quantized GGUF")).to_be_visible()
            no_errors()
            shot("2-model-loaded")

            go("Importance")
            expect(page.locator(".js-plotly-plot").first).to_be_visible(timeout=60_000)
            no_errors()
            shot("3-importance")

            go("Allocation")
            # The paper's D G D form: an eigendecomposition per input group, cheaper than the code form's SVD.
            page.get_by_role("radio", name="paper").check(force=True)
            expect(page.get_by_text("paper whitening")).to_be_visible(timeout=30_000)
            page.get_by_role("button", name="Factor matrices").click()
            expect(page.get_by_text("the energy of the dropped singular values")).to_be_visible(timeout=SLOW)
            expect(page.get_by_text("ratio 0.1 removed, 90% kept").first).to_be_visible()
            no_errors()
            shot("4-allocation")

            go("Compress and evaluate")
            page.get_by_role("button", name="Build compressed model").click()
            expect(page.get_by_text("Realized ratio (targeted)")).to_be_visible(timeout=SLOW)
            page.get_by_role("button", name="Evaluate original and compressed").click()
            table = page.get_by_test_id("stTable")
            expect(table).to_contain_text("wiki", timeout=SLOW)
            expect(table).to_contain_text("compressed / original")
            cells = table.locator("tbody tr").first.locator("td").all_inner_texts()
            assert cells[0] == "wiki" and float(cells[1]) > 1 and float(cells[2]) > 1, cells
            no_errors()
            shot("5-compress-evaluate")

            go("Side by side")
            page.get_by_role("button", name="Generate").click()
            expect(page.get_by_text("tok/s")).to_have_count(2, timeout=SLOW)  # one prompt, two columns
            expect(page.get_by_text("Original", exact=True)).to_be_visible()
            expect(page.get_by_text("Compressed · ratio 0.1 removed, 90% kept", exact=True)).to_be_visible()
            no_errors()
            shot("6-side-by-side")
        except Exception:
            shot("failure")
            raise
        finally:
            browser.close()
