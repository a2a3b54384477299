"""One small handler per compression method, in the spirit of gpt-fast's QuantHandler, registered by name.

A handler declares the passes a build needs (`needs(settings)`, from passes.py; the plan, `quick_build`, the
sweep's prefetch and the app's buttons read it), builds the new state of a compression (what replaces each
targeted matrix, the allocation it realizes, and what the report should say about it), and says what a saved
model stores beyond its floating-point tensors. Converting the model for runtime is then the same for every
method (`Workbench.build` -> surgery.compress_model). The CLI, the sweep, the report and the app ask the handler
instead of testing method names.

- `FactorHandler`: one per registered scaling (scalings.py: svd, svd-llm, dipsvd, fwsvd, asvd, and any scaling
  registered later): factors computed once per FactorSpec in the block-streaming pass; a registered allocation
  (strategies.py) picks ranks; the new state is k rows of each factor, read from disk when surgery asks.
- `DobiHandler` (dobi): truncation positions trained by gradient descent (its own "trained" allocation, cached
  through the run's memo, context.py), then the IPCA weight update, optionally remapped to 8 bits; it owns its
  training, its cache key, its variant `dobi-remap` and the int8 tensors of a saved remapped model.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Mapping

import torch

from ..allocation import budget as alloc
from ..allocation.strategies import strategy
from ..common.errors import DipSVDError
from ..common.options import register_options
from ..engine import passes as P
from ..lowrank.scalings import SCALINGS
from .dobi import DobiConfig


def refines(refine: str) -> bool:
    """Whether a build refits its matrices after the allocation (refine.REFINE_CHOICES: none, sequential, block)."""
    from ..refine.choices import refine_choice

    return refine_choice(refine).refits


@dataclass
class State:
    """What a build replaces, before surgery."""

    allocation: alloc.Allocation
    weights: Mapping  # name -> (u, v)
    info: dict = field(default_factory=dict)  # method-specific, for the report
    timings_s: dict = field(default_factory=dict)


class MethodHandler:
    name = ""
    help = ""
    trains_ranks = False  # True: the method learns its own ranks (allocation "trained")
    refinable = True  # sequential compensation (refine.py) refits its factored matrices
    default_allocation = "uniform"  # what Settings gives where no allocation is named
    default_refine = "none"  # and where no refine is named
    variants: dict = {}  # other names for this method: name -> (settings -> settings) (a sweep's grid may use them)
    Options: type | None = None  # its own options (common/options.py), registered with it as settings.<name>

    @property
    def options_name(self) -> str | None:
        """The name of its own options in Settings (settings.<name>), None where it has none."""
        return self.name if self.Options is not None else None

    def describe(self, settings) -> str:
        """Its options in words, for the app ("" where it has none)."""
        return ""

    def spec(self, settings):
        """The FactorSpec of these settings (a factored method), or a DipSVDError saying why there is none."""
        raise NotImplementedError

    def needs(self, settings, allocation_given: bool = False) -> frozenset:
        """The passes (passes.py) a build for these settings runs."""
        raise NotImplementedError

    def check(self, settings) -> None:
        raise NotImplementedError

    def prepared(self, ctx, settings) -> bool:
        """Whether the expensive step (factors, training) is already in memory."""
        raise NotImplementedError

    def prepare(self, ctx, settings, progress=None, callback=None, cancel=None):
        raise NotImplementedError

    def new_state(self, ctx, settings, allocation: alloc.Allocation | None = None, progress=None) -> State:
        raise NotImplementedError

    def report_fields(self, info: dict, allocation: alloc.Allocation) -> dict:
        """Keys this method adds to the JSON report (and to a sweep row)."""
        return {"bo_history": allocation.history} if allocation.history else {}

    def row_fields(self, report: dict) -> dict:
        """Keys this method adds to a sweep's row, from its report."""
        return {}

    def saved_state(self, model, entry: dict):
        """The state dict to save where this method stores more than the model's own tensors, else None."""
        return None

    def loaded_state(self, state: dict, entry: dict, dtype, held: dict) -> dict:
        """One saved shard turned back into the model's tensors; a tensor that needs a companion from a later
        shard waits in `held` (which load_compressed passes from shard to shard and requires empty at the end)."""
        return state


class FactorHandler(MethodHandler):
    """A method whose matrices are factored once with a scaling (scalings.py) and then sliced."""

    def __init__(self, scaling):
        self.scaling, self.name, self.help, self.Options = scaling, scaling.name, scaling.help, scaling.Options
        self.default_allocation, self.default_refine = scaling.default_allocation, scaling.default_refine

    def describe(self, settings) -> str:
        return self.scaling.describe(self.spec(settings))

    def spec(self, settings):
        from ..lowrank.factors import FactorSpec

        own = getattr(settings, self.name) if self.Options is not None else None
        return FactorSpec(self.name, own, settings.compute_dtype, settings.factor_dtype)

    def needs(self, settings, allocation_given: bool = False) -> frozenset:
        chosen = frozenset() if allocation_given else strategy(settings.allocation).needs
        # Refine starts from the factors too: each block keeps its unrefined factors where refining does not
        # lower the held-out error (refine.py), so a refined build reads them as an unrefined one does.
        return chosen | self.scaling.needs | {P.FACTORS} | ({P.REFINE} if refines(settings.refine) else frozenset())

    def check(self, settings) -> None:
        self.spec(settings)  # validates its options and the dtypes
        owner = strategy(settings.allocation).own_of
        if owner not in (None, self.name):
            raise DipSVDError(f"allocation '{settings.allocation}' is {handler(owner).help.split(',')[0]}'s own; "
                              f"use it with method {owner}, not {self.name}")

    def prepared(self, ctx, settings) -> bool:
        return ctx.has_factors(self.spec(settings))

    def prepare(self, ctx, settings, progress=None, callback=None, cancel=None):
        return ctx.factors(self.spec(settings), progress)

    def new_state(self, ctx, settings, allocation=None, progress=None) -> State:
        from ..lowrank.surgery import low_rank_weights

        factors = self.prepare(ctx, settings, progress)
        t0 = time.perf_counter()
        allocation = allocation or ctx.allocate(settings, progress)
        weights = low_rank_weights(factors, allocation.ranks)  # refine starts from them
        return State(allocation, weights, timings_s={"allocation": time.perf_counter() - t0})


class DobiHandler(MethodHandler):
    name = "dobi"
    help = "Dobi-SVD, trained truncation of activations and an IPCA weight update"
    trains_ranks = True
    default_allocation = "trained"
    refinable = False  # its weights come from the IPCA update, not from factors refine can refit
    # grid names: Dobi-SVD with 8-bit remapping (settings -> the variant's settings)
    variants = {"dobi-remap": lambda s: dataclasses.replace(s, dobi=dataclasses.replace(s.dobi, remap=True))}
    Options = DobiConfig

    def spec(self, settings):
        raise DipSVDError("dobi has no SVD factors to slice: it trains truncation positions and rebuilds "
                          "the weights (Workbench.build does this)")

    def needs(self, settings, allocation_given: bool = False) -> frozenset:
        return frozenset({P.TRAINING, P.UPDATE})

    def check(self, settings) -> None:
        if strategy(settings.allocation).own_of != self.name:
            raise DipSVDError("dobi learns its own per-matrix ranks: use allocation 'trained' with it")

    def _key(self, settings) -> tuple:
        return (settings.ratio, settings.dobi)

    def prepared(self, ctx, settings) -> bool:
        return ctx.memo.has(P.TRAINING, self._key(settings))

    def prepare(self, ctx, settings, progress=None, callback=None, cancel=None):
        """Trained truncation positions for this ratio and config (memory, then disk cache, then training).
        A cancelled run is returned but not cached."""
        settings.check()
        return ctx.memo.get(P.TRAINING, self._key(settings),
                            lambda: self._train(ctx, settings, progress, callback, cancel),
                            keep=lambda trained: not trained.cancelled)

    def _train(self, ctx, settings, progress, callback, cancel):
        from ..common.cache import load_tensors, make_key, save_tensors
        from ..engine.stats import stats_key
        from . import dobi

        cfg = settings.dobi
        windows = ctx.windows()[: cfg.windows]
        if len(windows) < cfg.windows:
            raise DipSVDError(f"dobi_windows={cfg.windows} but only {len(windows)} calibration windows "
                              "exist; raise the calibration windows or lower dobi_windows")
        training = {k: v for k, v in dobi.config_dict(cfg).items() if not k.startswith("ipca")}  # not the update's
        disk = make_key("dobi-v7", stats_key(ctx.lm, windows), settings.ratio, training)
        targets = ctx.targets
        hit = load_tensors("dobi", disk)
        if hit is not None:
            t, meta = hit
            trained = dobi.Trained(dict(zip(meta["names"], t["gammas"].tolist())), meta["history"], 0.0)
        else:
            with ctx.memory.phase(P.TRAINING):
                trained = dobi.train_gammas(ctx.model, targets, windows, settings.ratio, cfg, progress,
                                            callback, cancel)
            if trained.cancelled:
                return trained
            save_tensors("dobi", disk, {"gammas": torch.tensor([trained.gammas[t.name] for t in targets])},
                         {"names": [t.name for t in targets], "history": trained.history,
                          "seconds": trained.seconds, "config": dobi.config_dict(cfg), "ratio": settings.ratio})
        ctx.record(P.TRAINING, trained.seconds)
        return trained

    def new_state(self, ctx, settings, allocation=None, progress=None) -> State:
        from . import dobi

        trained = self.prepare(ctx, settings, progress)
        if trained.cancelled:
            raise DipSVDError("Dobi-SVD training was cancelled; nothing was built")
        cfg, targets = settings.dobi, ctx.targets
        t0 = time.perf_counter()
        ranks = dobi.meet_budget(trained.gammas, targets, settings.ratio, cfg.remap)
        ipca = ctx.windows()[: cfg.ipca_windows] if cfg.ipca_windows else ctx.windows()
        with ctx.memory.phase(P.UPDATE):
            weights = dobi.ipca_weights(ctx.model, targets, ipca, ranks, cfg.ipca_extra, progress)
        if cfg.remap:
            weights = dobi.remap_weights(weights)
        allocation = dobi.allocation_of(ranks, targets, settings.ratio, cfg.remap, [h["task"] for h in trained.history])
        trained_ranks = dobi.ranks_from_gammas(trained.gammas, targets, cfg.remap)
        info = {"storage": dobi.storage_report(ranks, targets, cfg.remap),
                "note": dobi.budget_note(targets, settings.ratio, cfg.remap),
                "ratio_trained": dobi.storage_ratio(trained_ranks, targets, cfg.remap),
                "history": trained.history, "config": dobi.config_dict(cfg),
                "gamma_shift": dobi.gamma_shift(trained.gammas, targets, settings.ratio, cfg.remap)}
        return State(allocation, weights, info, {P.UPDATE: time.perf_counter() - t0})

    def report_fields(self, info: dict, allocation) -> dict:
        # storage in bytes (16-bit dense baseline), the ratio the gammas reached, the loss curve
        return {"storage": info["storage"],
                "dobi": {k: info.get(k) for k in ("ratio_trained", "history", "config", "gamma_shift", "note")}}

    def row_fields(self, report: dict) -> dict:
        d = report["dobi"]
        row = dict(storage=report["storage"], ratio_trained=d["ratio_trained"],
                   dobi_task_loss=[h["task"] for h in d["history"]], gamma_shift=d["gamma_shift"])
        if d["note"]:
            row["note"] = d["note"]
        return row

    def saved_state(self, model, entry: dict):
        """A remapped model goes to disk with u and v as int8 and per-vector scales."""
        if not entry.get("remap"):
            return None
        from .dobi import quantized_state

        state = model.state_dict()
        state.update(quantized_state(model))
        return state

    def loaded_state(self, state: dict, entry: dict, dtype, held: dict) -> dict:
        """Dequantize a remapped model's int8 tensors on load (the model runs in floating point), each as soon as
        both it and its `_scale` have been read."""
        if not entry.get("remap"):
            return state
        from .dobi_math import dequantize_absmax

        state = {**state, **{k: held.pop(k) for k in list(held)}}
        for key in [k for k in state if k.endswith("_scale")]:
            weight = key[: -len("_scale")]
            if weight not in state:
                continue
            scale = state.pop(key)
            state[weight] = dequantize_absmax(state[weight], scale,
                                              0 if weight.endswith(".u.weight") else 1).to(dtype)
        for key in [k for k in state if k.endswith("_scale") or state[k].dtype == torch.int8]:
            held[key] = state.pop(key)  # its companion comes in a later shard
        return state


HANDLERS: dict[str, MethodHandler] = {}  # the methods that are not a scaling's factors


def register_method(h: MethodHandler) -> MethodHandler:
    """Make `h` a method by its name (a factor method is a registered scaling instead: scalings.register_scaling);
    its Options (if any) become settings.<name>, a flag group and a box of widgets."""
    HANDLERS[h.name] = h
    if h.Options is not None:
        register_options(h.name, h.Options, f"{h.name}: {h.help}", "changes retrain")
    return h


register_method(DobiHandler())
_FACTORED: dict[str, FactorHandler] = {}  # one FactorHandler per registered scaling, made on first use


def handler(method: str) -> MethodHandler:
    if method in SCALINGS:
        if method not in _FACTORED or _FACTORED[method].scaling is not SCALINGS[method]:
            _FACTORED[method] = FactorHandler(SCALINGS[method])
        return _FACTORED[method]
    if method not in HANDLERS:
        raise DipSVDError(f"unknown method '{method}'; use one of {', '.join(method_names())}")
    return HANDLERS[method]


def method_names() -> tuple[str, ...]:
    """Every method: the registered scalings' factor methods, then the others (dobi)."""
    return (*SCALINGS, *HANDLERS)


def grid_names() -> tuple[str, ...]:
    """Every method and every variant a sweep's grid may name (dobi-remap)."""
    return (*method_names(), *[v for m in method_names() for v in handler(m).variants])


def resolve(name: str):
    """(method, settings -> settings) for a method or a variant name."""
    for m in method_names():
        if name in handler(m).variants:
            return m, handler(m).variants[name]
    return handler(name).name, lambda s: s


def needs(settings, allocation_given: bool = False) -> frozenset:
    """The passes a build for these settings runs (passes.py); with an allocation given, the allocation's own
    passes are left out. Distillation, after surgery, is any method's where its epochs are set."""
    return handler(settings.method).needs(settings, allocation_given) | (
        {P.DISTILL} if settings.distill.epochs else frozenset())
