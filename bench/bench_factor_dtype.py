"""What storing the factors in bfloat16 does to perplexity (issue 10: bf16 factors for large models).

    .venv/bin/python bench/bench_factor_dtype.py [--write]

Runs `python -m dipsvd_core sweep` on the bundled SmolLM2-135M three times, one after the other, each
on an empty cache: float32 weights with float32 factors (the default), float32 weights with bfloat16
factors, and bfloat16 weights with bfloat16 factors (what a GPU user with a bf16 model gets). Rows:
svd-llm and dipsvd with the uniform allocation at ratios 0.2 and 0.4; 32 x 512 calibration tokens;
8192 evaluation tokens each of wiki and news. --write replaces the "## Factor dtype (issue 10)"
section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from bench_sweep import replace_section  # noqa: E402

SECTION = "## Factor dtype (issue 10)"
CONFIGS = [("float32", "float32"), ("float32", "bfloat16"), ("bfloat16", "bfloat16")]  # (weights, factors)


def sweep(weights: str, factors: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sweep.json"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dipsvd_core", "sweep", "--grid", "svd-llm:uniform,dipsvd:uniform",
                        "--ratios", "0.2,0.4", "--eval-tokens", "8192", "--dtype", weights, "--factor-dtype", factors,
                        "--device", "cpu", "--out-json", str(out), "--out-md", str(Path(tmp) / "sweep.md"), "--quiet"],
                       cwd=ROOT, env=dict(os.environ, DIPSVD_STUDIO_CACHE=str(Path(tmp) / "cache"), PYTHONPATH=str(ROOT)),
                       check=True, stdout=subprocess.DEVNULL)
        report = json.loads(out.read_text())
        report["wall_s"] = time.perf_counter() - t0
        return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    res = {f"{w}|{f}": sweep(w, f) for w, f in CONFIGS}
    (ROOT / "bench" / "factor_dtype.json").write_text(json.dumps(res, indent=1, default=str))
    text = markdown(res)
    print(text)
    if args.write:
        replace_section(ROOT / "bench" / "RESULTS.md", SECTION, text)


def markdown(res: dict) -> str:
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    machine = f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), no GPU"
    lines = [SECTION, "", f"Machine: {machine}. Date: {date}. Command: `.venv/bin/python bench/bench_factor_dtype.py "
             "--write`. Bundled SmolLM2-135M, 32 x 512 calibration tokens, 8192 evaluation tokens per set.", "",
             "| weights | factors | method | ratio | ppl wiki | ppl news | change wiki | change news |",
             "|---|---|---|---|---|---|---|---|"]
    base = {(r["method"], r["ratio"]): r["ppl"] for r in res["float32|float32"]["rows"]}
    for key, rep in res.items():
        w, f = key.split("|")
        lines.append(f"| {w} | {f} | original | - | {rep['original_ppl']['wiki']:.3f} | {rep['original_ppl']['news']:.3f} | | |")
        for r in rep["rows"]:
            b = base[(r["method"], r["ratio"])]
            lines.append(f"| {w} | {f} | {r['method']} | {r['ratio']:g} | {r['ppl']['wiki']:.3f} | {r['ppl']['news']:.3f} | "
                         f"{100 * (r['ppl']['wiki'] / b['wiki'] - 1):+.2f}% | {100 * (r['ppl']['news'] / b['news'] - 1):+.2f}% |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
