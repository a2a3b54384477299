"""Benchmark of issue 5: Dobi-SVD next to DipSVD and SVD-LLM on the bundled model.

SmolLM2-135M (bundled, dequantized from a 4-bit GGUF); 32 calibration windows x 512 tokens of
`wiki` (seed 0) for the statistics of svd-llm and dipsvd; Dobi-SVD trains on the first
--dobi-windows of the same windows. Perplexity on `wiki` and `news` (--eval-tokens each, 512-token
windows), the same evaluation as the issue 3 sweep. Rows per ratio:

  svd-llm + uniform        SVD-LLM
  dipsvd + heuristic       DipSVD, the paper's allocation
  dipsvd + coupled         DipSVD with our coupled allocator (the best at 0.1 and 0.2 in issue 3)
  dobi + trained           Dobi-SVD, 16-bit factors (parameter ratio)
  dobi-remap + trained     Dobi-SVD with 8-bit remapping (ratio counted in bytes vs 16-bit weights)

Writes bench/experiments/sweep_dobi.json and .md (rewritten after every row) and prints the comparison tables
(`--table-only` prints them again from the JSON); the section of bench/RESULTS.md is written by
hand from them.

    .venv/bin/python bench/experiments/bench_dobi.py [--ratios 0.1,0.2,0.3] [--eval-tokens 8192] [--dobi-epochs 2]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import sys

HERE = Path(__file__).resolve().parent  # bench/experiments/: this script's results sit beside it
sys.path.insert(0, str(HERE.parent))  # bench/: common.py and the maintained scripts

from bench_sweep import run  # (bench/ is on sys.path when this script runs)
from common import eval_sets, load_bundled, write_json

from dipsvd_core.methods.dobi import DobiConfig
from dipsvd_core.outputs.sweep import markdown
from dipsvd_core.run.pipeline import Settings

GRID = "svd-llm:uniform,dipsvd:heuristic,dipsvd:coupled,dobi:trained,dobi-remap:trained"


def fmt(x: float) -> str:
    return f"{x:.2f}" if x < 1e4 else f"{x:.1e}"


def table(report: dict) -> str:
    """Perplexity wiki / news per ratio, one column per row of the grid; then the Dobi-SVD details."""
    rows = {(r["method"], r["allocation"], r["ratio"]): r for r in report["rows"]}
    grid = [tuple(g) for g in report["grid"]]
    head = ["ratio (removed / kept)", *[f"{m} + {a}" for m, a in grid]]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    o = report["original_ppl"]
    out.append(f"| 0 (original) | {fmt(o['wiki'])} / {fmt(o['news'])} |" + " |" * (len(grid) - 1))
    for ratio in report["ratios"]:
        cells = []
        for m, a in grid:
            r = rows.get((m, a, ratio))
            cells.append(f"{fmt(r['ppl']['wiki'])} / {fmt(r['ppl']['news'])}" if r else "-")
        out.append(f"| {ratio:g} / {100 * (1 - ratio):.0f}% | " + " | ".join(cells) + " |")
    out += ["", "| Dobi-SVD run | ratio | trained ratio | realized | storage MiB (16-bit: before) | "
            "gamma shift, ranks (min / max) | task loss, first / last epoch | train + IPCA s |", "|" + "---|" * 8]
    for r in report["rows"]:
        if not r["method"].startswith("dobi"):
            continue
        st, loss = r["storage"], r["dobi_task_loss"]
        half = len(loss) // 2
        out.append(f"| {r['method']} | {r['ratio']:g} | {r['ratio_trained']:.4f} | {r['ratio_realized']:.4f} | "
                   f"{st['targeted_bytes_after'] / 2**20:.1f} ({st['targeted_bytes_before_16bit'] / 2**20:.1f}) | "
                   f"{r['gamma_shift']['min']:+.1f} / {r['gamma_shift']['max']:+.1f} | "
                   f"{sum(loss[:half]) / max(half, 1):.3f} / {sum(loss[half:]) / max(len(loss) - half, 1):.3f} | "
                   f"{r['allocation_s']:.0f} |")
    return "\n".join(out) + "\n"


def references(out: str, ratio: float, eval_tokens: int) -> dict:
    """Two references for the remapped rows: the factor methods at the storage ratio the remap really
    reached (matched bytes), and plain int8 absmax quantisation of every targeted matrix (no SVD)."""
    import copy

    from bench_sweep import run as run_sweep_bench

    from dipsvd_core.engine.evaluate import perplexity
    from dipsvd_core.methods.dobi_math import dequantize_absmax, quantize_absmax

    matched = run_sweep_bench("svd-llm:uniform,dipsvd:heuristic,dipsvd:coupled", f"{ratio}", eval_tokens,
                              out + "_matched", Settings())
    lm = load_bundled(device="cpu", dtype="float32")
    model = copy.deepcopy(lm.model)
    mods = dict(model.named_modules())
    before = after = 0
    for t in lm.targets:
        w = mods[t.name].weight
        q, scale = quantize_absmax(w.data, 1)  # one scale per output row
        w.data = dequantize_absmax(q, scale, 1).to(w.dtype)
        before, after = before + 2 * t.params, after + t.params + 4 * t.out_features
    sets = eval_sets(lm, eval_tokens)
    int8 = {"storage_ratio": 1 - after / before, "ppl": {s: perplexity(model, w) for s, w in sets.items()}}
    return {"matched": [{k: r[k] for k in ("method", "allocation", "ratio", "ratio_realized", "ppl")}
                        for r in matched["rows"]], "int8_dense": int8}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratios", default="0.1,0.2,0.3")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--grid", default=GRID)
    ap.add_argument("--dobi-epochs", type=int, default=2)
    ap.add_argument("--dobi-windows", type=int, default=4)
    ap.add_argument("--out", default=str(HERE / "sweep_dobi"))
    ap.add_argument("--table-only", action="store_true", help="print the tables of an existing <out>.json")
    ap.add_argument("--references", type=float, default=None, metavar="RATIO",
                    help="only add the references to <out>.json: the factor methods at RATIO (the storage ratio "
                         "the remapped rows reached) and int8 quantisation of the dense matrices")
    args = ap.parse_args()
    if args.references is not None:
        report = json.loads(Path(args.out + ".json").read_text())
        report["references"] = references(args.out, args.references, args.eval_tokens)
        write_json(args.out + ".json", report, default=str)
        print(json.dumps(report["references"], indent=1))
        return
    if args.table_only:
        print(table(json.loads(Path(args.out + ".json").read_text())))
        return
    base = Settings(dobi=DobiConfig(epochs=args.dobi_epochs, windows=args.dobi_windows))
    report = run(args.grid, args.ratios, args.eval_tokens, args.out, base)
    print(markdown(report))
    print(table(report))
    for r in report["rows"]:
        if r["method"].startswith("dobi"):
            print(r["method"], r["ratio"], "trained ratio", round(r["ratio_trained"], 4), "storage",
                  r["storage"], "gamma shift", r["gamma_shift"], "task loss", [round(x, 3) for x in r["dobi_task_loss"]])
    print("timings:", json.dumps({k: round(v, 1) for k, v in report["timings_s"].items()}))


if __name__ == "__main__":
    main()
