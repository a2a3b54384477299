"""What storing the factors in bfloat16, or computing them in float32, does to perplexity (issue 10).

    .venv/bin/python bench/experiments/bench_factor_dtype.py [--write] [--configs W|F|C,...]

Runs `python -m dipsvd_core sweep` on the bundled SmolLM2-135M three times, one after the other, each
on an empty cache: float32 weights with float32 factors (the default), float32 weights with bfloat16
factors, bfloat16 weights with bfloat16 factors (what a GPU user with a bf16 model gets), and float32
weights and factors with the whitening and the SVD computed in float32 instead of float64. Rows:
svd-llm and dipsvd with the uniform allocation at ratios 0.2 and 0.4; 32 x 512 calibration tokens;
8192 evaluation tokens each of wiki and news. --configs runs only the named configurations
(weights|factors|compute) and keeps the others' rows from bench/experiments/factor_dtype.json. --write replaces the "## Factor dtype (issue 10)"
section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent  # bench/experiments/: this script's results sit beside it
sys.path.insert(0, str(HERE.parent))  # bench/: common.py and the maintained scripts

from common import RESULTS, ROOT, machine, replace_section, utc_date, write_json

SECTION = "## Factor dtype (issue 10)"
CONFIGS = ["float32|float32|float64", "float32|bfloat16|float64", "bfloat16|bfloat16|float64",
           "float32|float32|float32"]  # weights|factors|compute
BASE = "float32|float32|float64"


def sweep(weights: str, factors: str, compute: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sweep.json"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dipsvd_core", "sweep", "--grid", "svd-llm:uniform,dipsvd:uniform",
                        "--ratios", "0.2,0.4", "--eval-tokens", "8192", "--dtype", weights, "--factor-dtype", factors,
                        "--compute-dtype", compute,
                        "--device", "cpu", "--out-json", str(out), "--out-md", str(Path(tmp) / "sweep.md"), "--quiet"],
                       cwd=ROOT, env=dict(os.environ, DIPSVD_STUDIO_CACHE=str(Path(tmp) / "cache"), PYTHONPATH=str(ROOT)),
                       check=True, stdout=subprocess.DEVNULL)
        report = json.loads(out.read_text())
        report["wall_s"] = time.perf_counter() - t0
        return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    args = ap.parse_args()
    store = HERE / "factor_dtype.json"
    old = json.loads(store.read_text()) if store.exists() else {}
    old = {k if k.count("|") == 2 else f"{k}|float64": v for k, v in old.items()}  # earlier runs: float64 compute
    res = {c: old[c] for c in CONFIGS if c in old}
    for c in args.configs.split(","):
        res[c] = dict(sweep(*c.split("|")), date=utc_date())
        write_json(store, res, default=str)
    text = markdown(res)
    print(text)
    if args.write:
        replace_section(RESULTS, SECTION, text)


def markdown(res: dict) -> str:
    dates = ", ".join(sorted({f"{r.get('date', '?')} ({k})" for k, r in res.items()}))
    lines = [SECTION, "", f"Machine: {machine()}. Dates (weights|factors|compute): {dates}. "
             "Command: `.venv/bin/python bench/experiments/bench_factor_dtype.py --write [--configs ...]`. Bundled SmolLM2-135M, 32 x 512 calibration tokens, 8192 evaluation tokens per set.", "",
             "| weights | factors | compute | method | ratio | ppl wiki | ppl news | change wiki | change news | statistics + factors s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    base = {(r["method"], r["ratio"]): r["ppl"] for r in res[BASE]["rows"]}
    for key, rep in res.items():
        w, f, c = key.split("|")
        lines.append(f"| {w} | {f} | {c} | original | - | {rep['original_ppl']['wiki']:.3f} | {rep['original_ppl']['news']:.3f} | | | {pass_seconds(rep)} |")
        for r in rep["rows"]:
            b = base[(r["method"], r["ratio"])]
            lines.append(f"| {w} | {f} | {c} | {r['method']} | {r['ratio']:g} | {r['ppl']['wiki']:.3f} | {r['ppl']['news']:.3f} | "
                         f"{100 * (r['ppl']['wiki'] / b['wiki'] - 1):+.2f}% | {100 * (r['ppl']['news'] / b['news'] - 1):+.2f}% | |")
    return "\n".join(lines) + "\n"


def pass_seconds(rep: dict) -> str:
    """The cold streaming pass (statistics and both methods' factors), one per configuration."""
    s = [v for k, v in rep["timings_s"].items() if k.startswith("statistics + factors")]
    return f"{s[0]:.1f}" if s else ""


if __name__ == "__main__":
    main()
