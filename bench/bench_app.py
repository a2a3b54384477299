"""Benchmark of the Studio app (issue 4): start-up, load and statistics, and the re-allocation latency.

    python bench/bench_app.py [--write]      (make bench-app runs it with --write)

1. `make run` (warm install: the venv exists) until the first page has rendered its title in
   headless Chromium, and until the server's health endpoint first answers.
2. Model load (bundled SmolLM2, dequantized copy cached) and statistics collected without the
   disk cache, at the app's default calibration size (16 windows x 256 tokens).
3. The work behind a slider: Workbench.allocate + predicted_loss for a change of ratio or beta,
   on factors already in memory, for each allocation (the coupled and nested probes run in the warm-up call); then the same through AppTest (a full page
   rerun of the Allocation page) after a ratio change.
--write replaces the "## Studio app (issue 4)" section of bench/RESULTS.md (re-read just before).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

from common import RESULTS, ROOT, load_bundled, machine, repeat_times, replace_section, workbench

SECTION = "## Studio app (issue 4)"
CALIB = {"calib": "wiki", "calib_windows": 4, "seqlen": 128, "seed": 0}  # as in tests/app/test_browser.py


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def startup(root: Path = ROOT, env: dict | None = None, timeout: float = 120) -> dict:
    """`make run` in `root` until the health endpoint answers and until Chromium shows the first page."""
    from playwright.sync_api import expect, sync_playwright

    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen(["make", "run", f"PORT={port}"], cwd=root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        health = None
        while health is None:
            try:
                urllib.request.urlopen(f"http://localhost:{port}/_stcore/health", timeout=1)
                health = time.perf_counter() - t0
            except OSError:
                if time.perf_counter() - t0 > timeout:
                    raise RuntimeError(f"make run did not serve within {timeout:.0f} s")
                time.sleep(0.05)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                              "--disable-component-update", "--disable-sync", "--disable-quic"])
            page = browser.new_page()
            page.goto(f"http://localhost:{port}")
            expect(page.get_by_role("heading", name="Model and data", exact=True)).to_be_visible(timeout=60_000)
            title = time.perf_counter() - t0
            browser.close()
    finally:
        os.killpg(proc.pid, 15)  # make and the streamlit it started
        proc.wait(15)
    return {"health_s": health, "title_rendered_s": title}


def timed(fn, repeats: int = 5) -> float:
    """Median seconds of fn() over `repeats` calls (after one warm-up call)."""
    return statistics.median(repeat_times(fn, repeats))


def core() -> dict:
    from dipsvd_core.engine.stats import stream_stats
    from dipsvd_core.lowrank.scalings import ChannelOptions
    from dipsvd_core.run.pipeline import Settings

    out = {}
    t0 = time.perf_counter()
    lm = load_bundled("cpu", "float32")
    out["load_model_s"] = time.perf_counter() - t0
    from dipsvd_core.engine.data import DEFAULT_SEQLEN, DEFAULT_WINDOWS

    app = workbench(lm, DEFAULT_WINDOWS, DEFAULT_SEQLEN)  # the app's default calibration (16 x 256 before issue 25)
    t0 = time.perf_counter()
    windows = app.windows()
    out["calibration_text_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    stream_stats(lm.model, [t.name for t in lm.targets], windows)  # no disk cache: the real cost
    out["statistics_16x256_s"] = time.perf_counter() - t0

    bench = workbench(lm, **CALIB)
    settings = Settings(ratio=0.1, dipsvd=ChannelOptions(whitening="paper"))  # as in tests/app/test_browser.py
    t0 = time.perf_counter()
    bench.factors(settings.spec)
    out["factors_from_disk_cache_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    bench.fisher()
    out["fisher_s"] = time.perf_counter() - t0
    latency = {}
    for allocation in ("uniform", "heuristic", "coupled", "nested"):
        base = replace(settings, allocation=allocation)
        changes = {"ratio": [replace(base, ratio=r) for r in (0.08, 0.1, 0.12, 0.15)],
                   "beta": [replace(base, beta=b) for b in (0.1, 0.25, 0.5, 0.75)]}
        for what, variants in changes.items():
            i = iter(variants * 3)

            def step():
                s = next(i)
                bench.probes.predicted_loss(s, bench.allocate(s))

            latency[f"{allocation}/{what}"] = timed(step, repeats=4)
    out["reallocate_plus_predicted_loss_s"] = latency
    return out


def apptest_rerun() -> dict:
    from streamlit.testing.v1 import AppTest

    os.environ.update(DIPSVD_STUDIO_CALIB_WINDOWS=str(CALIB["calib_windows"]), DIPSVD_STUDIO_SEQLEN=str(CALIB["seqlen"]))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600).run()
    [b for b in at.button if b.label.startswith("Load model")][0].click().run()
    studio = at.session_state["studio"]
    studio.job.wait()
    at.switch_page("pages/allocation.py").run()
    at.radio(key="k_s_dipsvd_whitening").set_value("paper").run()
    [b for b in at.button if b.label == "Factor matrices"][0].click().run()
    studio.job.wait()
    at.run()
    times = []
    for r in (0.12, 0.08, 0.15, 0.1):
        at.slider(key="k_s_ratio").set_value(r)
        t0 = time.perf_counter()
        at.run()
        times.append(time.perf_counter() - t0)
        assert not at.exception and abs(float([m.value for m in at.metric if m.label == "Realized ratio"][0]) - r) < 0.005
    return {"apptest_rerun_after_ratio_change_s": statistics.median(times)}


def markdown(res: dict) -> str:
    lat = res["core"]["reallocate_plus_predicted_loss_s"]
    rows = "\n".join(f"| {k.split('/')[0]} | {k.split('/')[1]} | {v * 1000:.0f} ms |" for k, v in lat.items())
    c = res["core"]
    return f"""{SECTION}

Machine: {res['machine']}. Date: {time.strftime('%Y-%m-%d')}. Command: `make bench-app`
(`python bench/bench_app.py --write`), torch threads: {res['torch_threads']}. Heavy jobs running beside it
(see the load average) make every time an upper bound.
Calibration for the factors, Fisher and the slider: 4 x 128 tokens of wiki, dipsvd with "paper" whitening
(as in tests/app/test_browser.py), factors and Fisher already in the disk cache.

| step | time |
|---|---|
| `make run` (warm venv) until the health endpoint answers | {res['startup']['health_s']:.1f} s |
| `make run` (warm venv) until Chromium shows the first page's title | {res['startup']['title_rendered_s']:.1f} s |
| load the bundled SmolLM2-135M (dequantized copy cached) | {c['load_model_s']:.1f} s |
| cut the calibration windows (tokenizes the Wikipedia half) | {c['calibration_text_s']:.1f} s |
| statistics, 16 x 256 tokens (the app's default), no disk cache | {c['statistics_16x256_s']:.1f} s |
| factors (dipsvd, paper whitening) from the disk cache | {c['factors_from_disk_cache_s']:.1f} s |
| Fisher sensitivity (4 x 128 tokens, disk cache when present) | {c['fisher_s']:.1f} s |
| AppTest rerun of the Allocation page after a ratio change | {res['apptest']['apptest_rerun_after_ratio_change_s'] * 1000:.0f} ms |

Work behind one slider move on cached factors (Workbench.allocate + predicted_loss, median):

| allocation | slider | time |
|---|---|---|
{rows}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="replace the section in bench/RESULTS.md")
    args = ap.parse_args()
    res = {"machine": f"{machine()}, load average {os.getloadavg()[0]:.1f} at the start",
           "torch_threads": os.environ.get("OMP_NUM_THREADS", "default")}
    res["startup"] = startup()
    res["core"] = core()
    res["apptest"] = apptest_rerun()
    print(json.dumps(res, indent=1))
    if args.write:
        replace_section(RESULTS, SECTION, markdown(res))


if __name__ == "__main__":
    main()
