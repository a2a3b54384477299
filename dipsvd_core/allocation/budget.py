"""Step 4 of the flow: from keep ratios to ranks, under a parameter budget.

Conventions (docs/DESIGN.md section 1): `ratio` r is the fraction of the targeted parameters removed;
keep-ratio p = 1 - r. A matrix (out x in) kept at p gets rank k = floor(p * out * in / (out + in)),
clipped to [1, min(out, in)]; p >= 1 keeps it dense. Every allocation, whatever produced it, goes
through `project`, which clamps p_l to [p_min, p_max] and rescales so the realized parameter
count meets the budget (the largest count not above it, found by bisection on the scale).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch.nn as nn

from ..common.errors import DipSVDError
from ..model.blocks import Target
from ..model.models import count_params

DENSE = None  # rank value meaning "keep the matrix dense"


def check_ratio(ratio: float) -> float:
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and 0 < ratio < 1):
        raise DipSVDError(f"ratio must be strictly between 0 and 1 (the fraction of targeted parameters "
                          f"removed; 0.2 removes 20%, keeps 80%); got {ratio}")
    return float(ratio)


def describe_ratio(ratio: float) -> str:
    return f"ratio {ratio:g} removed, {100 * (1 - ratio):.0f}% kept"


def rank_for(p: float, out_features: int, in_features: int) -> int | None:
    if p >= 1:
        return DENSE
    k = math.floor(p * out_features * in_features / (out_features + in_features))
    return int(min(max(k, 1), min(out_features, in_features)))


def matrix_params(k: int | None, out_features: int, in_features: int) -> int:
    """Weight parameters of a matrix kept at rank k (dense when k is None). Biases are not counted."""
    return out_features * in_features if k is DENSE else k * (out_features + in_features)


def ranks_for(p_blocks, targets: list[Target]) -> dict[str, int | None]:
    return {t.name: rank_for(float(p_blocks[t.block]), t.out_features, t.in_features) for t in targets}


def kept_params(ranks: dict[str, int | None], targets: list[Target]) -> int:
    return sum(matrix_params(ranks[t.name], t.out_features, t.in_features) for t in targets)


def realized_ratio(ranks: dict[str, int | None], targets: list[Target]) -> float:
    total = sum(t.params for t in targets)
    return 1 - kept_params(ranks, targets) / total


@dataclass
class Allocation:
    """Per-block keep ratios after projection, and the ranks they give."""

    p_blocks: np.ndarray
    ranks: dict[str, int | None]
    ratio_target: float
    ratio_realized: float
    method: str = "uniform"
    history: list[float] = field(default_factory=list)  # bayes: best objective value after each call
    values: list[float] = field(default_factory=list)  # bayes: each call's own objective value


def project(p_blocks, targets: list[Target], ratio: float, p_min: float = 0.05, p_max: float = 1.0,
            method: str = "custom") -> Allocation:
    """Clamp to [p_min, p_max] and rescale so kept parameters are the largest count <= budget."""
    ratio = check_ratio(ratio)
    if not 0 < p_min <= p_max:
        raise DipSVDError(f"need 0 < p_min <= p_max (got {p_min}, {p_max})")
    p = np.asarray(p_blocks, dtype=np.float64)
    if p.ndim != 1 or not np.isfinite(p).all() or (p < 0).any():
        raise DipSVDError("keep ratios must be finite and non-negative, one per block")
    n_blocks = 1 + max(t.block for t in targets)
    if len(p) != n_blocks:
        raise DipSVDError(f"need one keep ratio per block ({n_blocks}); got {len(p)}")
    if p.max() <= 0:
        p = np.ones_like(p)
    budget = (1 - ratio) * sum(t.params for t in targets)

    def at(scale: float) -> np.ndarray:
        return np.clip(scale * p, p_min, p_max)

    def count(scale: float) -> int:
        return kept_params(ranks_for(at(scale), targets), targets)

    if count(0.0) > budget:
        raise DipSVDError(f"ratio {ratio:g} cannot be met with every block kept at p_min={p_min:g}; "
                          "lower p_min or the ratio")
    lo = _bisect(lambda c: count(c) <= budget, grow=True)
    base = at(lo)
    if np.array_equal(base, at(2 * lo + 1)):
        # Scaling saturated (e.g. all weight on blocks already at p_max, the rest at p_min):
        # fill the remaining budget by shifting every unsaturated block up by the same amount.
        def shifted(t: float) -> np.ndarray:
            return np.clip(base + t, p_min, p_max)

        t = _bisect(lambda t: kept_params(ranks_for(shifted(t), targets), targets) <= budget, hi=p_max)
        base = shifted(t)
    ranks = _spend_leftover(ranks_for(base, targets), base, targets, budget)
    realized = realized_ratio(ranks, targets)
    if realized - ratio > 0.005:  # only when p_max caps what can be kept
        raise DipSVDError(f"ratio {ratio:g} cannot be met with every block kept at most at p_max={p_max:g} "
                          f"(that removes {realized:.3f}); raise p_max or the ratio")
    return Allocation(base, ranks, ratio, realized, method)


def _bisect(ok, hi: float = 1.0, grow: bool = False, steps: int = 60) -> float:
    """Largest x >= 0 with ok(x) for a monotone predicate (ok(0) holds)."""
    lo = 0.0
    if grow:
        while ok(hi) and hi < 1e12:
            lo, hi = hi, hi * 2
    elif ok(hi):
        return hi
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def _spend_leftover(ranks: dict, p_blocks: np.ndarray, targets: list[Target], budget: float) -> dict:
    """Give the budget left by flooring back as +1 ranks, largest rounding remainder first.

    One shared p per block moves all same-shaped matrices together, so on small models the floor
    alone can miss the budget by more than 0.5%; this keeps every rank within 1 of the formula.
    """
    left = budget - kept_params(ranks, targets)
    exact = {t.name: float(p_blocks[t.block]) * t.params / (t.out_features + t.in_features) for t in targets}
    for t in sorted(targets, key=lambda t: -(exact[t.name] % 1)):
        k, step = ranks[t.name], t.out_features + t.in_features
        if k is not DENSE and step <= left and (k + 1) * step < t.params:
            ranks[t.name] = k + 1
            left -= step
    return ranks


def block_params(targets: list[Target]) -> np.ndarray:
    """P_l: targeted parameters of each block."""
    n = 1 + max(t.block for t in targets)
    out = np.zeros(n)
    for t in targets:
        out[t.block] += t.params
    return out


def from_ranks(ranks: dict[str, int | None], targets: list[Target], ratio: float, method: str) -> Allocation:
    """The Allocation of per-matrix ranks: p_l is the fraction of block l's parameters they keep."""
    kept = np.zeros(1 + max(t.block for t in targets))
    for t in targets:
        kept[t.block] += matrix_params(ranks[t.name], t.out_features, t.in_features)
    return Allocation(kept / block_params(targets), ranks, ratio, realized_ratio(ranks, targets), method)


def uniform(targets: list[Target], ratio: float, **bounds) -> Allocation:
    """SVD-LLM's allocation: every block keeps 1 - r, then projected onto the exact budget."""
    n = 1 + max(t.block for t in targets)
    return project(np.full(n, 1 - check_ratio(ratio)), targets, ratio, method="uniform", **bounds)


def param_report(original: nn.Module | int, compressed: nn.Module, targets, ranks) -> dict:
    """`original` is the model or its parameter count (taken before an in-place conversion)."""
    before_t = sum(t.params for t in targets)
    after_t = kept_params(ranks, targets)
    total_before = original if isinstance(original, int) else count_params(original)
    total_after = count_params(compressed)
    return {"targeted_before": before_t, "targeted_after": after_t,
            "total_before": total_before, "total_after": total_after,
            "whole_model_reduction": 1 - total_after / total_before}
