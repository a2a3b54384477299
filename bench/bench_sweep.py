"""Benchmark of issue 3 (global importance): the full sweep on the bundled model.

SmolLM2-135M (bundled, dequantized from 4-bit GGUF); 32 calibration windows x 512 tokens from
`wiki`; perplexity on `wiki` and `news` (--eval-tokens each, in 512-token windows); ratios 0.1,
0.2, 0.3; the default grid (the paper's Table 6 ablation, the svd/fwsvd/asvd baselines and our
coupled allocator). Every allocation is timed; the `bayes` rows are BO runs of --bo-calls (30)
evaluations each, timed whole and per call. Writes bench/sweep_smollm.json and .md (rewritten
after every row, so a partial run still leaves its rows) and prints the target checks.

    .venv/bin/python bench/bench_sweep.py [--eval-tokens 16384] [--bo-calls 30] [--ratios 0.1,0.2,0.3]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from common import BENCH, CALIBRATION, eval_sets, load_bundled, machine, workbench, write_json

from dipsvd_core.outputs.sweep import markdown, parse_grid, parse_ratios, run_sweep
from dipsvd_core.run.pipeline import Settings, peak_memory_mb


def checks(report: dict) -> list[str]:
    """The issue's targets, stated with the figures."""
    rows = {(r["method"], r["allocation"], r["ratio"]): r for r in report["rows"]}
    sets, out = report["eval_sets"], []
    chain = [("svd-llm", "uniform"), ("dipsvd", "uniform"), ("dipsvd", "heuristic")]
    for ratio in report["ratios"]:
        for s in sets:
            vals = [rows[(m, a, ratio)]["ppl"][s] for m, a in chain if (m, a, ratio) in rows]
            if len(vals) == 3:
                ok = vals[0] > vals[1] > vals[2]
                out.append(f"(a) ratio {ratio:g} {s}: SVD-LLM {vals[0]:.2f} -> Step 1 {vals[1]:.2f} -> Step 1+2 "
                           f"{vals[2]:.2f}: {'each step improves' if ok else 'NOT monotone'}")
            s2 = rows.get(("svd-llm", "heuristic", ratio))
            if s2 and len(vals) == 3:
                out.append(f"    Step 2 alone (svd-llm + heuristic) {s2['ppl'][s]:.2f}")
    for ratio in (0.1, 0.2):
        base = {s: rows[("svd-llm", "uniform", ratio)]["ppl"][s] for s in sets} if ("svd-llm", "uniform", ratio) in rows else None
        if not base:
            continue
        dip = [r for (m, a, q), r in rows.items() if m == "dipsvd" and q == ratio]
        if not dip:
            continue
        # "best allocation" = the lowest wiki ppl (the in-domain set); both sets are then checked.
        best = min(dip, key=lambda r: r["ppl"][sets[0]])
        gains = {s: 1 - best["ppl"][s] / base[s] for s in sets}
        ok = all(g >= 0.10 for g in gains.values())
        out.append(f"(b) ratio {ratio:g}: dipsvd+{best['allocation']} vs svd-llm+uniform: " +
                   ", ".join(f"{s} {best['ppl'][s]:.2f} vs {base[s]:.2f} ({100 * gains[s]:+.1f}% lower)" for s in sets) +
                   f": {'met' if ok else 'MISSED'} (target >= 10% lower on both)")
    for r in report["rows"]:
        if r["allocation"] == "bayes":
            n = r.get("bo_calls", 0)
            out.append(f"(c) BO ratio {r['ratio']:g}: {n} calls in {r['allocation_s']:.0f} s "
                       f"({r['allocation_s'] / max(n, 1):.1f} s/call): {'met' if r['allocation_s'] < 600 else 'MISSED'} "
                       "(target < 10 min)")
    return out


SECTION = "## Global importance (issue 3)"


def run(grid: str | None, ratios: str, eval_tokens: int, out: str, base: Settings) -> dict:
    """The sweep on the bundled model with the benchmark's calibration; <out>.json and <out>.md are
    rewritten after every row, so a partial run still leaves its rows."""
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t_all = time.perf_counter()
    lm = load_bundled(device="cpu", dtype="float32")
    bench = workbench(lm)
    sets = eval_sets(lm, eval_tokens)

    def write(report):
        report.update(model=lm.spec, dequantized_from_gguf=lm.from_gguf, started=started,
                      machine=machine(), command=" ".join([".venv/bin/python", *sys.argv]),
                      calibration=dict(CALIBRATION))
        write_json(out + ".json", report, default=str)
        Path(out + ".md").write_text(markdown(report))
        print(f"[{time.perf_counter() - t_all:7.0f} s] rows done: {len(report['rows'])}", flush=True)

    report = run_sweep(bench, base, parse_grid(grid), parse_ratios(ratios), sets, on_row=write)
    report["timings_s"]["total"] = time.perf_counter() - t_all
    report["peak_memory_mb"] = peak_memory_mb()
    write(report)
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--bo-calls", type=int, default=30)
    ap.add_argument("--ratios", default="0.1,0.2,0.3")
    ap.add_argument("--grid", default=None)
    ap.add_argument("--out", default=str(BENCH / "sweep_smollm"))
    args = ap.parse_args()
    report = run(args.grid, args.ratios, args.eval_tokens, args.out, Settings(bo_calls=args.bo_calls, refine="none"))
    report["checks"] = checks(report)
    write_json(args.out + ".json", report, default=str)
    print(markdown(report))
    print("\n".join(report["checks"]))
    print("timings:", json.dumps({k: round(v, 1) for k, v in report["timings_s"].items()}))


if __name__ == "__main__":
    main()
