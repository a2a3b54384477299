"""Issue 36, item 1: the paper's R_l against the trimmed one (massive hidden dimensions set aside), heuristic
allocation, at each ratio, unrefined and refined, on wiki, news and the quality panel.

    .venv/bin/python bench/bench_rank_of.py [--ratios 0.2,0.3] [--calib 32x512] [--source wiki-chat]
        [--eval-tokens 4096] [--out bench/rank_of.jsonl] [--write]

One Workbench on the bundled SmolLM2-135M (its statistics, factors and Fisher shared by every row); each row is
dipsvd + heuristic with `rank_of` output (the paper's, the default) or trimmed, refine none or sequential. Perplexity
on the first --eval-tokens tokens of each text's evaluation half, in windows of the calibration's length; the
blocks kept dense and the lowest p_l. Rows go to --out as JSON lines as they finish (a rerun skips those there);
--write replaces the "## The paper's R_l against the trimmed one (issue 36)" section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import BENCH, RESULTS, calib_size, load_bundled, machine, replace_section, utc_date, workbench

SECTION = "## The paper's R_l against the trimmed one (issue 36)"
TEXTS = ("wiki", "news", "python-docs", "kjv", "fortunes")


def _row(bench, sets, ratio: float, rank_of: str, refine: str) -> dict:
    from dipsvd_core.engine.evaluate import perplexity
    from dipsvd_core.run.pipeline import Settings

    t0 = time.perf_counter()
    built = bench.build(Settings(method="dipsvd", allocation="heuristic", ratio=ratio, rank_of=rank_of, refine=refine))
    p = built.allocation.p_blocks
    return {"ratio": ratio, "rank_of": rank_of, "refine": refine,
            "ppl": {n: round(perplexity(built.model, w), 3) for n, w in sets.items()},
            "dense_blocks": [int(b) for b in range(len(p)) if p[b] >= 1.0],
            "lowest_p": [round(float(p.min()), 3), int(p.argmin())], "build_s": round(time.perf_counter() - t0, 1)}


def markdown(rows: list[dict], command: str) -> str:
    original = next(r for r in rows if r.get("original"))["ppl"]
    lines = [SECTION, "", f"Machine: {machine()}. Date: {utc_date()}. Command: `{command}` (rows in bench/rank_of.jsonl). "
             "dipsvd + heuristic on the bundled SmolLM2-135M; each cell the perplexity as a multiple of the original's "
             "on the same windows (the original's perplexity in the first row); wiki and news are evaluated on their "
             "evaluation halves, and the panel texts are in no calibration source.", "",
             "| ratio | R_l of | refine | " + " | ".join(TEXTS) + " | blocks dense | lowest p_l (block) |",
             "|---|---|---|" + "---|" * (len(TEXTS) + 2),
             "| original | | | " + " | ".join(f"{original[t]:.2f}" for t in TEXTS) + " | | |"]
    for r in sorted((r for r in rows if not r.get("original")), key=lambda r: (r["ratio"], r["refine"], r["rank_of"])):
        lines.append(f"| {r['ratio']} | {r['rank_of']} | {r['refine']} | "
                     + " | ".join(f"{r['ppl'][t] / original[t]:.2f}x" for t in TEXTS)
                     + f" | {len(r['dense_blocks'])} | {r['lowest_p'][0]} ({r['lowest_p'][1]}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratios", default="0.2,0.3")
    p.add_argument("--calib", default="32x512")
    p.add_argument("--source", default="wiki-chat")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--out", default=str(BENCH / "rank_of.jsonl"))
    p.add_argument("--write", action="store_true")
    p.add_argument("--from-out", action="store_true", help="only write the section from --out")
    args = p.parse_args()
    out = Path(args.out)
    rows = [json.loads(ln) for ln in out.read_text().splitlines() if ln.strip()] if out.exists() else []
    if not args.from_out:
        from dipsvd_core.engine.evaluate import perplexity

        lm = load_bundled("cpu", "float32")
        windows, seqlen = calib_size(args.calib)
        bench = workbench(lm, windows, seqlen, calib=args.source)
        sets = {t: bench.eval_windows(t, args.eval_tokens) for t in TEXTS}
        done = {(r.get("ratio"), r.get("rank_of"), r.get("refine")) for r in rows}
        if not any(r.get("original") for r in rows):
            rows.append({"original": True, "ppl": {n: round(perplexity(lm.model, w), 3) for n, w in sets.items()}})
            with out.open("a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
        for refine in ("none", "sequential"):
            for ratio in (float(x) for x in args.ratios.split(",")):
                for rank_of in ("output", "trimmed"):
                    if (ratio, rank_of, refine) in done:
                        continue
                    row = _row(bench, sets, ratio, rank_of, refine)
                    rows.append(row)
                    with out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(json.dumps(row), flush=True)
    if args.write:
        command = (f".venv/bin/python bench/bench_rank_of.py --ratios {args.ratios} --calib {args.calib} --source "
                   f"{args.source} --eval-tokens {args.eval_tokens} --write")
        replace_section(RESULTS, SECTION, markdown(rows, command), keep_from="### ")


if __name__ == "__main__":
    main()
