"""Benchmark of issue 25, item 2: how the refined and unrefined quality move with the calibration size.

    .venv/bin/python bench/experiments/bench_calib_size.py [--sizes 4x256,8x256,...] [--allocations nested,heuristic]
        [--ratios 0.2,0.3] [--eval-tokens 4096] [--threads 1] [--out bench/experiments/calib_size.jsonl] [--write]

For each calibration size (windows x tokens of wiki) one Workbench and, per allocation and ratio, the pair of
bench_refine_safe.py (dipsvd unrefined, then refined with the same allocation), with the seconds of the passes the
size drives (statistics, Fisher, factors, type probe, refine). One JSON line per pair to --out, resumable. --write
replaces the "## Calibration size (issue 25)" section of bench/RESULTS.md with the table of --out and, where the
pair is there, bench/experiments/refine_safe.jsonl's rows of the same size (evaluated on 8192 tokens instead).
"""
from __future__ import annotations

import argparse
import json
import os

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent  # bench/experiments/: this script's results sit beside it
sys.path.insert(0, str(HERE.parent))  # bench/: common.py and the maintained scripts

from bench_refine_safe import measured, pair
from common import RESULTS, calib_size, eval_sets, load_bundled, machine, replace_section, utc_date, workbench

SECTION = "## Calibration size (issue 25)"
KEEP = "### "
PASSES = ("statistics", "fisher", "factors", "type probe")


def refine_of(row: dict) -> str:
    """The refined build's --refine choice (rows before --refine existed were all sequential)."""
    return row.get("refine", "sequential")


def eval_tokens_of(row: dict) -> int:
    """The tokens each evaluation set had (bench_refine_safe.py's rows do not say: 8192)."""
    return row.get("eval_tokens", 8192)


def originals(rows: list[dict], path) -> dict:
    """The original model's perplexity on wiki and news for every (window length, eval tokens) of `rows`: the
    windows differ by calibration length, so each pair is set against the original on the same windows. Kept in
    `path` (JSON lines) so --write measures each once."""
    known = {(r["seqlen"], r["eval_tokens"]): r for r in measured(path)}
    need = {(int(r["calib"].split("x")[1]), eval_tokens_of(r)) for r in rows} - set(known)
    if need:
        from dipsvd_core.engine.data import evaluation_windows
        from dipsvd_core.engine.evaluate import perplexity

        lm = load_bundled("cpu", "float32")
        for seqlen, tokens in sorted(need):
            row = {"seqlen": seqlen, "eval_tokens": tokens, "date": utc_date(),
                   **{n: perplexity(lm.model, evaluation_windows(lm.tokenizer, n, seqlen, tokens))
                      for n in ("wiki", "news")}}
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
            known[seqlen, tokens] = row
    return known


def table(rows: list[dict], orig: dict) -> str:
    def key(r):
        w, t = calib_size(r["calib"])
        return r["allocation"], r["ratio"], t, w, refine_of(r)

    lines = ["| allocation | ratio | calibration | tokens | refine | original wiki | unrefined wiki | refined wiki "
             "| original news | unrefined news | refined news | blocks refined | passes s | refine s | eval tokens |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=key):
        w, t = calib_size(r["calib"])
        passes = sum(r.get("passes_s", {}).values())
        tokens = eval_tokens_of(r)
        o = orig[t, tokens]
        lines.append(f"| {r['allocation']} | {r['ratio']:g} | {r['calib']} | {w * t} | {refine_of(r)} "
                     f"| {o['wiki']:.2f} | {r['unrefined']['wiki']:.2f} | {r['refined']['wiki']:.2f} "
                     f"| {o['news']:.2f} | {r['unrefined']['news']:.2f} | {r['refined']['news']:.2f} "
                     f"| {r['refined_blocks']}/{r['blocks']} | {passes:.0f} | {r['refine_s']:.0f} | {tokens} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="4x256,8x256,32x256,64x256,8x512,16x512")
    p.add_argument("--allocations", default="nested")
    p.add_argument("--ratios", default="0.2,0.3")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--refine", default="sequential", help="the refined build's --refine choice")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=str(HERE / "calib_size.jsonl"))
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    from pathlib import Path

    import torch

    if args.threads:
        os.environ["DIPSVD_STUDIO_THREADS"] = str(args.threads)  # cores.share keeps it
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    done = {(r["calib"], r["allocation"], r["ratio"], refine_of(r)) for r in measured(out)}
    lm = None
    for calib in args.sizes.split(","):
        todo = [(a, float(x)) for a in args.allocations.split(",") for x in args.ratios.split(",")
                if (calib, a, float(x), args.refine) not in done]
        if not todo:
            continue
        lm = lm or load_bundled("cpu", "float32")
        windows, seqlen = calib_size(calib)
        bench = workbench(lm, windows, seqlen)
        sets = eval_sets(bench, args.eval_tokens)
        for allocation, ratio in todo:
            row = {"calib": calib, **pair(bench, allocation, ratio, sets, how=args.refine), "refine": args.refine,
                   "eval_tokens": args.eval_tokens, "threads": torch.get_num_threads(),
                   "passes_s": {k: v for k, v in bench.timings_s.items() if k in PASSES}, "date": utc_date()}
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
        del bench
    if args.write:
        rows = measured(out) + [r for r in measured(HERE / "refine_safe.jsonl")
                                if r["allocation"] in args.allocations.split(",")
                                and f"{r['ratio']:g}" in args.ratios.split(",")]
        body = (f"{SECTION}\n\nMachine: {machine()}. Date: {utc_date()}. Command: `.venv/bin/python "
                f"bench/experiments/bench_calib_size.py --sizes {args.sizes} --allocations {args.allocations} --ratios "
                f"{args.ratios} --eval-tokens {args.eval_tokens} --write` (rows in bench/experiments/{out.name}; the 16 x 256 "
                "and 32 x 512 rows are bench_refine_safe.py's, on 8192 tokens). dipsvd on the bundled SmolLM2-135M, "
                "calibration on wiki; passes s: the cold statistics, Fisher, factor and type-probe passes of that "
                "size (run once per size, shared by its pairs; 0 for rows that do not record them, or where they were "
                "cached); original: the uncompressed model on the same evaluation windows (the calibration's "
                "length), since perplexity in 256-token windows is higher than in 512-token ones.\n\n"
                + table(rows, originals(rows, HERE / "calib_size_original.jsonl")))
        replace_section(RESULTS, SECTION, body, keep_from=KEEP)


if __name__ == "__main__":
    main()
