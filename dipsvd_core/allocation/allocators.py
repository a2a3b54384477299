"""Step 4b of the flow: allocations beyond uniform. Every one ends in `allocation.project` or meets
the same budget exactly, so all of them are compared at the same realized size.

- `heuristic`: p_l proportional to Q_l (DipSVD Eq. 13), through the projector.
- `coupled` (ours, not in the paper): one rank per MATRIX chosen jointly. For matrix m with
  whitened loss curve L_m(k) = sqrt(sum_{i>k} sigma_i^2) (read off its cached factors) we minimise
      sum_m w_m L_m(k_m)^2   subject to   sum_m cost_m(k_m) <= budget,
  cost_m(k) = k (out + in), or out * in when kept dense (which loses nothing). Ranks with
  k (out + in) >= out * in are never chosen: dense costs no more and is exact.
  The weight turns each matrix's whitened error into an estimate of the loss it adds, in two steps.
  1. Second order, at the matrix's output. Truncating W adds e_t = (W - W') x_t to its output y_t.
     With the empirical Fisher at that output, g_t = dL/dy_t, the loss grows by about
     0.5 sum_t (g_t . e_t)^2; taking e_t isotropic against g_t, 0.5 sum_t ||g_t||^2 ||e_t||^2 / out.
     L_m(k)^2 / L_m(0)^2 is the RELATIVE output error (exact for svd-llm's whitening; for dipsvd's
     channel-weighted one, the error in the weighted norm), so sum_t ||e_t||^2 = E_m L_m(k)^2 / L_m(0)^2
     with E_m = mean_t ||y_t||^2, and
         w_m = G_m / out_m * E_m / L_m(0)^2,   G_m = mean_t ||g_t||^2
     (both from the Fisher pass, importance.py). g_t comes back through every block after m, so this
     already weighs m by how its block's output error reaches the final loss, to first order.
  2. Measured, per block. The first-order estimate misses what the blocks after m do to a LARGE error
     (the compounding of the issue): on the bundled model it is off by a factor that varies 30x across
     blocks (block 0 and the last blocks far more sensitive than it says). So each block l is probed:
     truncated ALONE, every matrix at keep fraction PROBE_KEEP, on held-out windows; the measured
     increase of the mean next-token loss d_l against the predicted sum_{m in l} w_m L_m(k_m)^2 gives
     c_l = d_l / predicted_l, and w_m is multiplied by c_l of its block (`calibrate`). The probe costs one
     forward pass over the held-out windows per block and no copy of the model (importance.py).
  On the bundled model (bench/RESULTS.md) step 1 alone beat the heuristic at 0.1 and 0.2 and still
  collapsed at 0.3; with step 2 it no longer collapses. The earlier weight, ||W||_F^2 tr(F_W) / P / L(0)^2
  (a relative perturbation spread evenly over the weights), was worse at every ratio.
  Solver: the lower convex hull of each matrix's (cost, loss) points, with all hull segments taken
  in order of loss reduction per parameter (exact for the convexified problem), then the leftover
  budget filled with single steps. Because the hull can skip points, that greedy is not always
  optimal for the integer problem; when the problem is small (cost units x options <= EXACT_LIMIT)
  an exact dynamic programme over the budget is used instead.
- `nested` (ours, not in the paper): the heuristic's kept parameters per block, and inside each block the
  ranks that minimise the coupled objective under that block's budget. Blocks the heuristic keeps dense stay
  dense. Inside a block the per-block calibration c_l of `coupled` is one common factor, so it cancels; what
  the split needs is how the matrix TYPES compare, and there step 1's weights are off: they send the cut to
  gate_proj, the type that costs the most out of domain. So the weights are calibrated per type instead
  (`calibrate_types`): every matrix of one type (all q_proj of the model, then all k_proj, ...) truncated
  together at PROBE_KEEP on the held-out windows, the measured loss increase d_type against the predicted
  sum_{m of that type} w_m L_m(k_m)^2, c_type = d_type / predicted_type, and w_m times c_type of its type.
  That probe costs one forward pass over the held-out windows per type (7 for Llama), not per block.
  Why the heuristic's blocks: on the bundled model (bench/RESULTS.md) every allocation that moves budget
  between blocks by an additive loss model loses out of domain at 0.3 and 0.4, and the loss of a block
  compressed after others is not the sum of its parts (the compounding of issue 11). Inside a block that
  compounding is what sequential compensation (refine.py) takes back: with `--refine sequential`,
  nested is below the heuristic at every ratio measured; without refining it loses at 0.3.
"""
from __future__ import annotations

import math
from functools import reduce

import numpy as np

from ..common.errors import DipSVDError
from ..model.blocks import Target
from . import budget as alloc
from .budget import DENSE, Allocation, project

EXACT_LIMIT = 4_000_000  # DP cells (budget units x options) below which the exact solver runs


def heuristic(Q, targets: list[Target], ratio: float, p_min: float = 0.05, p_max: float = 1.0) -> Allocation:
    """p_l proportional to Q_l, projected onto the budget: a higher Q keeps more."""
    Q = np.asarray(Q, dtype=np.float64)
    n_blocks = 1 + max(t.block for t in targets)
    if Q.shape != (n_blocks,):
        raise DipSVDError(f"need one importance score per block ({n_blocks}); got shape {Q.shape}")
    return project(Q, targets, ratio, p_min, p_max, method="heuristic")


PROBE_KEEP = 0.25  # the keep fraction of the per-block probe (step 2 of the coupled weights)
PROBE_FLOOR = 1e-3  # a probe below this fraction of the median positive one counts as this (noise, not a gain)


def coupled_weights(factors, fisher, targets: list[Target]) -> dict[str, float]:
    """w_m = G_m / out_m * E_m / L_m(0)^2 (step 1 of the module docstring; Workbench.coupled_weights calibrates)."""
    out = {}
    for t in targets:
        total = float((factors[t.name].sigma.double() ** 2).sum())
        out[t.name] = fisher.out_grad2[t.name] / t.out_features * fisher.out_energy[t.name] / max(total, 1e-300)
    return out


def weighted_loss(factors, weights: dict[str, float], ranks: dict[str, int | None], targets: list[Target]) -> np.ndarray:
    """Per block: sum over its matrices of w_m L_m(k_m)^2, the coupled objective's share of each block."""
    out = np.zeros(1 + max(t.block for t in targets))
    for t in targets:
        k = ranks[t.name]
        if k is not DENSE:
            out[t.block] += weights[t.name] * float((factors[t.name].sigma[k:].double() ** 2).sum())
    return out


def calibrate(measured, predicted) -> np.ndarray:
    """c_l = d_l / predicted_l; a measured increase below PROBE_FLOOR x the median positive one (noise, or a
    cut that happened to help) is floored, so that no block's error counts as free or as a gain."""
    d, p = np.asarray(measured, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    if d.shape != p.shape or not (np.isfinite(d).all() and np.isfinite(p).all()):
        raise DipSVDError("the block probes gave no finite loss; load the model in float32 (--dtype float32)")
    floor = PROBE_FLOOR * (float(np.median(d[d > 0])) if (d > 0).any() else 1e-9)
    return np.maximum(d, floor) / np.maximum(p, 1e-300)


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
    return alloc.from_ranks(coupled_ranks(sigmas, weights, targets, budget, p_min, p_max, exact), targets, ratio,
                            "coupled")


def calibrate_types(measured: dict[str, float], factors, weights: dict[str, float], targets: list[Target],
                    keep: float = PROBE_KEEP) -> dict[str, float]:
    """c_type = d_type / predicted_type: the type probe's measured loss increase over the weighted loss the
    weights predict for the same cut (every matrix of the type at `keep`), floored as `calibrate` floors."""
    from .importance import matrix_type

    types = sorted(measured)
    ranks = alloc.ranks_for(np.full(1 + max(t.block for t in targets), keep), targets)
    predicted = dict.fromkeys(types, 0.0)
    for t in targets:
        k = ranks[t.name]
        if k is not DENSE:
            predicted[matrix_type(t.name)] += weights[t.name] * float((factors[t.name].sigma[k:].double() ** 2).sum())
    c = calibrate([measured[ty] for ty in types], [predicted[ty] for ty in types])
    return dict(zip(types, c.tolist()))


def nested(outer: Allocation, factors, weights: dict[str, float], targets: list[Target], p_min: float = 0.05,
           p_max: float = 1.0, exact: bool | None = None) -> Allocation:
    """Per-matrix ranks inside each block of `outer` (the heuristic's allocation): the block's kept parameters
    under `outer`, spread over its matrices by the coupled objective with `weights`; a block `outer` keeps
    dense stays dense. Each block spends at most what `outer` gave it, so the realized ratio is at least
    outer's."""
    sigmas = {t.name: factors[t.name].sigma.double().numpy() for t in targets}
    n_blocks = 1 + max(t.block for t in targets)
    ranks: dict[str, int | None] = {}
    for b in range(n_blocks):
        block = [t for t in targets if t.block == b]
        if all(outer.ranks[t.name] is DENSE for t in block):
            ranks.update({t.name: DENSE for t in block})
            continue
        budget = sum(alloc.matrix_params(outer.ranks[t.name], t.out_features, t.in_features) for t in block)
        ranks.update(coupled_ranks(sigmas, weights, block, budget, p_min, p_max, exact))
    return alloc.from_ranks(ranks, targets, outer.ratio_target, "nested")


def predicted_loss(factors, ranks: dict[str, int | None], targets: list[Target]) -> np.ndarray:
    """Per block: sum over its matrices of L_m(k_m)^2, the whitened error of the chosen ranks."""
    return weighted_loss(factors, {t.name: 1.0 for t in targets}, ranks, targets)
