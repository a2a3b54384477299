"""Benchmark of issue 25, item 4: does the compressed model's text still read? The bundled model's default prompts.

    .venv/bin/python bench/bench_generations.py [--calib 16x256] [--allocation nested] [--refine sequential]
        [--ratios 0.1,0.2,0.3] [--new-tokens 48] [--out bench/generations.json] [--write]

What the Side-by-side page gives at its defaults: greedy decoding, the chat template on, --new-tokens new tokens
(the app's 48), the three default prompts (evaluate.DEFAULT_PROMPTS), through the original model and through the
best path (dipsvd + --allocation, refined by --refine, one calibration of --calib windows x tokens of wiki) at each
ratio, and unrefined too. Each generation's repetition measures (evaluate.repetition: the share of distinct
3-grams and the longest repeated span) are set against the original's: the target is a distinct-3-gram share of
at least 0.8x the original's at 0.1. --write replaces the "## Compressed text that reads (issue 25)" section of
bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace

from common import BENCH, RESULTS, load_bundled, machine, replace_section, utc_date, workbench

SECTION = "## Compressed text that reads (issue 25)"


def run(args) -> dict:
    from dipsvd_core.evaluate import DEFAULT_PROMPTS, generate
    from dipsvd_core.pipeline import Settings
    from dipsvd_core.refine import summary

    lm = load_bundled("cpu", "float32")
    windows, seqlen = (int(v) for v in args.calib.split("x"))
    bench = workbench(lm, windows, seqlen)
    gen = lambda model: generate(model, lm.tokenizer, DEFAULT_PROMPTS, args.new_tokens, chat=True)  # noqa: E731
    report = {"calib": args.calib, "allocation": args.allocation, "refine": args.refine,
              "new_tokens": args.new_tokens, "original": gen(lm.model), "rows": []}
    for ratio in (float(r) for r in args.ratios.split(",")):
        s = Settings(method="dipsvd", allocation=args.allocation, ratio=ratio)
        plain = bench.build(s)
        row = {"ratio": ratio, "unrefined": gen(plain.model)}
        a = plain.allocation
        del plain
        refined = bench.build(replace(s, refine=args.refine), a)
        row["refined"], row["refine"] = gen(refined.model), summary(refined.info["refine"])
        del refined
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
    return report


def from_safe(args) -> dict:
    """The report from bench/refine_safe.jsonl's rows of this calibration and allocation that hold generations."""
    rows = [json.loads(line) for line in open(BENCH / "refine_safe.jsonl")]
    rows = [r for r in rows if r["calib"] == args.calib and r["allocation"] == args.allocation and "generations" in r
            and f"{r['ratio']:g}" in args.ratios.split(",")]
    return {"calib": args.calib, "allocation": args.allocation, "refine": "sequential", "new_tokens": 48,
            "original": rows[0]["generations"]["original"],
            "rows": [{"ratio": r["ratio"], "unrefined": r["generations"]["unrefined"],
                      "refined": r["generations"]["refined"], "refine": r["summary"]} for r in rows]}


def markdown(report: dict) -> str:
    orig = report["original"]
    lines = []
    for row in report["rows"]:
        lines.append(f"Ratio {row['ratio']:g} ({row['refine']}):\n")
        lines.append("| prompt | model | distinct 3-grams | vs original | longest repeat | text |")
        lines.append("|---|---|---|---|---|---|")
        for i, o in enumerate(orig):
            for label, g in (("original", o), ("unrefined", row["unrefined"][i]),
                             (f"refined ({report['refine']})", row["refined"][i])):
                vs = g["distinct_3"] / o["distinct_3"] if o["distinct_3"] else 0.0
                text = " ".join(g["text"].split()).replace("|", "\\|")
                lines.append(f"| {o['prompt']} | {label} | {g['distinct_3']:.2f} | {vs:.2f}x | "
                             f"{g['longest_repeat']} | {text} |")
        lines.append("")
    first = report["rows"][0]
    ok = all(g["distinct_3"] >= 0.8 * o["distinct_3"] for g, o in zip(first["refined"], orig))
    lines.append(f"At {first['ratio']:g}, refined: every default prompt keeps at least 0.8x the original's share of "
                 f"distinct 3-grams: {'yes' if ok else '**no**'}.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calib", default="16x256")
    p.add_argument("--allocation", default="nested")
    p.add_argument("--refine", default="sequential")
    p.add_argument("--ratios", default="0.1,0.2,0.3")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--out", default=str(BENCH / "generations.json"))
    p.add_argument("--write", action="store_true")
    p.add_argument("--from-safe", action="store_true", help="take the generations bench_refine_safe.py recorded "
                                                           "(its 16x256 rows of --allocation) instead of building")
    args = p.parse_args()
    report = from_safe(args) if args.from_safe else run(args)
    (BENCH / args.out.rsplit("/", 1)[-1]).write_text(json.dumps(report, indent=1))
    if args.write:
        body = (f"{SECTION}\n\nMachine: {machine()}. Date: {utc_date()}. Command: `.venv/bin/python "
                f"bench/bench_generations.py --calib {args.calib} --allocation {args.allocation} --refine "
                f"{args.refine} --ratios {args.ratios} --new-tokens {args.new_tokens} --write` (bench/"
                f"{args.out.rsplit('/', 1)[-1]}). The Side-by-side page's defaults: greedy, chat template on, "
                f"{args.new_tokens} new tokens, the three default prompts; dipsvd + {args.allocation} on the "
                f"bundled SmolLM2-135M, calibration {args.calib} of wiki.\n\n" + markdown(report))
        replace_section(RESULTS, SECTION, body)


if __name__ == "__main__":
    main()
