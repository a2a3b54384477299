"""One small handler per compression method, in the spirit of gpt-fast's QuantHandler.

A handler builds the new state of a compression (what replaces each targeted matrix, the allocation
it realizes, and what the report should say about it); converting the model for runtime is then the
same for every method (`Workbench.build` -> surgery.compress_model). The CLI, the sweep, the report
and the app ask the handler instead of testing method names.

- `FactorHandler` (svd, svd-llm, dipsvd, fwsvd, asvd): factors computed once per FactorSpec in the
  block-streaming pass; an allocation (uniform, heuristic, bayes, coupled, nested) picks ranks; the new state
  is k rows of each factor, read from disk when surgery asks for them.
- `DobiHandler` (dobi): truncation positions trained by gradient descent (its own "trained"
  allocation), then the IPCA weight update, optionally remapped to 8 bits.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping

from . import allocation as alloc
from .errors import DipSVDError


@dataclass
class State:
    """What a build replaces, before surgery."""

    allocation: alloc.Allocation
    weights: Mapping  # name -> (u, v)
    info: dict = field(default_factory=dict)  # method-specific, for the report
    timings_s: dict = field(default_factory=dict)


class MethodHandler:
    name = ""
    trains_ranks = False  # True: the method learns its own ranks (allocation "trained")
    refinable = True  # sequential compensation (refine.py) refits its factored matrices
    default_allocation = "uniform"

    def check(self, settings) -> None:
        raise NotImplementedError

    def prepared(self, bench, settings) -> bool:
        """Whether the expensive step (factors, training) is already in memory."""
        raise NotImplementedError

    def prepare(self, bench, settings, progress=None, callback=None, cancel=None):
        raise NotImplementedError

    def new_state(self, bench, settings, allocation: alloc.Allocation | None = None, progress=None) -> State:
        raise NotImplementedError

    def report_fields(self, info: dict, allocation: alloc.Allocation) -> dict:
        """Keys this method adds to the JSON report (and to a sweep row)."""
        return {"bo_history": allocation.history} if allocation.history else {}


NO_FACTORS = ("uniform", "heuristic")  # allocations whose ranks do not read the factors


class FactorHandler(MethodHandler):
    def __init__(self, name: str):
        self.name = name

    def check(self, settings) -> None:
        settings.spec  # validates method and whitening
        if settings.allocation == "trained":
            raise DipSVDError(f"allocation 'trained' is Dobi-SVD's own; use it with method dobi, not {self.name}")
        if settings.remap:
            raise DipSVDError("remap (8-bit factors) is part of Dobi-SVD; use it with method dobi")

    def prepared(self, bench, settings) -> bool:
        return bench.has_factors(settings.spec)

    def prepare(self, bench, settings, progress=None, callback=None, cancel=None):
        return bench.factors(settings.spec, progress)

    def new_state(self, bench, settings, allocation=None, progress=None) -> State:
        from .surgery import low_rank_weights

        if settings.refine != "none" and (allocation is not None or settings.allocation in NO_FACTORS):
            # Refine refits every factored matrix from its own pass, so the factors would only be sliced and then
            # replaced: when the ranks do not need them either, a refined build runs no factor pass at all
            # (uniform: no statistics pass either; heuristic: the statistics and Fisher passes only).
            t0 = time.perf_counter()
            allocation = allocation or bench.allocate(settings, progress)
            return State(allocation, {}, timings_s={"allocation": time.perf_counter() - t0})
        factors = self.prepare(bench, settings, progress)
        t0 = time.perf_counter()
        allocation = allocation or bench.allocate(settings, progress)
        return State(allocation, low_rank_weights(factors, allocation.ranks),
                     timings_s={"allocation": time.perf_counter() - t0})


class DobiHandler(MethodHandler):
    name = "dobi"
    trains_ranks = True
    default_allocation = "trained"
    refinable = False  # its weights come from the IPCA update, not from factors refine can refit

    def check(self, settings) -> None:
        if settings.allocation != "trained":
            raise DipSVDError("dobi learns its own per-matrix ranks: use allocation 'trained' with it")
        settings.dobi.check()

    def prepared(self, bench, settings) -> bool:
        return bench.has_dobi(settings)

    def prepare(self, bench, settings, progress=None, callback=None, cancel=None):
        return bench.train_dobi(settings, progress, callback, cancel)

    def new_state(self, bench, settings, allocation=None, progress=None) -> State:
        from . import dobi

        trained = self.prepare(bench, settings, progress)
        if trained.cancelled:
            raise DipSVDError("Dobi-SVD training was cancelled; nothing was built")
        cfg, targets = settings.dobi, bench.targets
        t0 = time.perf_counter()
        ranks = dobi.meet_budget(trained.gammas, targets, settings.ratio, cfg.remap)
        ipca = bench.windows()[: cfg.ipca_windows] if cfg.ipca_windows else bench.windows()
        weights = dobi.ipca_weights(bench.lm.model, targets, ipca, ranks, cfg.ipca_extra, progress)
        if cfg.remap:
            weights = dobi.remap_weights(weights)
        allocation = dobi.allocation_of(ranks, targets, settings.ratio, cfg.remap, [h["task"] for h in trained.history])
        trained_ranks = dobi.ranks_from_gammas(trained.gammas, targets, cfg.remap)
        info = {"storage": dobi.storage_report(ranks, targets, cfg.remap),
                "note": dobi.budget_note(targets, settings.ratio, cfg.remap),
                "ratio_trained": dobi.storage_ratio(trained_ranks, targets, cfg.remap),
                "history": trained.history, "config": dobi.config_dict(cfg),
                "gamma_shift": dobi.gamma_shift(trained.gammas, targets, settings.ratio, cfg.remap)}
        return State(allocation, weights, info, {"ipca_update": time.perf_counter() - t0})

    def report_fields(self, info: dict, allocation) -> dict:
        # storage in bytes (16-bit dense baseline), the ratio the gammas reached, the loss curve
        return {"storage": info["storage"],
                "dobi": {k: info.get(k) for k in ("ratio_trained", "history", "config", "gamma_shift", "note")}}


HANDLERS: dict[str, MethodHandler] = {m: FactorHandler(m) for m in ("svd", "svd-llm", "dipsvd", "fwsvd", "asvd")}
HANDLERS["dobi"] = DobiHandler()


def handler(method: str) -> MethodHandler:
    if method not in HANDLERS:
        raise DipSVDError(f"unknown method '{method}'; use one of {', '.join(HANDLERS)}")
    return HANDLERS[method]
