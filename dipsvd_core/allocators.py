"""Step 4b of the flow: allocations beyond uniform. Every one ends in `allocation.project` or meets
the same budget exactly, so all of them are compared at the same realized size.

- `heuristic`: p_l proportional to Q_l (DipSVD Eq. 13), through the projector.
- `coupled` (ours, not in the paper): one rank per MATRIX chosen jointly. For matrix m with
  whitened loss curve L_m(k) = sqrt(sum_{i>k} sigma_i^2) (read off its cached factors) we minimise
      sum_m w_m L_m(k_m)^2   subject to   sum_m cost_m(k_m) <= budget,
  cost_m(k) = k (out + in), or out * in when kept dense (which loses nothing). Ranks with
  k (out + in) >= out * in are never chosen: dense costs no more and is exact.
  The weight makes the terms comparable across matrices. L_m(k)^2 / L_m(0)^2 is the squared
  RELATIVE whitened error, invariant to how the layer is scaled. A second-order estimate of the
  loss increase for a perturbation of relative size e spread over the matrix is
  0.5 e^2 ||W_m||_F^2 tr(F_m) / P_m, with tr(F_m) the empirical Fisher trace (mean over windows of
  ||grad||_F^2) and P_m = out * in. So
      w_m = ||W_m||_F^2 * tr(F_m) / P_m / L_m(0)^2,
  which is also invariant to the reparametrisation W -> cW, x -> x / c (unlike ||g|| / ||W||).
  Solver: the lower convex hull of each matrix's (cost, loss) points, with all hull segments taken
  in order of loss reduction per parameter (exact for the convexified problem), then the leftover
  budget filled with single steps. Because the hull can skip points, that greedy is not always
  optimal for the integer problem; when the problem is small (cost units x options <= EXACT_LIMIT)
  an exact dynamic programme over the budget is used instead.
"""
from __future__ import annotations

import math
from functools import reduce

import numpy as np

from . import allocation as alloc
from .allocation import DENSE, Allocation, project
from .errors import DipSVDError
from .models import Target

EXACT_LIMIT = 4_000_000  # DP cells (budget units x options) below which the exact solver runs


def heuristic(Q, targets: list[Target], ratio: float, p_min: float = 0.05, p_max: float = 1.0) -> Allocation:
    """p_l proportional to Q_l, projected onto the budget: a higher Q keeps more."""
    Q = np.asarray(Q, dtype=np.float64)
    n_blocks = 1 + max(t.block for t in targets)
    if Q.shape != (n_blocks,):
        raise DipSVDError(f"need one importance score per block ({n_blocks}); got shape {Q.shape}")
    return project(Q, targets, ratio, p_min, p_max, method="heuristic")


def coupled_weights(factors, fisher, weights_norm2: dict[str, float], targets: list[Target]) -> dict[str, float]:
    """w_m = ||W_m||_F^2 * tr(F_m) / P_m / L_m(0)^2 (see the module docstring)."""
    out = {}
    for t in targets:
        total = float((factors[t.name].sigma.double() ** 2).sum())
        out[t.name] = weights_norm2[t.name] * fisher.trace[t.name] / t.params / max(total, 1e-300)
    return out


def _options(sigma: np.ndarray, t: Target, weight: float, k_min: int, k_max: int, dense: bool):
    """Rank options (k_min..k_max, then dense) with their costs and weighted losses."""
    tail = np.concatenate([np.cumsum((sigma ** 2)[::-1])[::-1], [0.0]])  # L(k)^2 for k = 0..r
    ks = np.arange(k_min, k_max + 1)
    costs = ks * (t.out_features + t.in_features)
    losses = weight * tail[ks]
    ranks: list = ks.tolist()
    if dense:
        costs, losses, ranks = np.append(costs, t.params), np.append(losses, 0.0), ranks + [DENSE]
    return ranks, costs.astype(np.int64), losses


def _rank_bounds(t: Target, p_min: float, p_max: float) -> tuple[int, int, bool]:
    k_cap = math.ceil(t.params / (t.out_features + t.in_features)) - 1  # largest k cheaper than dense
    k_cap = max(1, min(k_cap, t.out_features, t.in_features))
    k_min = min(alloc.rank_for(p_min, t.out_features, t.in_features) or k_cap, k_cap)
    hi = alloc.rank_for(p_max, t.out_features, t.in_features)
    return k_min, (k_cap if hi is DENSE else max(min(hi, k_cap), k_min)), hi is DENSE


def coupled_ranks(sigmas: dict[str, np.ndarray], weights: dict[str, float], targets: list[Target], budget: float,
                  p_min: float = 0.0, p_max: float = 1.0, exact: bool | None = None) -> dict[str, int | None]:
    """Ranks minimising sum_m w_m L_m(k_m)^2 with kept parameters <= budget (see module docstring)."""
    opts = [_options(np.asarray(sigmas[t.name], dtype=np.float64), t, float(weights[t.name]),
                     *_rank_bounds(t, p_min, p_max)) for t in targets]
    base = int(sum(c[0] for _, c, _ in opts))
    if base > budget:
        raise DipSVDError(f"the budget cannot be met even at the lowest ranks (p_min={p_min:g}); lower p_min "
                          "or the ratio")
    unit = reduce(math.gcd, [int(c) for _, cs, _ in opts for c in cs])
    cells = (int(budget) - base) // unit * sum(len(r) for r, _, _ in opts)
    if exact or (exact is None and cells <= EXACT_LIMIT):
        choice = _exact(opts, int(budget) - base, unit)
    else:
        choice = _greedy(opts, budget - base)
    return {t.name: opts[i][0][j] for i, (t, j) in enumerate(zip(targets, choice))}


def _exact(opts, spare: int, unit: int) -> list[int]:
    """Multiple-choice knapsack by DP over spare budget in units of the gcd of all costs."""
    cap = spare // unit
    best = np.zeros(cap + 1)  # best[b]: min loss of the matrices so far using <= b extra units
    picks = []
    for m, (_, costs, losses) in enumerate(opts):
        extra = (costs - costs[0]) // unit
        new = np.full(cap + 1, np.inf)
        arg = np.zeros(cap + 1, dtype=np.int64)
        prev = best if m else np.zeros(cap + 1)
        for j, (e, loss) in enumerate(zip(extra, losses)):
            if e > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[e:] = prev[: cap + 1 - e] + loss
            better = cand < new
            new[better], arg[better] = cand[better], j
        best = new
        picks.append(arg)
    choice, b = [], cap
    for m in range(len(opts) - 1, -1, -1):
        j = int(picks[m][b])
        choice.append(j)
        b -= int((opts[m][1][j] - opts[m][1][0]) // unit)
    return choice[::-1]


def _hull(costs: np.ndarray, losses: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of (cost, loss), from the cheapest point, loss decreasing.

    Sorted singular values make the rank points convex already (the loss drops by sigma_{k+1}^2
    per step, less and less), so the longest convex prefix is found at once and only the rest
    (usually the dense point alone) goes through the monotone-chain loop."""
    c, l = costs.astype(np.float64), np.asarray(losses, dtype=np.float64)
    slopes = (l[:-1] - l[1:]) / (c[1:] - c[:-1])  # slopes[j - 1]: gain per parameter from point j - 1 to j
    good = slopes > 0
    good[1:] &= slopes[1:] < slopes[:-1]  # strictly decreasing gains: the points stay on the hull
    bad = np.flatnonzero(~good)
    hull: list[int] = list(range(1 + (int(bad[0]) if len(bad) else len(good))))
    n_prefix = len(hull)
    for j in range(n_prefix, len(c)):
        if l[j] >= l[hull[-1]]:
            continue  # dominated: costs more and loses no less
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or above the segment a -> j
            if (l[b] - l[a]) * (c[j] - c[a]) >= (l[j] - l[a]) * (c[b] - c[a]):
                hull.pop()
            else:
                break
        hull.append(j)
    return hull


def _greedy(opts, spare: float) -> list[int]:
    """Hull segments by gain per parameter (largest first), then single steps for the leftover."""
    choice = [0] * len(opts)
    hulls, parts = [], []
    for m, (_, c, l) in enumerate(opts):
        h = np.asarray(_hull(c, l))
        hulls.append(h)
        dc = c[h[1:]] - c[h[:-1]]
        parts.append((-(l[h[:-1]] - l[h[1:]]) / dc, dc, np.full(len(dc), m), np.arange(1, len(h))))
    neg_gain, dcost, owner, pos = (np.concatenate(x) for x in zip(*parts))
    # Along a hull the gains strictly decrease, so one global sort keeps each matrix's segments in order.
    order = np.lexsort((pos, neg_gain))
    blocked = [False] * len(opts)
    for dc, m, h in zip(dcost[order].tolist(), owner[order].tolist(), pos[order].tolist()):
        if blocked[m]:
            continue
        if dc <= spare:
            spare -= dc
            choice[m] = int(hulls[m][h])
        else:  # a segment that does not fit is dropped with the rest of its hull
            blocked[m] = True
    # Leftover: any single option step that fits, best gain per parameter first.
    improved = True
    while improved:
        improved, best = False, None
        for m, (_, c, l) in enumerate(opts):
            j = choice[m]
            for k in range(j + 1, len(c)):
                if c[k] - c[j] > spare:
                    break
                gain = (l[j] - l[k]) / (c[k] - c[j])
                if gain > 0 and (best is None or gain > best[0]):
                    best = (gain, m, k)
        if best is not None:
            _, m, k = best
            spare -= opts[m][1][k] - opts[m][1][choice[m]]
            choice[m], improved = k, True
    return choice


def coupled(factors, weights: dict[str, float], targets: list[Target], ratio: float, p_min: float = 0.05,
            p_max: float = 1.0, exact: bool | None = None) -> Allocation:
    """Per-matrix ranks from the coupled objective; p_blocks are the realized per-block keep fractions."""
    ratio = alloc.check_ratio(ratio)
    budget = (1 - ratio) * sum(t.params for t in targets)
    sigmas = {t.name: factors[t.name].sigma.double().numpy() for t in targets}
    ranks = coupled_ranks(sigmas, weights, targets, budget, p_min, p_max, exact)
    kept = np.zeros(1 + max(t.block for t in targets))
    for t in targets:
        kept[t.block] += alloc.matrix_params(ranks[t.name], t.out_features, t.in_features)
    p_blocks = kept / alloc.block_params(targets)
    return Allocation(p_blocks, ranks, ratio, alloc.realized_ratio(ranks, targets), method="coupled")


def nested(factors, weights: dict[str, float], targets: list[Target], outer: Allocation, p_min: float = 0.05,
           p_max: float = 1.0, exact: bool | None = None) -> Allocation:
    """Per-block budgets from `outer` (the heuristic's, which measures how blocks feed each other through
    Fisher sensitivity and effective rank), per-matrix ranks inside each block from the coupled
    objective: the weights w_m then only compare matrices of the same block, where a second-order
    estimate of one matrix's effect does not have to stand in for the error compounding across blocks.
    Each block keeps at most what `outer` gave it, so the realized ratio is at least outer's."""
    sigmas = {t.name: factors[t.name].sigma.double().numpy() for t in targets}
    ranks: dict[str, int | None] = {}
    n_blocks = 1 + max(t.block for t in targets)
    for b in range(n_blocks):
        ts = [t for t in targets if t.block == b]
        budget = sum(alloc.matrix_params(outer.ranks[t.name], t.out_features, t.in_features) for t in ts)
        ranks.update(coupled_ranks(sigmas, weights, ts, budget, p_min, p_max, exact))
    kept = np.zeros(n_blocks)
    for t in targets:
        kept[t.block] += alloc.matrix_params(ranks[t.name], t.out_features, t.in_features)
    return Allocation(kept / alloc.block_params(targets), ranks, outer.ratio_target, alloc.realized_ratio(ranks, targets),
                      method="nested")


def predicted_loss(factors, ranks: dict[str, int | None], targets: list[Target]) -> np.ndarray:
    """Per block: sum over its matrices of L_m(k_m)^2, the whitened error of the chosen ranks."""
    out = np.zeros(1 + max(t.block for t in targets))
    for t in targets:
        k = ranks[t.name]
        if k is not DENSE:
            out[t.block] += float((factors[t.name].sigma[k:].double() ** 2).sum())
    return out
