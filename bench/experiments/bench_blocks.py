"""Issue 11, item 2, tried ideas: where the compression goes between blocks, against the heuristic at 0.1-0.4.

    .venv/bin/python bench/experiments/bench_blocks.py [--ratios 0.1,0.2,0.3,0.4] > bench/experiments/blocks.jsonl

Variants (the same realized ratio):
- heuristic, coupled: the two allocations as they are (`Workbench.allocate`);
- coupled-blocks: the coupled allocation's kept parameters per block, every matrix of a block at the block's keep
  fraction (is it where the coupled allocation cuts, or how it cuts inside a block, that loses at 0.3?);
- coupled-tempered: the coupled allocation with each weight w_m replaced by w_m^0.5 (weights shrunk towards equal);
- coupled-in-heuristic-blocks: the blocks the heuristic keeps dense stay dense; the coupled objective spreads the
  rest of the budget over the matrices of the other blocks, across blocks;
- block-curves: each block's own measured loss curve d_l(p), block l ALONE truncated at keep fraction p (every
  matrix at p) on the 4 held-out windows BO and the coupled probe use, p in CURVE_KEEPS (linear between them, 0 at
  1); the per-block keep fractions minimising sum_l d_l(p_l) within the budget (an exact DP on a 0.05 grid);
- block-curves-fixed: the same plus a fixed cost per compressed block, lambda, fitted so that the model predicts
  the uniform allocation's measured held-out loss at that ratio (the interaction the single-block curves miss).
Bundled SmolLM2-135M, dipsvd, 32 x 512 calibration windows of wiki; the first 4096 tokens of wiki and news (as in
bench_mix.py); factors, Fisher and the block probe from the user cache when present. One JSON line per point, the
first line the measured curves.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import replace

import numpy as np
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent  # bench/experiments/: this script's results sit beside it
sys.path.insert(0, str(HERE.parent))  # bench/: common.py and the maintained scripts

from common import eval_sets, load_bundled, print_row, workbench

from dipsvd_core.allocation import allocators
from dipsvd_core.allocation import budget as alloc
from dipsvd_core.allocation.bayes import Objective
from dipsvd_core.allocation.probes import block_sensitivity
from dipsvd_core.engine.evaluate import perplexity
from dipsvd_core.run.pipeline import Settings

CURVE_KEEPS = (0.1, 0.2, 0.35, 0.5, 0.7)
GRID = 0.05


def block_loss(curves: np.ndarray, keep) -> np.ndarray:
    """d_l(keep) per block (rows of `curves`, measured at CURVE_KEEPS): linear between the measured points, 0 at
    keep 1, a measured decrease counted as 0."""
    return np.array([np.interp(keep, [*CURVE_KEEPS, 1.0], [*c, 0.0]) for c in np.maximum(curves, 0.0)])


def curve_allocation(curves: np.ndarray, targets, ratio: float, fixed: float = 0.0) -> alloc.Allocation:
    """Per-block keep fractions minimising sum_l d_l(p_l) + fixed * [p_l < 1] with sum_l p_l <= n (1 - ratio)
    (blocks of equal size), exactly, on a GRID of keep fractions; then projected onto the budget."""
    grid = np.round(np.arange(CURVE_KEEPS[0], 1 + 1e-9, GRID), 2)
    cost = block_loss(curves, grid) + fixed * (grid < 1.0)
    units = np.round(grid / GRID).astype(int)
    cap = int(np.floor(len(curves) * (1 - ratio) / GRID + 1e-9))
    best = {0: (0.0, ())}  # units used -> (least cost, choice per block so far)
    for row in cost:
        nxt: dict[int, tuple[float, tuple]] = {}
        for used, (value, picks) in best.items():
            for j, u in enumerate(units):
                if used + u <= cap and (used + u not in nxt or value + row[j] < nxt[used + u][0]):
                    nxt[used + u] = (value + row[j], picks + (j,))
        best = nxt
    picks = min(best.values())[1]
    return alloc.project(grid[list(picks)], targets, ratio, 0.05, 1.0, method="block-curves")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="0.1,0.2,0.3,0.4")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    args = ap.parse_args()
    lm = load_bundled()
    wb = workbench(lm)
    base = Settings(method="dipsvd", allocation="coupled")
    targets, factors = wb.targets, wb.factors(base.spec)
    held = wb.heldout(base.bo_windows)
    evals = eval_sets(wb, args.eval_tokens)
    objective = Objective(lm.model, targets, factors, held)
    weights = wb.probes.coupled_weights(base)
    curves = np.array([block_sensitivity(lm.model, targets, factors, held, k) for k in CURVE_KEEPS]).T  # (blocks, keeps)
    print_row({"curve_keeps": CURVE_KEEPS, "curves": curves.round(4).tolist()})
    base_loss = math.log(objective({t.name: None for t in targets}))

    for ratio in [float(r) for r in args.ratios.split(",")]:
        heuristic = wb.allocate(replace(base, ratio=ratio, allocation="heuristic"))
        coupled = wb.allocate(replace(base, ratio=ratio))
        cut = {t.block for t in targets if heuristic.ranks[t.name] is not None}
        inside = [t for t in targets if t.block in cut]
        budget = (1 - ratio) * sum(t.params for t in targets) - sum(t.params for t in targets if t.block not in cut)
        sigmas = {t.name: factors[t.name].sigma.double().numpy() for t in inside}
        in_blocks = allocators.coupled_ranks(sigmas, weights, inside, budget, 0.05, 1.0)
        uniform = alloc.uniform(targets, ratio)
        measured = math.log(objective(uniform.ranks)) - base_loss
        predicted = float(block_loss(curves, 1 - ratio).sum())  # the same model the curve allocations minimise
        fixed = max(measured - predicted, 0.0) / len(curves)
        variants = {
            "heuristic": heuristic.ranks,
            "coupled": coupled.ranks,
            "coupled-blocks": alloc.project(coupled.p_blocks, targets, ratio, 0.05, 1.0).ranks,
            "coupled-tempered": allocators.coupled(factors, {k: v ** 0.5 for k, v in weights.items()}, targets,
                                                   ratio).ranks,
            "coupled-in-heuristic-blocks": {t.name: in_blocks.get(t.name) for t in targets},
            "block-curves": curve_allocation(curves, targets, ratio).ranks,
            "block-curves-fixed": curve_allocation(curves, targets, ratio, fixed).ranks,
        }
        for name, ranks in variants.items():
            held_ppl, ppl = objective.measure(ranks, lambda m: {s: perplexity(m, x) for s, x in evals.items()})
            dense = sum(all(ranks[t.name] is None for t in targets if t.block == b) for b in range(len(curves)))
            row = dict(variant=name, ratio=ratio, realized=alloc.realized_ratio(ranks, targets), heldout=held_ppl, **ppl,
                       dense_blocks=dense, **({"fixed_cost": fixed, "uniform_measured": measured,
                                               "uniform_predicted": predicted} if name == "block-curves-fixed" else {}))
            print_row(row)


if __name__ == "__main__":
    main()
