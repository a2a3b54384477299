"""How fast the model writes its own text (engine/self_text.py: the `self` source and distillation's own text), by
group size, against the plan's writing phase.

    .venv/bin/python bench/bench_writing.py [--batches 8,16,32,64] [--write]

For each group size, one group of the bundled model's documents (float32, this CPU), sampled as the product samples
them (seed 123, group 0, so no cached stream is read or written): its seconds, the tokens it adds to the stream
(prompts and continuations) and their rate. The plan's writing seconds for 96 windows of 512 tokens of distillation's
own text are given beside it at the group size the product uses (self_text.BATCH), with the measured time of those
windows at each group size. --write replaces the "## Writing the model's text" section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import math
import time

from common import MODEL, RESULTS, load_bundled, machine, print_row, replace_section, utc_date

SECTION = "## Writing the model's text"
OWN_WINDOWS, SEQLEN = 96, 512  # the panel's own-text row


def measure(lm, batch: int) -> dict:
    from dipsvd_core.engine import self_text

    product = self_text.BATCH
    self_text.BATCH = batch  # prompts() and write_group() read it at call time
    try:
        t0 = time.perf_counter()
        docs = self_text.write_group(lm.model, lm.tokenizer, 0, seed=123)
        seconds = time.perf_counter() - t0
    finally:
        self_text.BATCH = product
    sep = len(lm.tokenizer("\n\n", add_special_tokens=False)["input_ids"])
    tokens = sum(len(d) + sep for d in docs)  # each document and its blank-line separator, as the stream joins them
    return {"batch": batch, "seconds": round(seconds, 1), "tokens": tokens, "rate": round(tokens / seconds, 1)}


def planned_seconds() -> float:
    from dipsvd_core.plan.plan import make_plan
    from dipsvd_core.plan.shapes import run_of
    from dipsvd_core.refine.choices import DistillConfig

    run = run_of(calib="wiki", seqlen=SEQLEN, distill=DistillConfig(epochs=1, own_text=OWN_WINDOWS))
    return make_plan(MODEL, "cpu", run).phases["writing"].seconds


def report(rows: list[dict], planned: float) -> str:
    from dipsvd_core.engine.self_text import BATCH

    need = OWN_WINDOWS * SEQLEN
    lines = [SECTION, "", f"{utc_date()}, {machine()}, the bundled model in float32. Command: `.venv/bin/python "
             f"bench/bench_writing.py --batches {','.join(str(r['batch']) for r in rows)} --write`.", "",
             f"| documents a group | seconds a group | tokens a group | tokens / s | {OWN_WINDOWS} x {SEQLEN} tokens, "
             "from one group (s) |", "|---|---|---|---|---|"]
    for r in rows:
        whole = math.ceil(need / r["tokens"]) * r["seconds"]
        mark = " (the product's)" if r["batch"] == BATCH else ""
        lines.append(f"| {r['batch']}{mark} | {r['seconds']} | {r['tokens']:,} | {r['rate']} | {whole:.0f} |")
    lines += ["", f"The plan's writing phase for {OWN_WINDOWS} windows of {SEQLEN} tokens of distillation's own text "
              f"at {BATCH} documents a group: {planned:.0f} s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="8,16,32,64")
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    lm = load_bundled("cpu", "float32")
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        rows.append(measure(lm, batch))
        print_row(rows[-1])
    planned = planned_seconds()
    print(report(rows, planned))
    if args.write:
        replace_section(RESULTS, SECTION, report(rows, planned), keep_from="### ")


if __name__ == "__main__":
    main()
