"""The flow in one object: model + text -> statistics -> factors -> allocation -> compressed model.

`Workbench` holds what is expensive (calibration windows, statistics, factors per FactorSpec) so
that the CLI, the sweep and the app all reuse it: a new ratio or allocation only slices cached
factors; a new weight, bar or whitening form refactors; new calibration data recollects.
"""
from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from . import allocation as alloc
from . import allocators
from .data import calibration_windows, evaluation_windows, heldout_windows
from .errors import DipSVDError
from .factors import DEFAULT_WHITENING, Factor, FactorSpec, cached_factors
from .importance import FisherInfo, cached_fisher, check_importance, effective_ranks, importance
from .models import LoadedModel
from .stats import Stats, cached_stats, stats_key
from .surgery import compress_model, low_rank_weights

ALLOCATIONS = ("uniform", "heuristic", "bayes", "coupled")


@dataclass
class Settings:
    method: str = "dipsvd"
    allocation: str = "uniform"
    ratio: float = 0.2
    weight: float = 30.0
    bar: float = 0.03
    whitening: str = DEFAULT_WHITENING
    p_min: float = 0.05
    p_max: float = 1.0
    # global importance (DESIGN.md section 4)
    beta: float = 0.25  # Q_l = S~^beta * R~^(1 - beta)
    tau: float = 0.95  # effective-rank energy threshold
    energy: str = "sigma2"  # "sigma2" (Alg. 5) or "sigma" (Eq. 11)
    bo_calls: int = 30
    bo_objective: str = "ppl"  # "ppl" on held-out calibration text, or "cosine" of final logits
    bo_windows: int = 4  # held-out calibration-split windows (of the Workbench's seqlen) per BO evaluation
    seed: int = 0

    @property
    def spec(self) -> FactorSpec:
        return FactorSpec(self.method, self.weight, self.bar, self.whitening)

    def check(self) -> "Settings":
        alloc.check_ratio(self.ratio)
        self.spec  # validates method and whitening
        if self.allocation not in allocation_names():
            raise DipSVDError(f"unknown allocation '{self.allocation}'; use one of {', '.join(allocation_names())}")
        if not 0 < self.p_min <= self.p_max:
            raise DipSVDError(f"need 0 < p_min <= p_max (got {self.p_min}, {self.p_max})")
        check_importance(self.beta, self.tau, self.energy)
        from .bayes import OBJECTIVES

        if self.bo_objective not in OBJECTIVES:
            raise DipSVDError(f"unknown BO objective '{self.bo_objective}'; use ppl or cosine")
        if self.bo_calls < 2:
            raise DipSVDError(f"bo_calls must be at least 2 (the uniform and heuristic warm starts); got {self.bo_calls}")
        if self.bo_windows < 1:
            raise DipSVDError(f"bo_windows must be at least 1; got {self.bo_windows}")
        return self


def allocation_names() -> tuple[str, ...]:
    return ALLOCATIONS


@dataclass
class Result:
    model: torch.nn.Module
    allocation: alloc.Allocation
    settings: Settings
    timings_s: dict = field(default_factory=dict)


def peak_memory_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    if torch.cuda.is_available():
        rss = max(rss, torch.cuda.max_memory_allocated() / 2**20)
    return rss


class Workbench:
    def __init__(self, lm: LoadedModel, calib: str = "wiki", calib_windows: int = 32, seqlen: int = 512,
                 seed: int = 0):
        self.lm, self.calib, self.n_windows, self.seqlen, self.seed = lm, calib, calib_windows, seqlen, seed
        self._windows: torch.Tensor | None = None
        self._stats: Stats | None = None
        self._factors: dict[tuple, dict[str, Factor]] = {}
        self._fisher: FisherInfo | None = None
        self._objectives: dict[tuple, object] = {}  # BO objective per (factor key, kind, windows): one model copy each
        self.timings_s: dict[str, float] = {}

    @property
    def targets(self):
        return self.lm.targets

    def windows(self) -> torch.Tensor:
        if self._windows is None:
            self._windows = calibration_windows(self.lm.tokenizer, self.calib, self.n_windows, self.seqlen, self.seed)
        return self._windows

    def stats(self, progress=None) -> Stats:
        if self._stats is None:
            t0 = time.perf_counter()
            self._stats = cached_stats(self.lm, self.windows(), progress)
            self.timings_s["statistics"] = time.perf_counter() - t0
        return self._stats

    def has_factors(self, spec: FactorSpec) -> bool:
        return spec.key in self._factors

    def factors(self, spec: FactorSpec, progress=None) -> dict[str, Factor]:
        if spec.key not in self._factors:
            if spec.method == "svd":  # plain SVD needs no data
                stats, skey = None, f"svd-{self.lm.fingerprint}"
            else:
                stats, skey = self.stats(progress), stats_key(self.lm, self.windows())
            fisher = self.fisher(progress) if spec.method == "fwsvd" else None
            t0 = time.perf_counter()
            self._factors[spec.key], _ = cached_factors(self.lm, skey, stats, spec, progress, fisher=fisher)
            self.timings_s["factors"] = time.perf_counter() - t0
        return self._factors[spec.key]

    def drop_factors(self, spec: FactorSpec) -> None:
        """Free one method's factors (and its BO model copies); they reload from the disk cache."""
        self._factors.pop(spec.key, None)
        for k in [k for k in self._objectives if k[0] == spec.key]:
            del self._objectives[k]

    # --- global importance (DESIGN.md section 4) ---
    def fisher(self, progress=None) -> FisherInfo:
        """Fisher sensitivity from backward passes over the calibration windows (cached on disk)."""
        if self._fisher is None:
            t0 = time.perf_counter()
            self._fisher = cached_fisher(self.lm, self.windows(), stats_key(self.lm, self.windows()), progress)
            self.timings_s["fisher"] = time.perf_counter() - t0
        return self._fisher

    def effective_ranks(self, tau: float = 0.95, energy: str = "sigma2") -> np.ndarray:
        return effective_ranks(self.stats().block_grams, tau, energy)

    def importance(self, settings: Settings, progress=None) -> dict[str, np.ndarray]:
        """S, R, their normalised forms and Q, one value per block."""
        return importance(self.fisher(progress), self.stats(progress).block_grams, settings.beta, settings.tau,
                          settings.energy)

    def heldout(self, n_windows: int) -> torch.Tensor:
        """Calibration-split windows disjoint from the calibration windows (for BO's objective)."""
        return heldout_windows(self.lm.tokenizer, self.calib, n_windows, self.seqlen, self.seed, skip=self.n_windows)

    def allocate(self, settings: Settings, progress=None, callback=None, cancel=None) -> alloc.Allocation:
        """uniform | heuristic | bayes | coupled. For bayes, `callback(i, value, best)` reports each call
        (return False to stop) and `cancel` (a threading.Event) stops the search; the best point so
        far is returned, with its convergence in Allocation.history."""
        settings.check()
        bounds = {"p_min": settings.p_min, "p_max": settings.p_max}
        if settings.allocation == "uniform":
            return alloc.uniform(self.targets, settings.ratio, **bounds)
        if settings.allocation == "heuristic":
            return allocators.heuristic(self.importance(settings, progress)["Q"], self.targets, settings.ratio, **bounds)
        if settings.allocation == "coupled":
            factors = self.factors(settings.spec, progress)
            mods = dict(self.lm.model.named_modules())
            norms = {t.name: float(mods[t.name].weight.detach().double().pow(2).sum()) for t in self.targets}
            weights = allocators.coupled_weights(factors, self.fisher(progress), norms, self.targets)
            return allocators.coupled(factors, weights, self.targets, settings.ratio, **bounds)
        if settings.allocation == "bayes":
            from .bayes import Objective, bayes

            factors = self.factors(settings.spec, progress)
            key = (settings.spec.key, settings.bo_objective, settings.bo_windows)
            if key not in self._objectives:
                self._objectives[key] = Objective(self.lm.model, self.targets, factors,
                                                  self.heldout(settings.bo_windows), settings.bo_objective)
            warm = [alloc.uniform(self.targets, settings.ratio, **bounds).p_blocks,
                    allocators.heuristic(self.importance(settings, progress)["Q"], self.targets, settings.ratio,
                                         **bounds).p_blocks]
            return bayes(self._objectives[key], self.targets, settings.ratio, warm, settings.bo_calls, settings.seed,
                         callback=callback, cancel=cancel, progress=progress, **bounds)
        raise DipSVDError(f"unknown allocation '{settings.allocation}'")

    def predicted_loss(self, settings: Settings, allocation: alloc.Allocation) -> np.ndarray:
        """Per block: sum of the whitened losses L_m(k_m)^2 of its matrices (from the factors, cheap)."""
        return allocators.predicted_loss(self.factors(settings.spec), allocation.ranks, self.targets)

    def build(self, settings: Settings, allocation: alloc.Allocation | None = None, progress=None) -> Result:
        """The compressed copy for these settings; the original model is left untouched."""
        settings.check()
        factors = self.factors(settings.spec, progress)
        t0 = time.perf_counter()
        allocation = allocation or self.allocate(settings, progress)
        t1 = time.perf_counter()
        model = compress_model(self.lm.model, low_rank_weights(factors, allocation.ranks))
        t2 = time.perf_counter()
        timings = dict(self.timings_s, allocation=t1 - t0, surgery=t2 - t1)
        return Result(model, allocation, settings, timings)

    def eval_windows(self, source: str, max_tokens: int | None = 16384, seqlen: int | None = None) -> torch.Tensor:
        return evaluation_windows(self.lm.tokenizer, source, seqlen or self.seqlen, max_tokens)


def settings_dict(s: Settings) -> dict:
    return asdict(s)
