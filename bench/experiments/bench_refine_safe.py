"""Benchmark of issue 25: refining never makes the bundled model worse (the held-out check of refine.py).

    .venv/bin/python bench/experiments/bench_refine_safe.py [--source wiki] [--calibs 16x256,32x512]
        [--allocations uniform,heuristic,nested] [--ratios 0.1,0.2,0.3,0.4] [--eval-tokens 8192]
        [--out bench/experiments/refine_safe.jsonl] [--write]

For each calibration (windows x tokens of --source: wiki, or the default wiki-chat) one Workbench: every allocation at every ratio built unrefined and
refined (`--refine sequential`, the same allocation), both evaluated on the first --eval-tokens of wiki and news.
One JSON line per pair goes to --out as it is measured; a run given the same --out skips the pairs already there,
so an interrupted run resumes. --write replaces the "## Refine that never hurts (issue 25)" section of
bench/RESULTS.md with the table of every pair in --out.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent  # bench/experiments/: this script's results sit beside it
sys.path.insert(0, str(HERE.parent))  # bench/: common.py and the maintained scripts

from common import RESULTS, calib_size, eval_sets, load_bundled, machine, print_row, replace_section, utc_date, workbench

SECTION = "## Refine that never hurts (issue 25)"
KEEP = "### "


def measured(path) -> list[dict]:
    return [json.loads(line) for line in open(path)] if path.exists() else []


def generations(lm, model) -> list[dict]:
    """The Side-by-side page's defaults: the default prompts, greedy, chat template on, 48 new tokens."""
    from dipsvd_core.engine.evaluate import DEFAULT_PROMPTS, generate

    return generate(model, lm.tokenizer, DEFAULT_PROMPTS, 48, chat=True)


def pair(bench, allocation: str, ratio: float, sets: dict, generate: bool = False, how: str = "sequential") -> dict:
    from dipsvd_core.engine.evaluate import perplexity
    from dipsvd_core.refine.sequential import summary
    from dipsvd_core.run.pipeline import Settings

    s = Settings(method="dipsvd", allocation=allocation, ratio=ratio)
    t0 = time.perf_counter()
    plain = bench.build(s)
    row = {"allocation": allocation, "ratio": ratio, "ratio_realized": plain.allocation.ratio_realized,
           "unrefined": {n: perplexity(plain.model, w) for n, w in sets.items()}}
    if generate:
        row["generations"] = {"original": generations(bench.lm, bench.lm.model),
                              "unrefined": generations(bench.lm, plain.model)}
    a = plain.allocation
    del plain
    row["unrefined_s"] = time.perf_counter() - t0
    refined = bench.build(replace(s, refine=how), a)
    row["refined"] = {n: perplexity(refined.model, w) for n, w in sets.items()}
    if generate:
        row["generations"]["refined"] = generations(bench.lm, refined.model)
    info = refined.info["refine"]
    row.update(refine_s=info["seconds"], summary=summary(info),
               refined_blocks=sum(b["refined"] for b in info["blocks"]), blocks=len(info["blocks"]),
               taus={n: m["tau"] for b in info["blocks"] for n, m in b["matrices"].items() if b["refined"]})
    return row


def source_of(row: dict) -> str:
    return row.get("source", "wiki")  # the rows measured before wiki-chat existed are wiki's


def table(rows: list[dict]) -> str:
    lines = ["| text | calibration | allocation | ratio | unrefined wiki | refined wiki | unrefined news | refined news "
             "| blocks refined | refine s | never hurts |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = all(r["refined"][k] <= r["unrefined"][k] for k in r["unrefined"])
        lines.append(f"| {source_of(r)} | {r['calib']} | {r['allocation']} | {r['ratio']:g} | {r['unrefined']['wiki']:.2f} | "
                     f"{r['refined']['wiki']:.2f} | {r['unrefined']['news']:.2f} | {r['refined']['news']:.2f} | "
                     f"{r['refined_blocks']}/{r['blocks']} | {r['refine_s']:.0f} | {'yes' if ok else '**no**'} |")
    lines.append("")
    for source in dict.fromkeys(source_of(r) for r in rows):
        mine = [r for r in rows if source_of(r) == source]
        pairs = sum(len(r["unrefined"]) for r in mine)  # a pair: one build's perplexity on one set, refined and not
        held = sum(r["refined"][k] <= r["unrefined"][k] for r in mine for k in r["unrefined"])
        gain = sorted(r["refined"][k] / r["unrefined"][k] for r in mine for k in r["unrefined"])
        lines.append(f"- Calibrated on {source}: {held} of {pairs} pairs ({len(mine)} builds x "
                     f"{pairs // max(1, len(mine))} sets) have the refined perplexity at most the unrefined one. "
                     f"Refined / unrefined: {gain[0]:.3f} at best, median {gain[len(gain) // 2]:.3f}, {gain[-1]:.3f} "
                     "at worst.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--source", default="wiki", help="the calibration text (the rows before wiki-chat are wiki's)")
    p.add_argument("--calibs", default="16x256,32x512")
    p.add_argument("--allocations", default="uniform,heuristic,nested")
    p.add_argument("--ratios", default="0.1,0.2,0.3,0.4")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--out", default=str(HERE / "refine_safe.jsonl"))
    p.add_argument("--write", action="store_true")
    p.add_argument("--generate", default="nested", help="the allocations whose pairs also record the default prompts' "
                                                         "generations at the app's calibration (32x512)")
    args = p.parse_args()
    from pathlib import Path

    out = Path(args.out)
    done = {(source_of(r), r["calib"], r["allocation"], r["ratio"]) for r in measured(out)}
    lm = None
    for calib in args.calibs.split(","):
        todo = [(a, float(x)) for a in args.allocations.split(",") for x in args.ratios.split(",")
                if (args.source, calib, a, float(x)) not in done]
        if not todo:
            continue
        lm = lm or load_bundled("cpu", "float32")
        windows, seqlen = calib_size(calib)
        bench = workbench(lm, windows, seqlen, calib=args.source)
        sets = eval_sets(bench, args.eval_tokens)
        for allocation, ratio in todo:
            gen = calib == "32x512" and allocation in args.generate.split(",")
            row = {"source": args.source, "calib": calib, **pair(bench, allocation, ratio, sets, gen),
                   "date": utc_date()}
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print_row(row)
        del bench
    if args.write:
        rows = measured(out)
        body = (f"{SECTION}\n\nMachine: {machine()}. Date: {utc_date()}. Command: `.venv/bin/python "
                f"bench/experiments/bench_refine_safe.py --source {args.source} --calibs {args.calibs} --eval-tokens "
                f"{args.eval_tokens} --write` (rows in bench/experiments/{out.name}; the wiki rows by the same command with "
                "--source wiki --calibs 16x256,32x512). dipsvd on the bundled SmolLM2-135M, calibration on the "
                "text of the first column, "
                f"perplexity on the first {args.eval_tokens} tokens of wiki and news (in windows of the "
                "calibration's length), each refined build against the unrefined one of the same allocation.\n\n"
                + table(rows))
        replace_section(RESULTS, SECTION, body, keep_from=KEEP)


if __name__ == "__main__":
    main()
