"""Benchmark of issue 9: every long step of the Studio against the same work from the CLI.

    python bench/bench_app_cli.py [--write] [--cold-start] [--runs N] [--more] [--calib 8x256]

One run, one machine, one after the other, nothing else running, each side on an empty cache of its
own (so both dequantize the bundled GGUF and collect statistics cold):
- CLI: `python -m dipsvd_core compress` three times (the main run, then Bayesian optimization and
  Dobi-SVD training on the main run's cache), with --report; the step times come from its report.
- App: `streamlit run app.py` driven in headless Chromium as a user would, with the page left open
  on the step while it runs (its progress display polling). A step's app time is from the click
  until its result is on the page.
The work: the bundled SmolLM2-135M, 8 x 256 calibration windows of wiki (--calib WxT: W windows of T tokens), dipsvd with the uniform
allocation at ratio 0.1, wiki and news with 1024 evaluation tokens each, the three default
prompts (48 new tokens, chat template), BO with 10 calls, Dobi-SVD with 1 epoch over 2 windows, and the same
build refined (`--refine sequential`; the app's Refine box on the Compress page).

--cold-start also times a first-time user on a fresh clone with an empty HOME (so pip's cache is
empty too): `make install`, then `make run` until Chromium shows the first page.
--calib other than 8x256 writes bench/app_cli_WxT.json and its own section, "## App against CLI at W x T (issue 26)".
--runs N repeats both sides N times and reports each side's median per step, with each run's ratio beside it
(steps differ by 10-20% between runs on this shared machine). --more adds the N runs to those already in this size's
JSON (a run at 32 x 512 takes about 28 minutes here, so the three can come from two sittings). --write replaces the "## App against CLI (issue 9)"
section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import BENCH, RESULTS, ROOT, calib_size, machine, replace_section, utc_date, write_json

SECTION = "## App against CLI (issue 9)"
ANALYSIS = "What starved the job, and what was done"  # the hand-written part of the section, kept by --write
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-quic"]
CALIB_WINDOWS, SEQLEN = ISSUE_9_SIZE = 8, 256  # --calib changes both


def calib() -> list[str]:
    return ["--calib", "wiki", "--calib-windows", str(CALIB_WINDOWS), "--seqlen", str(SEQLEN), "--seed", "0"]


def work() -> list[str]:
    # uniform, unrefined as the issue-9 figures were (a build's own defaults are nested and refined since 2026-12-07)
    return ["--method", "dipsvd", "--allocation", "uniform", "--refine", "none", "--ratio", "0.1", *calib()]
BO_CALLS, DOBI_EPOCHS, DOBI_WINDOWS = 10, 1, 2
LONG = 900_000  # ms: the longest a step may take in the browser before the run is abandoned
# Stamps window.__seenAt (ms since the epoch, the clock time.time() reads) at the first DOM change after
# which the condition holds; the check runs only when the DOM changes, so it costs the page next to nothing.
WATCH = """cond => {
  window.__seenAt = null;
  window.__clickAt = null;  // the user's click, as the page gets it: Playwright's own checks before it are not the app's
  document.addEventListener("pointerdown", () => { window.__clickAt = Date.now(); }, {capture: true, once: true});
  const test = new Function("return (" + cond + ")");
  if (test()) return;  // already true before the click: no stamp, the locator's time stands
  const obs = new MutationObserver(() => { if (test()) { window.__seenAt = Date.now(); obs.disconnect(); } });
  obs.observe(document.body, {childList: true, subtree: true, characterData: true});
}"""


def has_text(text: str) -> str:
    return f"document.body.textContent.includes({json.dumps(text)})"  # textContent: no layout per check


def cli(cache: Path, *args: str) -> dict:
    """One `compress` run on this cache; its report, with the wall time of the whole process."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dipsvd_core", "compress", *args, "--report", str(report), "--quiet"],
                       cwd=ROOT, env=dict(os.environ, DIPSVD_STUDIO_CACHE=str(cache)), check=True,
                       stdout=subprocess.DEVNULL)
        out = json.loads(report.read_text())
        out["wall_s"] = time.perf_counter() - t0
        return out


def cli_side(cache: Path) -> dict:
    report = cli(cache, *work(), "--eval", "wiki,news", "--eval-tokens", "1024", "--generate")
    main = report["timings_s"]
    small_eval = ["--eval", "wiki", "--eval-tokens", "256", "--no-eval-original"]
    bo = cli(cache, *work(), "--allocation", "bayes", "--bo-calls", str(BO_CALLS), *small_eval)["timings_s"]
    refined = cli(cache, *work(), "--refine", "sequential", *small_eval)["timings_s"]
    dobi = cli(cache, *calib(), "--method", "dobi", "--ratio", "0.1", "--dobi-epochs", str(DOBI_EPOCHS),
               "--dobi-windows", str(DOBI_WINDOWS), *small_eval)["timings_s"]
    return {
        # the app's load job checks the plan first, as compress does before its timed load
        "load and statistics": main.get("plan", 0) + main["load_model"] + main["calibration_text"] + main["statistics"],
        "statistics": main["statistics"],
        # The app's "Factor matrices" is a streaming pass of its own (statistics again, then factoring): the
        # load's pass keeps no Grams, since no per-block state is held for all blocks. compress does both
        # in one pass, so the same work on the CLI side is its statistics plus its factors.
        "factors (a streaming pass)": main["statistics"] + main["factors"],
        "build (allocation and surgery)": main["allocation"] + main["surgery"],
        "surgery": main["surgery"],
        "evaluate original and compressed": main["evaluation"],
        "generate, original and compressed": main["generation"],
        # a refined uniform build runs no factor pass (refine refits from its own pass): allocation, refine, surgery
        "refined build (refine and surgery)": refined["allocation"] + refined["refine"] + refined["surgery"],
        "Fisher sensitivity": bo["fisher"],
        "Bayesian optimization": bo["allocation"] - bo["fisher"],  # allocate() computed Fisher inside
        "Dobi-SVD training": dobi["training"],
        "_generated_tokens": sum(row["new_tokens"] for rows in report["generations"].values() for row in rows),
        "_raw": {"main": main, "bo": bo, "dobi": dobi, "refined": refined},
    }


class App:
    """The Studio in a real browser; `step(click, done)` times one job from its click to its result."""

    def __init__(self, cache: Path, log: Path):
        from playwright.sync_api import sync_playwright

        from devkit.browser import free_port, wait_for_server

        port = free_port()
        env = dict(os.environ, DIPSVD_STUDIO_CACHE=str(cache), DIPSVD_STUDIO_CALIB="wiki",  # as the CLI side
                   DIPSVD_STUDIO_CALIB_WINDOWS=str(CALIB_WINDOWS), DIPSVD_STUDIO_SEQLEN=str(SEQLEN),
                   DIPSVD_STUDIO_EVAL="wiki,news", DIPSVD_STUDIO_EVAL_TOKENS="1024", DIPSVD_STUDIO_NEW_TOKENS="48")
        env.pop("DIPSVD_STUDIO_DEFAULT_MODEL", None)
        self.log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port)],
                                     cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://localhost:{port}"
        wait_for_server(self.url, self.proc)
        self.pw = sync_playwright().start()
        self.browser = self.pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        self.page = self.browser.new_page(viewport={"width": 1440, "height": 1000})

    def close(self) -> None:
        self.browser.close()
        self.pw.stop()
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()

    def go(self, title: str) -> None:
        from playwright.sync_api import expect

        self.page.get_by_test_id("stSidebarNav").get_by_text(title, exact=True).click()
        expect(self.page.get_by_role("heading", name=title, exact=True)).to_be_visible(timeout=60_000)
        self.settle()

    def settle(self) -> None:
        """Wait for the rerun a widget change started."""
        from devkit.browser import settle

        settle(self.page)

    def step(self, button: str, done, seen: str | None = None) -> float:
        """Seconds from the click until `done` (a locator) is visible. `seen`, a JavaScript condition on the
        page, times both ends inside the page: the click by its pointerdown event, the result by a
        MutationObserver that stamps the first DOM change after which the condition holds. Playwright's own
        wait polls at 20, 50, 100, 100 and then every 500 ms, which added up to half a second to a step
        (0.37 s measured on a 0.45 s build), and its click first checks that the button is visible and
        stable over two animation frames, 19-35 ms before the page sees a pointer (measured on the build)."""
        if seen:
            self.page.evaluate(WATCH, seen)
        t0 = time.time()
        self.page.get_by_role("button", name=button).click()
        done().wait_for(state="visible", timeout=LONG)
        seconds = time.time() - t0
        stamps = self.page.evaluate("() => [window.__clickAt, window.__seenAt]") if seen else [None, None]
        if stamps[1]:
            seconds = min(seconds, stamps[1] / 1000 - (stamps[0] / 1000 if stamps[0] else t0))
        errors = self.page.get_by_test_id("stAlertContentError").all_inner_texts()
        if errors:
            raise RuntimeError(f"the app showed an error after '{button}': {errors}")
        return seconds

    def number(self, label: str, value: int) -> None:
        box = self.page.get_by_label(label, exact=True)
        box.fill(str(value))
        box.press("Enter")
        self.settle()

    def choose(self, label: str, option: str) -> None:
        self.page.get_by_test_id("stSelectbox").filter(has_text=label).click()
        self.page.get_by_role("option", name=option, exact=True).click()
        self.settle()


def app_side(cache: Path, log: Path) -> dict:
    from playwright.sync_api import expect

    app, out = App(cache, log), {}
    page = app.page
    try:
        page.goto(app.url)
        expect(page.get_by_role("heading", name="Model and data", exact=True)).to_be_visible(timeout=60_000)
        out["load and statistics"] = app.step("Load model and collect statistics",
                                              lambda: page.get_by_text("Decoder blocks"), has_text("Decoder blocks"))
        shown = page.get_by_test_id("stMetricDelta").filter(has_text="statistics").inner_text()
        out["statistics"] = float(re.search(r"statistics ([0-9.]+) s", shown).group(1))  # the job's own time

        app.go("Allocation")
        page.get_by_role("radio", name="uniform").check(force=True)  # as the CLI side (work())
        app.settle()
        dropped = "the energy of the dropped singular values"
        out["factors (a streaming pass)"] = app.step("Factor matrices", lambda: page.get_by_text(dropped),
                                                     has_text(dropped))

        app.go("Compress and evaluate")
        page.get_by_role("checkbox", name="Refine (sequential compensation)").uncheck(force=True)  # refined below
        app.settle()
        out["build (allocation and surgery)"] = app.step("Build compressed model",
                                                         lambda: page.get_by_text("Realized ratio (targeted)"),
                                                         has_text("Realized ratio (targeted)"))
        shown = page.get_by_text("surgery", exact=False).filter(has_text="Built with").inner_text()
        out["surgery"] = float(re.search(r"surgery ([0-9.]+) s", shown).group(1))  # the job's own time
        out["evaluate original and compressed"] = app.step(
            "Evaluate original and compressed",
            lambda: page.get_by_test_id("stTable").locator("tbody tr").nth(1).get_by_text("news", exact=True),
            "[...document.querySelectorAll('[data-testid=stTable] tbody tr')].some("
            "r => r.innerText.includes('news'))")

        # generation before the refined build, so that both sides generate with the same (unrefined) model: a refined
        # one can stop at its end-of-text token at another place, which changes the work
        app.go("Side by side")
        own = page.get_by_label("Your own prompts, one a line")  # with the preselected one: the CLI's three
        own.fill("The history of the Roman Empire begins\nWrite a short poem about the sea.")
        own.press("Control+Enter")
        app.settle()
        out["generate, original and compressed"] = app.step("Generate", lambda: page.get_by_text("tok/s").nth(5),
                                                            "document.body.innerText.split('tok/s').length > 6")
        captions = re.findall(r"(\d+) tokens · [0-9.]+ tok/s", page.inner_text("body"))
        out["_generated_tokens"] = sum(int(n) for n in captions)

        app.go("Compress and evaluate")
        page.get_by_role("checkbox", name="Refine (sequential compensation)").check(force=True)
        app.settle()
        refined = "held-out block-output error"  # the build's caption: "refined k of n blocks (held-out ...)"
        out["refined build (refine and surgery)"] = app.step("Build compressed model", lambda: page.get_by_text(refined),
                                                             has_text(refined))

        app.go("Allocation")
        page.get_by_role("radio", name="bayes").check(force=True)
        app.settle()
        out["Fisher sensitivity"] = app.step("Compute Fisher sensitivity",
                                             lambda: page.get_by_role("button", name="Run Bayesian optimization"),
                                             "[...document.querySelectorAll('button')].some("
                                             "b => b.innerText.includes('Run Bayesian optimization'))")
        page.get_by_text("Bounds and Bayesian optimization").click()
        app.number("BO calls", BO_CALLS)
        out["Bayesian optimization"] = app.step("Run Bayesian optimization",
                                                lambda: page.get_by_text("Objective of each BO call"),
                                                has_text("Objective of each BO call"))

        app.choose("Method", "dobi")
        app.number("Epochs", DOBI_EPOCHS)
        app.number("Training windows", DOBI_WINDOWS)
        out["Dobi-SVD training"] = app.step("Train truncation positions",
                                            lambda: page.get_by_text("Ratio the gammas reached"),
                                            has_text("Ratio the gammas reached"))
    except Exception:
        page.screenshot(path=str(log.with_suffix(".png")), full_page=True)
        raise
    finally:
        app.close()
    return out


def cold_start() -> dict:
    """A first-time user: a fresh clone, an empty HOME (no pip or model cache), `make install`, then
    `make run` until Chromium shows the first page."""
    from bench_app import startup

    work = Path(tempfile.mkdtemp(prefix="dipsvd-cold-"))
    try:
        clone, home = work / "clone", work / "home"
        home.mkdir()
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DIPSVD_STUDIO", "VIRTUAL_ENV", "XDG_CACHE"))}
        env["HOME"] = str(home)
        t0 = time.perf_counter()
        subprocess.run(["make", "install"], cwd=clone, env=env, check=True, stdout=subprocess.DEVNULL)
        install = time.perf_counter() - t0
        first_page = startup(clone, env, timeout=300)["title_rendered_s"]
        return {"install_s": install, "first_page_s": first_page}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def markdown(res: dict) -> str:
    rows, runs = [], res.get("runs", [])
    for step, app_s in res["app"].items():
        cli_s = res["cli"][step]
        spread = ""
        if len(runs) > 1:
            ratios = [r["app"][step] / r["cli"][step] for r in runs]
            spread = f" | {min(ratios):.2f}-{max(ratios):.2f}"
        digits = 2 if cli_s < 1 else 1  # a sub-second step shows its hundredths
        rows.append(f"| {step} | {cli_s:.{digits}f} | {app_s:.{digits}f} | {app_s / cli_s:.2f}{spread} |")
    tokens = [(r["cli"].get("_generated_tokens"), r["app"].get("_generated_tokens")) for r in runs]
    tokens_text = "" if not tokens or None in tokens[0] else (
        "\nTokens generated (both models, all prompts; the same work when they match), CLI / app in each run: "
        + ", ".join(f"{c} / {a}" for c, a in tokens) + ".\n")
    cold = res.get("cold_start")
    cold_text = "" if not cold else f"""
A first-time user (`--cold-start`): a fresh clone and an empty HOME, so pip downloads everything but torch
(a wheel on this machine's disk). `make install` {cold['install_s']:.0f} s; then `make run` until Chromium shows
the first page {cold['first_page_s']:.1f} s. The first load of the bundled model then dequantizes it (the
"load and statistics" row above includes that, on both sides).
"""
    raw = res["cli"]["_raw"]["main"]
    size = "" if at_issue_9_size() else f" --calib {CALIB_WINDOWS}x{SEQLEN}"
    return f"""{section()}

Machine: {res['machine']}. Date: {res['date']}. Command: `.venv/bin/python bench/bench_app_cli.py --write{f' --runs {len(runs)}' if len(runs) > 1 else ''}{' --cold-start' if cold else ''}{size}`.
The bundled SmolLM2-135M, {CALIB_WINDOWS} x {SEQLEN} calibration windows of wiki (on both sides), dipsvd + uniform at ratio 0.1, wiki and news
with 1024 evaluation tokens each, the three default prompts (48 new tokens), BO with {BO_CALLS} calls, Dobi-SVD
with {DOBI_EPOCHS} epoch over {DOBI_WINDOWS} windows, and the same build refined (`--refine sequential`, the Compress
page's Refine box; a refined uniform build runs no factor pass). CLI and app ran one after the other, each on an empty cache
of its own, so both dequantize the GGUF (CLI: {raw['load_model']:.1f} s of its load) and compute every step cold.
CLI times come from the `compress` report ("load and statistics" includes the plan that compress checks before
it loads, as the app's load job does); an app time runs from the click until the result is on the page (both stamped
inside the page, the click by its pointerdown event and the result by a MutationObserver, not by Playwright's
checks and polling), with the page left open on the step (its progress display polling every 3 s; the end of a job reruns the page from the server),
except "statistics" and "surgery", which are the job's own times as the page shows them. "Build" in the app also computes the parameter report and redraws the page.

| step | CLI s | app s | app / CLI |{' app / CLI in each run |' if len(runs) > 1 else ''}
|---|---|---|---|{'---|' if len(runs) > 1 else ''}
{chr(10).join(rows)}
{tokens_text}{cold_text}"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="replace the section in bench/RESULTS.md")
    ap.add_argument("--cold-start", action="store_true", help="also time install and first page on a fresh clone")
    ap.add_argument("--runs", type=int, default=1, help="repeat both sides; the table shows each side's median")
    ap.add_argument("--more", action="store_true", help="add the runs to those in this size's JSON")
    ap.add_argument("--calib", default="8x256", help="calibration windows x tokens, on both sides")
    args = ap.parse_args()
    global CALIB_WINDOWS, SEQLEN
    CALIB_WINDOWS, SEQLEN = calib_size(args.calib)
    res = earlier_runs() if args.more else {"runs": []}
    res["machine"] = f"{machine()}, load average {os.getloadavg()[0]:.1f} at the start"
    first, today = res.get("date", utc_date()).split(" to ")[0], utc_date()  # --more's runs can span days
    res["date"] = today if first == today else f"{first} to {today}"
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            run = {"cli": cli_side(Path(tmp) / "cli-cache")}
            print(json.dumps(run["cli"], indent=1), flush=True)
            run["app"] = app_side(Path(tmp) / "app-cache", Path(tempfile.gettempdir()) / "bench_app_cli_streamlit.log")
            print(json.dumps(run["app"], indent=1), flush=True)
        res["runs"].append(run)
        write_json(json_path(), res)  # each run as it ends: a later run that fails loses only itself
    res["cli"] = dict(median_of([r["cli"] for r in res["runs"]]), _raw=res["runs"][-1]["cli"]["_raw"])
    res["app"] = median_of([r["app"] for r in res["runs"]])
    if args.cold_start:
        res["cold_start"] = cold_start()
    write_json(json_path(), res)
    text = markdown(res)
    print(text)
    if args.write:
        replace_section(RESULTS, section(), text, keep_from=ANALYSIS)


def earlier_runs() -> dict:
    """This size's JSON, whose runs --more adds to; its medians are recomputed at the end."""
    path = json_path()
    if not path.exists():
        sys.exit(f"--more adds to {path.name}, which is not there: run without --more first")
    res = json.loads(path.read_text())
    return {"date": res["date"], "runs": res["runs"]}


def at_issue_9_size() -> bool:
    """Whether this run is at issue 9's calibration size, whose JSON and section keep their first names."""
    return (CALIB_WINDOWS, SEQLEN) == ISSUE_9_SIZE


def json_path() -> Path:
    """This calibration size's JSON (issue 9's is app_cli.json)."""
    return BENCH / ("app_cli.json" if at_issue_9_size() else f"app_cli_{CALIB_WINDOWS}x{SEQLEN}.json")


def section() -> str:
    """The RESULTS.md section of this calibration size (issue 9's is 8 x 256)."""
    return SECTION if at_issue_9_size() else f"## App against CLI at {CALIB_WINDOWS} x {SEQLEN} (issue 26)"


def median_of(sides: list[dict]) -> dict:
    """Each step's median over runs (one run: its own figures)."""
    return {k: statistics.median(side[k] for side in sides) for k in sides[0] if not k.startswith("_")}


if __name__ == "__main__":
    main()
