"""The flow in one object: model + text -> statistics -> factors -> allocation -> compressed model.

`Workbench` holds what is expensive (calibration windows, statistics, factors per FactorSpec, probes; each in
its own module of this package) so that the CLI, the sweep and the app all reuse it: a new ratio or allocation only slices cached
factors; a new weight, bar or whitening form refactors; new calibration data recollects. Statistics
and factors come from block-streaming passes (stream.py): what it holds for every block is small
(alpha, spectra, singular values); the factors themselves stay on disk and are read as slices.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..allocation import budget as alloc
from ..allocation.context import Context
from ..allocation.fisher import FisherInfo
from ..allocation.importance import importance, rank_spectra
from ..allocation.strategies import strategy
from ..common.errors import DipSVDError
from ..engine import passes as P
from ..engine.data import DEFAULT_CALIB, evaluation_windows
from ..engine.memwatch import PhaseMemory, lifetime_device_peak, lifetime_host_peak
from ..engine.stats import Stats
from ..lowrank.factors import Factor, FactorSpec
from ..lowrank.surgery import compress_model
from ..methods.handlers import handler, refines
from ..methods.settings import Settings, settings_dict  # noqa: F401 (the flow's entry names, re-exported)
from ..model.models import LoadedModel
from . import steps
from .calibration import Calibration
from .factor_cache import FactorCache
from .memo import Memo
from .probes import Probes


@dataclass
class Result:
    model: torch.nn.Module
    allocation: alloc.Allocation
    settings: Settings
    timings_s: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # dobi: {"storage", "history", "ratio_trained", ...}


def peak_memory_mb() -> float:
    rss = lifetime_host_peak() / 2**20  # the phases reset the kernel's high-water mark (memwatch)
    return max(rss, lifetime_device_peak() / 2**20)  # the device's across the phases' resets too


class Workbench:
    """One model and its calibration text, and what is expensive to make from them, made once and kept: the
    statistics and Fisher (`data`, calibration.py), the factors per FactorSpec (`factor_cache`), the probes
    (`probes`) and what a pass keeps in memory (`memo`). `steps.py` says, per pass, whether it has run."""

    def __init__(self, lm: LoadedModel, calib: str = DEFAULT_CALIB, calib_windows: int = 32, seqlen: int = 512,
                 seed: int = 0, memory: PhaseMemory | None = None):
        self.lm, self.calib, self.n_windows, self.seqlen, self.seed = lm, calib, calib_windows, seqlen, seed
        self.data = Calibration(lm, calib, calib_windows, seqlen, seed, memory)
        self.memo = Memo()
        self.factor_cache = FactorCache(self.data, self.memo)
        self.probes = Probes(self.data, self.factor_cache)
        self.timings_s = self.data.timings_s  # each pass's seconds, under its plan phase
        self.memory = self.data.memory  # each pass's measured peaks (the report's memory.phases)
        self._converted = False  # build(inplace=True) turned the original into the compressed model
        # what strategies and handlers get (allocation/context.py): these parts, never the Workbench itself
        self.context = Context(lm, lm.targets, self.data.windows, self.data.heldout, self.factor_cache.get,
                               self.factor_cache.has, self.importance, self.probes.coupled_weights,
                               self.probes.nested_weights, self.probes.labelled, self.memo, self.allocate, self.refine,
                               self.memory, self.timings_s.__setitem__, self.data.timed)

    @property
    def targets(self):
        return self.lm.targets

    def windows(self) -> torch.Tensor:
        return self.data.windows()

    def stats(self, progress=None) -> Stats:
        return self.data.stats(progress)

    def fisher(self, progress=None) -> FisherInfo:
        """Fisher sensitivity from backward passes over the calibration windows (cached on disk)."""
        return self.data.fisher(progress)

    def heldout(self, n_windows: int) -> torch.Tensor:
        """Calibration-split windows disjoint from the calibration windows (BO's objective, the probes)."""
        return self.data.heldout(n_windows)

    def factors(self, spec: FactorSpec, progress=None) -> dict[str, Factor]:
        """Every targeted matrix's factors for this spec: sigma in memory, the rest on disk (factor_cache.py)."""
        return self.factor_cache.get(spec, progress)

    # --- global importance (docs/DESIGN.md section 4) ---
    def importance(self, settings: Settings, progress=None) -> dict[str, np.ndarray]:
        """S, R, their normalised forms and Q, one value per block. The block spectra are computed once: a tau,
        energy or beta slider then only re-reads them."""
        return importance(self.fisher(progress), rank_spectra(self.stats(progress), settings.rank_of), settings.beta,
                          settings.tau, settings.energy)

    def allocate(self, settings: Settings, progress=None, callback=None, cancel=None) -> alloc.Allocation:
        """The registered allocation's ranks (strategies.py). For a search (bayes), `callback(i, value, best)`
        reports each call (return False to stop) and `cancel` (a threading.Event) stops it; the best point so
        far is returned, with its convergence in Allocation.history."""
        settings.check()
        chosen = strategy(settings.allocation)
        bounds = {"p_min": settings.p_min, "p_max": settings.p_max}
        return chosen.allocate(self.context, settings, bounds, progress=progress, callback=callback, cancel=cancel)

    def quick_build(self, settings: Settings, allocation_given: bool = False) -> bool:
        """Whether building for these settings is only a slice and a surgery: every pass it needs is in memory.
        The app then builds in the page's own run instead of a background job (issue 9: a sub-second step paid
        a second of job round trips). A search (bayes) is quick once its allocation is given."""
        if self.lm.offloaded:
            return False
        return not steps.missing(self, settings, allocation_given or not strategy(settings.allocation).reproducible)

    def build(self, settings: Settings, allocation: alloc.Allocation | None = None, progress=None,
              inplace: bool = False) -> Result:
        """The compressed copy for these settings; the original model is left untouched. With `inplace`
        the original itself is converted (a batch run that never uses it again peaks lower); this
        Workbench then builds nothing more. The method's handler (methods.py) builds the new state;
        surgery is the same for every method."""
        settings.check()
        if settings.distill.epochs:  # before the build's passes: a build that cannot be distilled says so first
            from ..refine.distill import check_distillable

            check_distillable(self.lm.model, inplace)
        state = handler(settings.method).new_state(self.context, settings, allocation, progress)
        if refines(settings.refine):
            with self.memory.phase(P.REFINE):
                state.weights, info = self.refine(settings, state.allocation, progress, fallback=state.weights)
            state.timings_s[P.REFINE] = info["seconds"]
            state.info = dict(state.info, refine=info)
        t0 = time.perf_counter()
        with self.memory.phase("surgery"):
            model = self._surgery(state.weights, inplace)
        surgery_s = time.perf_counter() - t0
        if settings.distill.epochs:  # its own text, when it has some, is written first: the timings after it
            state.info = dict(state.info, distill=self._distill(model, settings, progress))
        timings = dict(self.timings_s, **state.timings_s, surgery=surgery_s)
        if settings.distill.epochs:
            timings[P.DISTILL] = state.info["distill"]["seconds"]
        return Result(model, state.allocation, settings, timings, state.info)

    def _distill(self, model: torch.nn.Module, settings: Settings, progress=None) -> dict:
        """End-to-end distillation of a built model from the original (refine/distill.py), in place: its factors
        and norms trained on the calibration windows and the model's own text (written first, timed as writing),
        the epoch kept by the KL on held-out calibration windows. build() checked that it can run
        (check_distillable) before its passes."""
        from ..refine.distill import distill

        cfg = settings.distill
        fit = self.windows()
        if cfg.own_text:
            fit = torch.cat([fit, self.data.own_text(cfg.own_text, progress)])
        with self.memory.phase(P.DISTILL):
            info = distill(model, self.lm.model, fit, self.heldout(cfg.held), cfg, progress)
        return dict(info, own_text=cfg.own_text)

    def refine(self, settings: Settings, allocation: alloc.Allocation, progress=None,
               fallback: dict | None = None) -> tuple[dict, dict]:
        """Sequential compensation (refine.py) of this allocation's factored matrices: one more streaming pass.
        `fallback`, the unrefined factors, makes it validated: a block is refined only where that lowers its
        held-out error (the unrefined factors of these settings, sliced from the cache, when not given)."""
        from ..refine.choices import compensation_for, refine_choice
        from ..refine.sequential import refine

        spec = settings.spec
        abs_means = self.stats(progress).abs_means if P.STATISTICS in spec.scaling.needs else None
        rows = self.fisher(progress).rows if P.FISHER in spec.scaling.needs else None
        if fallback is None:
            from ..lowrank.surgery import low_rank_weights

            fallback = low_rank_weights(self.factors(spec, progress), allocation.ranks)
        return refine(self.lm.model, [t.name for t in self.targets], self.windows(), spec, allocation.ranks,
                      abs_means, rows, progress, fallback=fallback,
                      tune=settings.tune if refine_choice(settings.refine).tunes else None,
                      compensate=compensation_for(settings.compensate, settings.ratio))

    def _surgery(self, weights, inplace: bool) -> torch.nn.Module:
        if self._converted:
            raise DipSVDError("this model was already converted in place; load it again to build another")
        self._converted = inplace
        return compress_model(self.lm.model, weights, inplace=inplace)

    def eval_windows(self, source: str, max_tokens: int | None = 16384, seqlen: int | None = None) -> torch.Tensor:
        return evaluation_windows(self.lm.tokenizer, source, seqlen or self.seqlen, max_tokens)

