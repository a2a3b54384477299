"""compress --html FILE: one self-contained HTML report that opens offline, with the plots and the generations; the
browser opens it with the network off."""
from __future__ import annotations

import json
import re

import pytest

from tests.cli.test_cli import error_line, run


@pytest.fixture(scope="module")
def html_report(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("html")
    page, report = tmp / "report.html", tmp / "r.json"
    proc = run("compress", "--model", tiny_model_dir, "--ratio", "0.3",  # dipsvd's own: nested, refined "--calib", "wiki", "--calib-windows", "4", "--seqlen", "64", "--eval", "wiki,news",
               "--eval-tokens", "256", "--generate", "--html", str(page), "--report", str(report), "--quiet")
    assert proc.returncode == 0, proc.stderr
    return page, json.loads(report.read_text())


def test_the_report_is_one_self_contained_file(html_report):
    page, report = html_report
    text = page.read_text()
    assert report["html"] == str(page)
    assert not re.search(r"<script[^>]+src=", text)  # nothing fetched (the browser test checks the requests)
    assert "Plotly.newPlot" in text and text.count("Plotly.newPlot") == 4  # Fisher, rank, Q, allocation
    for title in ("Fisher sensitivity", "Effective rank", "Block importance Q", "Allocation", "Perplexity",
                  "Generations, side by side"):
        assert f"<h2>{title}</h2>" in text
    # the title names method, allocation, ratio removed and kept, and whether refined; no setting is a dict's repr
    assert "<title>DipSVD Studio: " in text and \
        "dipsvd + nested · ratio 0.3 removed, 70% kept · refined (sequential)</title>" in text
    settings = text.split("<summary>every setting</summary>")[1].split("</details>")[0]
    assert "<td>dobi.epochs</td>" in settings and "{" not in settings
    wiki = report["ppl"]["compressed"]["wiki"]
    assert f"<td>{wiki:.4g}</td>" in text
    first = report["generations"]["compressed"][0]
    import html
    assert html.escape(first["text"]) in text and html.escape(report["generations"]["original"][0]["text"]) in text


def test_an_existing_report_is_not_overwritten(tiny_model_dir, tmp_path):
    page = tmp_path / "mine.html"
    page.write_text("precious")
    proc = run("compress", "--model", tiny_model_dir, "--html", str(page), "--quiet")
    assert proc.returncode == 2 and "--force" in error_line(proc)
    assert page.read_text() == "precious"


@pytest.mark.slow
def test_the_report_opens_offline_in_a_browser(html_report):
    from tests.app.test_browser import CHROMIUM, CHROMIUM_ARGS, need_chromium

    need_chromium()
    from playwright.sync_api import sync_playwright

    page_file, report = html_report
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(offline=True)
            requests = []
            context.on("request", lambda r: requests.append(r.url))
            page = context.new_page()
            page.goto(page_file.as_uri())
            page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 4",
                                   timeout=30_000)
            assert page.locator(".js-plotly-plot").count() == 4
            assert page.get_by_text("Fisher sensitivity S_l").count() >= 1  # a plot's own title, drawn
            gens = report["generations"]
            assert page.locator(".gen").count() == len(gens["original"]) + len(gens["compressed"])
            shown = page.locator(".gen").all_inner_texts()
            assert shown[1].strip() == gens["compressed"][0]["text"].strip()  # original, compressed, per prompt
            assert page.get_by_text(gens["compressed"][0]["prompt"]).count() >= 1
            assert all(u.startswith("file:") or u.startswith("data:") for u in requests), requests
        finally:
            browser.close()
