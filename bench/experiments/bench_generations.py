"""Benchmark of issue 25, item 4: does the compressed model's text still read? The bundled model's default prompts.

    .venv/bin/python bench/experiments/bench_generations.py [--calib 16x256] [--source wiki] [--allocation nested]
        [--refine sequential] [--ratios 0.1,0.2,0.3] [--new-tokens 48] [--out bench/experiments/generations.json] [--write]

What the Side-by-side page gives at its defaults: greedy decoding, the chat template on, --new-tokens new tokens
(the app's 48), the three default prompts (evaluate.DEFAULT_PROMPTS), through the original model and through the
best path (dipsvd + --allocation, refined by --refine, one calibration of --calib windows x tokens of --source) at each
ratio, and unrefined too. Each generation's repetition measures (evaluate.repetition: the share of distinct
3-grams and the longest repeated span) are set against the original's: the target is a distinct-3-gram share of
at least 0.8x the original's at 0.1. --write replaces the "## Compressed text that reads (issue 25)" section of
bench/RESULTS.md (one per calibration and refine choice); --from-out writes it from --out, measured before.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent  # bench/experiments/: this script's results sit beside it
sys.path.insert(0, str(HERE.parent))  # bench/: common.py and the maintained scripts

from common import RESULTS, calib_size, load_bundled, machine, replace_section, utc_date, workbench

SECTION = "## Compressed text that reads (issue 25)"


def continuation_prompts(tokenizer, n: int, tokens: int = 24) -> list[str]:
    """The openings (`tokens` tokens) of the first n 512-token evaluation windows of news: text that neither the
    fit (wiki) nor the default prompts saw, continued without the chat template."""
    from dipsvd_core.engine.data import evaluation_windows

    windows = evaluation_windows(tokenizer, "news", 512, n * 512)
    return [tokenizer.decode(w[: tokens], skip_special_tokens=True).strip() for w in windows[:n]]  # a BOS is skipped


def run(args) -> dict:
    from dipsvd_core.engine.evaluate import DEFAULT_PROMPTS, generate
    from dipsvd_core.refine.sequential import summary
    from dipsvd_core.run.pipeline import Settings

    lm = load_bundled("cpu", "float32")
    windows, seqlen = calib_size(args.calib)
    bench = workbench(lm, windows, seqlen, calib=args.source)
    openings = continuation_prompts(lm.tokenizer, args.continuations) if args.continuations else []

    def gen(model) -> dict:
        out = {"chat": generate(model, lm.tokenizer, DEFAULT_PROMPTS, args.new_tokens, chat=True)}
        if openings:
            out["continued"] = generate(model, lm.tokenizer, openings, args.new_tokens)
        return out

    first = gen(lm.model)
    report = {"calib": args.calib, "source": args.source, "allocation": args.allocation, "refine": args.refine,
              "new_tokens": args.new_tokens, "original": first["chat"], "rows": []}
    if openings:
        report["continued"] = {"original": first["continued"]}
    for ratio in (float(r) for r in args.ratios.split(",")):
        s = Settings(method="dipsvd", allocation=args.allocation, ratio=ratio)
        plain = bench.build(s)
        unrefined = gen(plain.model)
        a = plain.allocation
        del plain
        refined = bench.build(replace(s, refine=args.refine), a)
        done = gen(refined.model)
        row = {"ratio": ratio, "unrefined": unrefined["chat"], "refined": done["chat"],
               "refine": summary(refined.info["refine"])}
        if openings:
            row["continued"] = {"unrefined": unrefined["continued"], "refined": done["continued"]}
        del refined
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
    return report


def continued(report: dict) -> list[str]:
    """The continuation summary: the mean share of distinct 3-grams over the openings, per model and ratio, and
    how many keep at least 0.8x the original's on the same opening."""
    if "continued" not in report:
        return []
    orig = report["continued"]["original"]
    mean = lambda gens: sum(g["distinct_3"] for g in gens) / len(gens)  # noqa: E731
    lines = [f"Continuations of {len(orig)} openings of held-out news (24 tokens each, no chat template, "
             f"{report['new_tokens']} new tokens, greedy): the original's mean share of distinct 3-grams is "
             f"{mean(orig):.2f}.", "", "| ratio | model | mean distinct 3-grams | at least 0.8x the original's |",
             "|---|---|---|---|"]
    for row in report["rows"]:
        for label in ("unrefined", "refined"):
            gens = row["continued"][label]
            kept = sum(g["distinct_3"] >= 0.8 * o["distinct_3"] for g, o in zip(gens, orig))
            lines.append(f"| {row['ratio']:g} | {label} | {mean(gens):.2f} | {kept} of {len(gens)} |")
    return [*lines, ""]


def from_safe(args) -> dict:
    """The report from bench/experiments/refine_safe.jsonl's rows of this calibration and allocation that hold generations."""
    rows = [json.loads(line) for line in open(HERE / "refine_safe.jsonl")]
    rows = [r for r in rows if r["calib"] == args.calib and r["allocation"] == args.allocation and "generations" in r
            and f"{r['ratio']:g}" in args.ratios.split(",") and r.get("source", "wiki") == args.source]
    return {"calib": args.calib, "source": args.source, "allocation": args.allocation, "refine": "sequential",
            "new_tokens": 48,
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
    lines += continued(report)
    lines.append(f"At {first['ratio']:g}, refined: every default prompt keeps at least 0.8x the original's share of "
                 f"distinct 3-grams: {'yes' if ok else '**no**'}.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calib", default="16x256")
    p.add_argument("--source", default="wiki", help="the calibration text")
    p.add_argument("--allocation", default="nested")
    p.add_argument("--refine", default="sequential")
    p.add_argument("--ratios", default="0.1,0.2,0.3")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--continuations", type=int, default=0, help="also continue this many openings of held-out "
                                                                  "news (no chat template)")
    p.add_argument("--out", default=str(HERE / "generations.json"))
    p.add_argument("--write", action="store_true")
    p.add_argument("--from-safe", action="store_true", help="take the generations bench_refine_safe.py recorded "
                                                           "(its rows of --source, --calib and --allocation) "
                                                           "instead of building")
    p.add_argument("--from-out", action="store_true", help="write the section from --out, measured before")
    args = p.parse_args()
    out = HERE / args.out.rsplit("/", 1)[-1]
    if args.from_out:
        report = json.loads(out.read_text())
    else:
        report = from_safe(args) if args.from_safe else run(args)
        out.write_text(json.dumps(report, indent=1))
    if args.write:
        source = report.get("source", "wiki")
        title = (f"{SECTION[:-1]}, {report['allocation']}, {report['calib']}"
                 f"{'' if source == 'wiki' else ' of ' + source}, refine {report['refine']}"
                 f"{', held-out continuations' if 'continued' in report else ''})")
        body = (f"{title}\n\nMachine: {machine()}. Date: {utc_date()}. Command: `{command(report, args.from_safe)}` "
                f"(bench/experiments/{out.name}). The Side-by-side page's defaults: greedy, chat template on, "
                f"{report['new_tokens']} new tokens, the three default prompts; dipsvd + {report['allocation']} on the "
                f"bundled SmolLM2-135M, calibration {report['calib']} of {source}.\n\n" + markdown(report))
        replace_section(RESULTS, title, body)


def command(report: dict, from_safe: bool) -> str:
    """The command that measured `report` (read from the report itself, so that --from-out names it right)."""
    ratios = ",".join(f"{r['ratio']:g}" for r in report["rows"])
    continuations = len(report["continued"]["original"]) if "continued" in report else 0
    source = report.get("source", "wiki")
    return (f".venv/bin/python bench/experiments/bench_generations.py --calib {report['calib']}"
            f"{'' if source == 'wiki' else ' --source ' + source} --allocation "
            f"{report['allocation']} --refine {report['refine']} --ratios {ratios} --new-tokens "
            f"{report['new_tokens']}{' --from-safe' if from_safe else ''}"
            f"{f' --continuations {continuations}' if continuations else ''} --write")

if __name__ == "__main__":
    main()
