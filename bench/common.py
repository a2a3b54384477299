"""The set-up the bench scripts share: the repo root on sys.path, the bundled model, the Workbench with the
benchmarks' calibration, the evaluation windows, and the writers of results (a section of bench/RESULTS.md, JSON
files and JSON lines).

Importing it only puts the repository root on sys.path (so `dipsvd_core` and `devkit` import from a script run as
`python bench/bench_x.py`); dipsvd_core itself is imported inside the functions, so a script may point
DIPSVD_STUDIO_CACHE elsewhere before its first use (bench_core --cold, experiments/bench_refine).
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent  # bench/
ROOT = BENCH.parent  # the repository root
RESULTS = BENCH / "RESULTS.md"  # the shared results file, one "## " section per benchmark
for _path in (BENCH, ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

MODEL = "smollm2-135m"  # the bundled SmolLM2-135M (dequantized from its 4-bit GGUF)
# The benchmarks' calibration: 32 windows x 512 tokens of wiki, seed 0 (as written into their reports).
CALIBRATION = {"source": "wiki", "windows": 32, "seqlen": 512, "seed": 0}
EVAL_SETS = ("wiki", "news")
EVAL_SEQLEN = 512  # the evaluation windows' length where no Workbench gives one
# The plain path: every method on the same uniform ranks, unrefined (the speed benchmarks time the ranks, not
# their refit; bench_core compares the methods on one footing)
PLAIN = {"allocation": "uniform", "refine": "none"}


def load_bundled(device: str | None = None, dtype: str | None = None):
    """The bundled model by dipsvd_core.model.models.load_model; device and dtype None are load_model's own defaults
    (`load_model()`), the scripts that time on the CPU pass "cpu" and "float32"."""
    from dipsvd_core.run.loading import load_model

    return load_model(MODEL, device=device, dtype=dtype)


def workbench(lm, calib_windows: int = CALIBRATION["windows"], seqlen: int = CALIBRATION["seqlen"],
              calib: str = CALIBRATION["source"], seed: int = CALIBRATION["seed"]):
    """A dipsvd_core.run.pipeline.Workbench on `lm` with the benchmarks' calibration (32 x 512 tokens of wiki, seed 0)
    unless told otherwise; the keywords are the Workbench's own."""
    from dipsvd_core.run.pipeline import Workbench

    return Workbench(lm, calib, calib_windows, seqlen, seed=seed)


def eval_sets(source, tokens: int | None) -> dict:
    """The evaluation windows of wiki and news, the first `tokens` tokens of each. `source` is a Workbench
    (Workbench.eval_windows, in windows of its calibration seqlen) or a loaded model
    (dipsvd_core.engine.data.evaluation_windows on its tokenizer, in 512-token windows)."""
    if hasattr(source, "eval_windows"):
        return {s: source.eval_windows(s, tokens) for s in EVAL_SETS}
    from dipsvd_core.engine.data import evaluation_windows

    return {s: evaluation_windows(source.tokenizer, s, EVAL_SEQLEN, tokens) for s in EVAL_SETS}


def calib_size(text: str) -> tuple[int, int]:
    """A calibration size as the scripts' --calib gives it, "32x512": (windows, tokens a window)."""
    windows, seqlen = (int(v) for v in text.lower().split("x"))
    return windows, seqlen


def machine() -> str:
    """The machine as the reports name it."""
    return f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), no GPU"


def utc_date() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")


def repeat_times(fn, runs: int) -> list[float]:
    """Seconds of each of `runs` calls of fn(), after one warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def write_json(path: Path | str, obj, default=None) -> None:
    """`obj` as JSON (indent 1) into `path`; `default` as for json.dumps."""
    Path(path).write_text(json.dumps(obj, indent=1, default=default))


def print_row(row: dict) -> None:
    """One result as a JSON line on stdout, flushed (the scripts whose output is redirected into a .jsonl)."""
    print(json.dumps(row), flush=True)


def replace_section(path: Path, title: str, body: str, keep_from: str | None = None) -> None:
    """Add or replace one '## ' section of a shared Markdown file, leaving every other section as is.
    The file is re-read right before writing, since others write to it too. With `keep_from`, the section's
    lines from the first one starting with it (a hand-written analysis below the measured part) stay, after
    the new body."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip() == title), None)
    if start is None:
        lines += ["", *body.rstrip().splitlines()]
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        kept = next((lines[i:end] for i in range(start + 1, end) if keep_from and lines[i].startswith(keep_from)), [])
        while kept and not kept[-1].strip():
            kept.pop()
        lines[start:end] = [*body.rstrip().splitlines(), *([""] + kept if kept else []), ""]
    path.write_text("\n".join(lines).rstrip() + "\n")
