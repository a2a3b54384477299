"""Step 4c of the flow: Bayesian optimisation of per-block keep ratios (DipSVD Sec. 3.2.1).

scikit-optimize's `gp_minimize` proposes one variable per block in [0.25, 1]; every proposal is
projected onto the budget by `allocation.project`, so no evaluated point ever breaks it. The
search is seeded and warm-started (x0) with the uniform and heuristic allocations.

Evaluating a point never recomputes an SVD: `RankSwapper` holds ONE reusable copy of the model and
writes W' = us[:, :k] @ vs[:k] (k rows of the cached factors, read from disk) into each targeted Linear in place,
or the original W for a dense one. The original model is never touched. The objective is
perplexity on held-out calibration-split windows (disjoint from the calibration windows), or
1 - mean cosine similarity between the copy's and the original model's logits on those windows.
"""
from __future__ import annotations

import copy
import math
import threading

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .allocation import DENSE, Allocation, project
from .errors import DipSVDError
from .evaluate import perplexity
from .models import Target
from .stream import window_ids

OBJECTIVES = ("ppl", "cosine")
LOW, HIGH = 0.25, 1.0  # search range of each block's variable (the paper's)


class RankSwapper:
    """One copy of the model whose targeted weights are overwritten per allocation."""

    def __init__(self, model: nn.Module, targets: list[Target]):
        self.original = model
        self.copy = copy.deepcopy(model).eval()
        src, dst = dict(model.named_modules()), dict(self.copy.named_modules())
        self.pairs = {t.name: (src[t.name], dst[t.name]) for t in targets}

    @torch.no_grad()
    def set_ranks(self, factors, ranks: dict[str, int | None]) -> nn.Module:
        for name, (orig, mod) in self.pairs.items():
            k = ranks[name]
            if k is DENSE:
                mod.weight.copy_(orig.weight)
            else:
                u, v = factors[name].low_rank(k)  # k rows of each factor, read from disk
                mod.weight.copy_((u.to(mod.weight.device).float() @ v.to(mod.weight.device).float())
                                 .to(mod.weight.dtype))
        return self.copy


class Objective:
    """objective(ranks) -> float on fixed held-out windows (n, seqlen)."""

    def __init__(self, lm_model: nn.Module, targets: list[Target], factors, windows: torch.Tensor,
                 kind: str = "ppl"):
        if kind not in OBJECTIVES:
            raise DipSVDError(f"unknown BO objective '{kind}'; use ppl or cosine")
        self.kind, self.factors, self.windows = kind, factors, windows
        self.swapper = RankSwapper(lm_model, targets)
        self.reference = None
        if kind == "cosine":  # the original model's logits, once; float16 keeps them small
            with torch.no_grad():
                self.reference = [lm_model(ids).logits.half() for _, ids in window_ids(lm_model, windows)]

    @torch.no_grad()
    def __call__(self, ranks: dict[str, int | None]) -> float:
        model = self.swapper.set_ranks(self.factors, ranks)
        if self.kind == "ppl":
            try:
                return perplexity(model, self.windows)
            except DipSVDError:  # a broken point is a very bad point, not a failed search
                return 1e6
        sims = [F.cosine_similarity(model(ids).logits.float(), ref.float(), dim=-1).mean()
                for (_, ids), ref in zip(window_ids(model, self.windows), self.reference)]
        value = 1 - torch.stack(sims).mean().item()
        return value if math.isfinite(value) else 2.0


def bayes(objective, targets: list[Target], ratio: float, warm: list[np.ndarray], calls: int = 30, seed: int = 0,
          p_min: float = 0.05, p_max: float = 1.0, callback=None, cancel: threading.Event | None = None,
          progress=None) -> Allocation:
    """Minimise objective(project(x).ranks) over x in [0.25, 1]^n_blocks with gp_minimize.

    `callback(i, value, best)` is called after every evaluation (i from 1); returning False stops the
    search, as does setting `cancel`. The best point found so far is returned either way, with
    `history` = best value after each call and `values` = each call's own value.
    """
    from skopt import gp_minimize

    n_blocks = 1 + max(t.block for t in targets)
    if calls < len(warm):
        raise DipSVDError(f"--bo-calls must be at least {len(warm)} (the warm starts); got {calls}")
    x0 = [[float(v) for v in np.clip(np.asarray(w, dtype=np.float64), LOW, HIGH)] for w in warm]
    values: list[float] = []
    history: list[float] = []

    def f(x):
        value = float(objective(project(np.asarray(x), targets, ratio, p_min, p_max).ranks))
        values.append(value)
        return value

    def on_step(res):
        # skopt calls back once for the whole warm-start batch, then once per call: report each value.
        keep_going = True
        for i in range(len(history) + 1, len(values) + 1):
            history.append(min(values[:i]))
            if progress:
                progress(i / calls, f"bayes: call {i}/{calls}, best {history[-1]:.4g}")
            if callback is not None and callback(i, values[i - 1], history[-1]) is False:
                keep_going = False
        return not keep_going or (cancel is not None and cancel.is_set())  # True tells skopt to stop

    if cancel is not None and cancel.is_set():
        raise DipSVDError("the Bayesian search was cancelled before it started")
    # Random starts beyond the warm ones: at most 10, and never more than the calls allow.
    n_random = max(0, min(10, calls - len(x0)))
    res = gp_minimize(f, [(LOW, HIGH)] * n_blocks, n_calls=calls, x0=x0, n_initial_points=n_random,
                      random_state=seed, callback=[on_step])
    best = project(np.asarray(res.x), targets, ratio, p_min, p_max, method="bayes")
    best.history, best.values = history, values
    return best
