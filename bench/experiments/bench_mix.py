"""Issue 11, item 2, tried ideas: choose between the coupled and the heuristic allocation on held-out text;
raise the coupled allocation's per-matrix floor.

    .venv/bin/python bench/experiments/bench_mix.py [--ratios 0.1,0.2,0.3,0.4] [--eval-tokens 4096] [--out bench/experiments/mix.json]
    .venv/bin/python bench/experiments/bench_mix.py --p-min 0.05,0.15,0.25,0.35 --ratios 0.3,0.4 --out bench/experiments/mix_pmin.json

For each ratio, the per-matrix parameter counts of the two allocations are mixed, c_m(w) = (1 - w) c_m(coupled)
+ w c_m(heuristic), w in {0, 0.25, 0.5, 0.75, 1} (a mixed count is turned into a rank by rounding down, so a
mixed point removes up to 0.1% more than the target). Each point is measured on the 4 held-out calibration
windows BO and the coupled probe use, and on the first --eval-tokens tokens of wiki and news: if the held-out
loss ranked the points as the evaluation does, picking the best w there would make the coupled allocation
never worse than the heuristic. Bundled SmolLM2-135M, dipsvd, 32 x 512 calibration windows of wiki; the factors,
Fisher and probe come from the user cache when present.

With --p-min, the coupled allocation alone at each floor p_min (the smallest fraction of its parameters a
matrix keeps), with the mean keep fraction per matrix type.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent  # bench/experiments/: this script's results sit beside it
sys.path.insert(0, str(HERE.parent))  # bench/: common.py and the maintained scripts

from common import eval_sets, load_bundled, print_row, workbench, write_json

from dipsvd_core.allocation import allocators
from dipsvd_core.allocation import budget as alloc
from dipsvd_core.allocation.bayes import Objective
from dipsvd_core.allocation.budget import DENSE
from dipsvd_core.engine.evaluate import perplexity
from dipsvd_core.run.pipeline import Settings


def mix(a: dict, b: dict, w: float, targets) -> dict:
    """Per matrix, the rank whose parameters are closest below (1 - w) cost(a) + w cost(b); dense at full cost."""
    out = {}
    for t in targets:
        c = sum(f * alloc.matrix_params(r[t.name], t.out_features, t.in_features) for f, r in ((1 - w, a), (w, b)))
        if c >= t.params - 0.5:
            out[t.name] = DENSE
        else:
            cap = allocators._rank_bounds(t, 0.0, 1.0)[1]  # the largest rank cheaper than dense
            out[t.name] = max(1, min(int(c // (t.out_features + t.in_features)), cap))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="0.1,0.2,0.3,0.4")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--out", default=str(HERE / "mix.json"))
    ap.add_argument("--p-min", default=None, help="comma-separated floors: the coupled allocation at each")
    args = ap.parse_args()
    lm = load_bundled()
    wb = workbench(lm)
    base = Settings(method="dipsvd", allocation="coupled")
    evals = eval_sets(wb, args.eval_tokens)
    objective = Objective(lm.model, wb.targets, wb.factors(base.spec), wb.heldout(base.bo_windows))
    rows = []
    for ratio in [float(r) for r in args.ratios.split(",")] if args.p_min else []:
        for p_min in [float(p) for p in args.p_min.split(",")]:
            a = wb.allocate(replace(base, ratio=ratio, p_min=p_min))
            kinds: dict[str, list[float]] = {}
            for t in wb.targets:
                keep = alloc.matrix_params(a.ranks[t.name], t.out_features, t.in_features) / t.params
                kinds.setdefault(t.name.rsplit(".", 1)[-1], []).append(keep)
            _, ppl = objective.measure(a.ranks, lambda m: {s: perplexity(m, x) for s, x in evals.items()})
            rows.append(dict(ratio=ratio, p_min=p_min, **ppl, keep_by_type={k: sum(v) / len(v) for k, v in kinds.items()}))
            print_row(rows[-1])
    for ratio in [float(r) for r in args.ratios.split(",")] if not args.p_min else []:
        coupled = wb.allocate(replace(base, ratio=ratio))
        heuristic = wb.allocate(replace(base, ratio=ratio, allocation="heuristic"))
        for w in (0.0, 0.25, 0.5, 0.75, 1.0):
            ranks = mix(coupled.ranks, heuristic.ranks, w, wb.targets)
            t0 = time.perf_counter()
            held, ppl = objective.measure(ranks, lambda m: {s: perplexity(m, x) for s, x in evals.items()})
            rows.append(dict(ratio=ratio, w=w, realized=alloc.realized_ratio(ranks, wb.targets), heldout=held, **ppl,
                             seconds=time.perf_counter() - t0))
            print_row(rows[-1])
    write_json(args.out, {"eval_tokens": args.eval_tokens, "rows": rows})


if __name__ == "__main__":
    main()
