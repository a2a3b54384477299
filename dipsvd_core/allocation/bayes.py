"""Step 4c of the flow: Bayesian optimisation of per-block keep ratios (DipSVD Sec. 3.2.1).

scikit-optimize's `gp_minimize` proposes one variable per block in [0.25, 1]; every proposal is
projected onto the budget by `allocation.project`, so no evaluated point ever breaks it. The
search is seeded and warm-started (x0) with the uniform and heuristic allocations.

Evaluating a point never recomputes an SVD and never copies the model: `RankSwapper` swaps each targeted Linear
of the one model for a LowRankLinear of k rows of its cached factors (read from disk), or leaves it dense, for
that evaluation only, and puts the original modules back after it. The objective is perplexity on held-out
calibration-split windows (disjoint from the calibration windows), or 1 - mean cosine similarity between the
swapped model's logits and the original model's (computed once, before any swap) on those windows.
"""
from __future__ import annotations

import math
import threading
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..common.errors import DipSVDError
from ..engine.evaluate import perplexity, window_logits
from ..lowrank.surgery import LowRankLinear, placement_of, set_module
from ..model.blocks import Target
from .budget import DENSE, Allocation, project

OBJECTIVES = ("ppl", "cosine")
LOW, HIGH = 0.25, 1.0  # search range of each block's variable (the paper's)


class RankSwapper:
    """The one model, its targeted Linears swapped for one evaluation and put back after it.

    `with swapper.ranks(factors, ranks) as model:` puts a LowRankLinear of k rows of each cached factor in place of
    each targeted Linear (a dense one stays), and the original modules back when the block ends, whatever happens
    in it. Nothing is copied: the model's own weights stay referenced, and an evaluation adds only the current
    allocation's factors. On a GPU the swapped-out weights wait on the host meanwhile, so the device holds the
    low-rank model, not both; an offloaded Linear's pair computes on its hook's execution device."""

    def __init__(self, model: nn.Module, targets: list[Target]):
        self.model = model
        mods = dict(model.named_modules())
        self.originals = {t.name: mods[t.name] for t in targets}

    @contextmanager
    def ranks(self, factors, ranks: dict[str, int | None]):
        swapped = {}
        try:
            with torch.no_grad():
                for name, orig in self.originals.items():
                    if ranks[name] is DENSE:
                        continue
                    w = orig.weight
                    dev, bias = placement_of(orig)  # an offloaded Linear's pair goes to its execution device
                    bias = None if bias is None else bias.detach().clone()
                    u, v = factors[name].low_rank(ranks[name])  # k rows of each factor, read from disk
                    set_module(self.model, name, LowRankLinear.from_weights(u.to(dev, w.dtype), v.to(dev, w.dtype),
                                                                            bias))
                    swapped[name] = w.device
                    if w.device.type not in ("cpu", "meta"):
                        orig.to("cpu")
            yield self.model
        finally:
            for name, device in swapped.items():
                orig = self.originals[name]
                set_module(self.model, name, orig if device.type == "meta" else orig.to(device))


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
                self.reference = [logits.half() for _, _, logits in window_logits(lm_model, windows)]

    def __call__(self, ranks: dict[str, int | None]) -> float:
        return self.measure(ranks)[0]

    def measure(self, ranks: dict[str, int | None], also=None) -> tuple[float, object]:
        """The objective at `ranks`, and `also(model)` on the model at those ranks (None without it)."""
        with self.swapper.ranks(self.factors, ranks) as model:
            return self._value(model), (also(model) if also else None)

    @torch.no_grad()
    def _value(self, model: nn.Module) -> float:
        if self.kind == "ppl":
            try:
                return perplexity(model, self.windows)
            except DipSVDError:  # a broken point is a very bad point, not a failed search
                return 1e6
        sims = [F.cosine_similarity(logits.float(), ref.float(), dim=-1).mean()
                for (_, _, logits), ref in zip(window_logits(model, self.windows), self.reference)]
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
