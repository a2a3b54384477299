"""The flow in one object: model + text -> statistics -> factors -> allocation -> compressed model.

`Workbench` holds what is expensive (calibration windows, statistics, factors per FactorSpec) so
that the CLI, the sweep and the app all reuse it: a new ratio or allocation only slices cached
factors; a new weight, bar or whitening form refactors; new calibration data recollects. Statistics
and factors come from block-streaming passes (stream.py): what it holds for every block is small
(alpha, spectra, singular values); the factors themselves stay on disk and are read as slices.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..allocation import allocators
from ..allocation import budget as alloc
from ..allocation.fisher import FisherInfo, cached_fisher
from ..allocation.importance import effective_ranks, importance, rank_spectra
from ..allocation.strategies import OBJECTIVE, strategy
from ..common.cache import cache_dir, load_tensors, make_key, save_tensors
from ..common.errors import DipSVDError
from ..engine import passes as P
from ..engine.data import DEFAULT_CALIB, calibration_windows, evaluation_windows, heldout_windows
from ..engine.memwatch import PhaseMemory, lifetime_device_peak, lifetime_host_peak
from ..engine.stats import Stats, cached_stats, save_stats, stats_key, stream_stats
from ..engine.stream import release_host_memory
from ..lowrank.factors import Factor, FactorSpec, FactorStore, ScaleData, factor_model
from ..lowrank.surgery import compress_model
from ..methods.handlers import handler, needs, refines
from ..methods.settings import Settings, settings_dict  # noqa: F401 (the flow's entry names, re-exported)
from ..model.models import LoadedModel, weights_of

PROBE_CACHE = {"block": ("probe-v1", P.BLOCK_PROBE), "type": ("probe-types-v1", P.TYPE_PROBE)}  # cache key, pass


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
    def __init__(self, lm: LoadedModel, calib: str = DEFAULT_CALIB, calib_windows: int = 32, seqlen: int = 512,
                 seed: int = 0):
        self.lm, self.calib, self.n_windows, self.seqlen, self.seed = lm, calib, calib_windows, seqlen, seed
        self._windows: torch.Tensor | None = None
        self._stats: Stats | None = None
        self._factors: dict[tuple, dict[str, Factor]] = {}
        self._fisher: FisherInfo | None = None
        self._cached: dict[tuple, object] = {}  # (kind, key) -> what a pass made (cached): BO objectives, Dobi-SVD's training
        # the probes that calibrate the coupled (per block) and nested (per matrix type) allocations, per
        # (kind, factor key, held-out windows)
        self._probes: dict[tuple, np.ndarray] = {}
        self._heldout: dict[int, torch.Tensor] = {}  # held-out windows, per count
        self.timings_s: dict[str, float] = {}
        self.memory = PhaseMemory()  # each pass's measured peaks (the report's memory.phases)
        self._converted = False  # build(inplace=True) turned the original into the compressed model

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
            with self.memory.phase(P.STATISTICS):
                self._stats = cached_stats(self.lm, self.windows(), progress)
            self.timings_s[P.STATISTICS] = time.perf_counter() - t0
        return self._stats

    def has_factors(self, spec: FactorSpec) -> bool:
        return spec.key in self._factors

    def factors(self, spec: FactorSpec, progress=None) -> dict[str, Factor]:
        """Every targeted matrix's factors for this spec: sigma in memory, the rest on disk (FactorStore).
        A method that whitens with the Grams runs one block-streaming pass (statistics and factors of
        a block, then the next); the others factor block by block from the weights."""
        if spec.key not in self._factors:
            self.prefactor([spec], progress)
        return self._factors[spec.key]

    def _store(self, spec: FactorSpec) -> FactorStore:
        reads = spec.scaling.needs
        fisher = self.fisher() if P.FISHER in reads else None
        # a scaling that reads no data is keyed by the weights alone ("svd-": the name predates the registry)
        data = stats_key(self.lm, self.windows()) if reads else f"svd-{self.lm.fingerprint}"
        return FactorStore(cache_dir() / "factors" / make_key("factors-v3", data, spec.key,
                                                              *([fisher.key] if fisher is not None else [])))

    def prefactor(self, specs: list[FactorSpec], progress=None) -> None:
        """Factors for several specs: from the disk cache where they are, else computed, the Gram methods
        (svd-llm, dipsvd, any weights) all in ONE block-streaming pass that factors each block for every
        spec while its Grams exist; the others block by block from the weights. Measured as the factors phase
        (with the statistics the Gram pass collects on the way)."""
        if all(spec.key in self._factors for spec in specs):
            return
        with self.memory.phase(P.FACTORS):
            self._prefactor(specs, progress)

    def _prefactor(self, specs: list[FactorSpec], progress=None) -> None:
        t0 = time.perf_counter()
        pending = []
        for spec in dict.fromkeys(specs):
            if spec.key in self._factors:
                continue
            if P.FISHER in spec.scaling.needs:
                self.fisher(progress)
            store = self._store(spec)
            hit = store.load() if store.complete else None
            if hit is not None:
                self._factors[spec.key] = hit
            else:
                pending.append((spec, store))
        if not pending:
            return
        mods = dict(self.lm.model.named_modules())
        n_blocks = self.lm.n_blocks
        outs = {spec.key: ({}, {}) for spec, _ in pending}

        def factor_block(b: int, todo, data: ScaleData) -> None:
            if progress:
                progress(b / n_blocks, f"block {b + 1}/{n_blocks}: factoring")
            names = [t.name for t in self.targets if t.block == b]
            with contextlib.ExitStack() as stack:  # offloaded blocks: their weights on the execution device
                for n in names:
                    stack.enter_context(weights_of(mods[n]))
                for spec, store in todo:
                    rows = self.fisher().rows if P.FISHER in spec.scaling.needs else None
                    factors = factor_model({n: mods[n].weight for n in names}, spec, data.group_of, data.grams,
                                           data.abs_means, rows)
                    out, block_of = outs[spec.key]
                    out.update(store.write_block(b, factors))
                    block_of.update({n: b for n in names})
                    del factors
            release_host_memory()

        for _, store in pending:
            store.start()
        gram = [(spec, store) for spec, store in pending if P.GRAMS in spec.scaling.needs]
        other = [(spec, store) for spec, store in pending if P.GRAMS not in spec.scaling.needs]
        stats_s = 0.0
        if gram:
            stats = stream_stats(self.lm.model, [t.name for t in self.targets], self.windows(),
                                 lambda b, st: factor_block(b, gram, ScaleData(st.group_of, st.grams)), progress)
            stats_s = stats.seconds
            if self._stats is None:  # the same pass gave the statistics: keep them
                save_stats(stats_key(self.lm, self.windows()), stats)
                self._stats = stats
                self.timings_s[P.STATISTICS] = stats_s
        for spec, store in other:
            stats = self.stats(progress) if P.STATISTICS in spec.scaling.needs else None
            for b in range(n_blocks):
                factor_block(b, [(spec, store)], ScaleData(stats and stats.group_of, None, stats and stats.abs_means))
        for spec, store in pending:
            out, block_of = outs[spec.key]
            store.finish(block_of, out, {"spec": list(spec.key)})
            self._factors[spec.key] = out
        if progress:
            progress(1.0, f"block {n_blocks}/{n_blocks}: factors written")
        self.timings_s[P.FACTORS] = time.perf_counter() - t0 - stats_s

    def drop_factors(self, spec: FactorSpec) -> None:
        """Free one method's factors (and its BO model copies); they reload from the disk cache."""
        self._factors.pop(spec.key, None)
        for k in [k for k in self._cached if k[0] == OBJECTIVE and k[1][0] == spec.key]:
            del self._cached[k]

    def cached(self, kind: str, key, make, keep=lambda value: True):
        """What `make()` returns, made once per (kind, key) and kept in memory while `keep(value)` says so
        (a pass's own disk cache, if any, lives inside `make`)."""
        if (kind, key) not in self._cached:
            value = make()
            if not keep(value):
                return value
            self._cached[(kind, key)] = value
        return self._cached[(kind, key)]

    def has_cached(self, kind: str, key) -> bool:
        return (kind, key) in self._cached

    # --- global importance (docs/DESIGN.md section 4) ---
    def fisher(self, progress=None) -> FisherInfo:
        """Fisher sensitivity from backward passes over the calibration windows (cached on disk)."""
        if self._fisher is None:
            t0 = time.perf_counter()
            with self.memory.phase(P.FISHER):
                self._fisher = cached_fisher(self.lm, self.windows(), stats_key(self.lm, self.windows()), progress)
            self.timings_s[P.FISHER] = time.perf_counter() - t0
        return self._fisher

    def block_spectra(self, progress=None, rank_of: str = "output") -> list[torch.Tensor]:
        """Eigenvalues (sigma^2) of every block output's Gram (or of the Gram without its massive dimensions,
        importance.RANKS_OF), computed once: a tau, energy or beta slider then only re-reads them."""
        return rank_spectra(self.stats(progress), rank_of)

    def effective_ranks(self, tau: float = 0.95, energy: str = "sigma2", rank_of: str = "output") -> np.ndarray:
        return effective_ranks(self.block_spectra(rank_of=rank_of), tau, energy)

    def importance(self, settings: Settings, progress=None) -> dict[str, np.ndarray]:
        """S, R, their normalised forms and Q, one value per block."""
        return importance(self.fisher(progress), self.block_spectra(progress, settings.rank_of), settings.beta,
                          settings.tau, settings.energy)

    def heldout(self, n_windows: int) -> torch.Tensor:
        """Calibration-split windows disjoint from the calibration windows (BO's objective, the coupled probe)."""
        if n_windows not in self._heldout:
            self._heldout[n_windows] = heldout_windows(self.lm.tokenizer, self.calib, n_windows, self.seqlen, self.seed,
                                                       skip=self.n_windows)
        return self._heldout[n_windows]

    def allocate(self, settings: Settings, progress=None, callback=None, cancel=None) -> alloc.Allocation:
        """The registered allocation's ranks (strategies.py). For a search (bayes), `callback(i, value, best)`
        reports each call (return False to stop) and `cancel` (a threading.Event) stops it; the best point so
        far is returned, with its convergence in Allocation.history."""
        settings.check()
        chosen = strategy(settings.allocation)
        bounds = {"p_min": settings.p_min, "p_max": settings.p_max}
        return chosen.allocate(self, settings, bounds, progress=progress, callback=callback, cancel=cancel)

    def has_pass(self, name: str, settings: Settings) -> bool:
        """Whether what pass `name` gives for these settings is in memory (or, for a probe, in the disk cache)."""
        return {P.STATISTICS: lambda: self._stats is not None, P.GRAMS: lambda: self.has_factors(settings.spec),
                P.FISHER: lambda: self._fisher is not None, P.FACTORS: lambda: self.has_factors(settings.spec),
                P.BLOCK_PROBE: lambda: self.has_probe(settings, "block"),
                P.TYPE_PROBE: lambda: self.has_probe(settings, "type"),
                P.TRAINING: lambda: handler(settings.method).prepared(self, settings),
                P.SEARCH: lambda: False, P.UPDATE: lambda: False, P.REFINE: lambda: False}[name]()

    def run_pass(self, name: str, settings: Settings, progress=None, callback=None, cancel=None):
        """Run pass `name` for these settings (the app's buttons call this); a search returns its allocation."""
        return {P.STATISTICS: lambda: self.stats(progress), P.FISHER: lambda: self.fisher(progress),
                P.GRAMS: lambda: self.factors(settings.spec, progress),
                P.FACTORS: lambda: self.factors(settings.spec, progress),
                P.BLOCK_PROBE: lambda: self._probe(settings, "block", progress),
                P.TYPE_PROBE: lambda: self._probe(settings, "type", progress),
                P.TRAINING: lambda: handler(settings.method).prepare(self, settings, progress, callback, cancel),
                P.SEARCH: lambda: self.allocate(settings, progress, callback, cancel)}[name]()

    def missing(self, settings: Settings, allocation_given: bool = False) -> list[str]:
        """The passes these settings need that have not run yet, in the order of passes.PASSES."""
        want = needs(settings, allocation_given)
        return [p for p in P.PASSES if p in want and not self.has_pass(p, settings)]

    def quick_build(self, settings: Settings, allocation_given: bool = False) -> bool:
        """Whether building for these settings is only a slice and a surgery: every pass it needs is in memory.
        The app then builds in the page's own run instead of a background job (issue 9: a sub-second step paid
        a second of job round trips). A search (bayes) is quick once its allocation is given."""
        if self.lm.offloaded:
            return False
        return not self.missing(settings, allocation_given or not strategy(settings.allocation).reproducible)

    def coupled_weights(self, settings: Settings, progress=None) -> dict[str, float]:
        """The coupled allocator's w_m (allocators.py): the second-order weight from the Fisher pass, times each
        block's calibration from the probe (measured once per factors and held-out windows, cached on disk)."""
        spec = settings.spec
        factors = self.factors(spec, progress)
        raw = allocators.coupled_weights(factors, self.fisher(progress), self.targets)
        probe = self.block_sensitivity(settings, progress)
        keep = np.full(len(probe), allocators.PROBE_KEEP)
        predicted = allocators.weighted_loss(factors, raw, alloc.ranks_for(keep, self.targets), self.targets)
        c = allocators.calibrate(probe, predicted)
        return {t.name: raw[t.name] * float(c[t.block]) for t in self.targets}

    def nested_weights(self, settings: Settings, progress=None) -> dict[str, float]:
        """The nested allocator's w_m (allocators.py): the second-order weight from the Fisher pass, times its
        matrix type's calibration from the type probe (measured once per factors and held-out windows, cached)."""
        from ..allocation.importance import matrix_type

        factors = self.factors(settings.spec, progress)
        raw = allocators.coupled_weights(factors, self.fisher(progress), self.targets)
        c = allocators.calibrate_types(self.type_sensitivity(settings, progress), factors, raw, self.targets)
        return {t.name: raw[t.name] * c[matrix_type(t.name)] for t in self.targets}

    def has_probe(self, settings: Settings, kind: str | None = None) -> bool:
        """Whether the probe (`kind` block or type; by default the one the allocation needs) for these factors is
        in memory or in the disk cache."""
        if kind is None:
            kind = "type" if P.TYPE_PROBE in strategy(settings.allocation).needs else "block"
        if (kind, settings.spec.key, settings.bo_windows) in self._probes:
            return True
        if not self.has_factors(settings.spec) or load_tensors("probe", self._probe_key(settings, kind)) is None:
            return False
        self._probe(settings, kind)  # from the cache: no probe runs
        return True

    def _probe_key(self, settings: Settings, kind: str) -> str:
        return make_key(PROBE_CACHE[kind][0], stats_key(self.lm, self.windows()), settings.spec.key,
                        stats_key(self.lm, self.heldout(settings.bo_windows)), allocators.PROBE_KEEP)

    def _probe(self, settings: Settings, kind: str, progress=None) -> np.ndarray:
        """The measured loss increase of each group of a probe (importance.probe_groups) truncated at PROBE_KEEP,
        on the held-out windows BO uses: from memory, else the disk cache, else measured and cached."""
        from ..allocation.importance import group_sensitivity, probe_groups

        ident = (kind, settings.spec.key, settings.bo_windows)
        if ident not in self._probes:
            key = self._probe_key(settings, kind)
            hit = load_tensors("probe", key)
            if hit is not None:
                self._probes[ident] = hit[0]["d"].numpy()
            else:
                factors = self.factors(settings.spec, progress)
                t0 = time.perf_counter()
                groups, labels = probe_groups(self.targets, kind)
                with self.memory.phase(PROBE_CACHE[kind][1]):
                    d = group_sensitivity(self.lm.model, self.targets, factors, self.heldout(settings.bo_windows),
                                          allocators.PROBE_KEEP, groups, labels, progress)
                save_tensors("probe", key, {"d": torch.from_numpy(d)}, {"keep": allocators.PROBE_KEEP, "groups": labels,
                                                                       "seconds": time.perf_counter() - t0})
                self.timings_s[PROBE_CACHE[kind][1]] = time.perf_counter() - t0
                self._probes[ident] = d
        return self._probes[ident]

    def block_sensitivity(self, settings: Settings, progress=None) -> np.ndarray:
        """d_l: the measured loss increase with block l alone truncated at PROBE_KEEP (coupled's calibration)."""
        return self._probe(settings, "block", progress)

    def type_sensitivity(self, settings: Settings, progress=None) -> dict[str, float]:
        """d_type: the measured loss increase with every matrix of one type truncated at PROBE_KEEP, the rest dense
        (nested's calibration)."""
        from ..allocation.importance import probe_groups

        return dict(zip(probe_groups(self.targets, "type")[1], self._probe(settings, "type", progress).tolist()))

    def predicted_loss(self, settings: Settings, allocation: alloc.Allocation) -> np.ndarray:
        """Per block: sum of the whitened losses L_m(k_m)^2 of its matrices (from the factors, cheap)."""
        return allocators.predicted_loss(self.factors(settings.spec), allocation.ranks, self.targets)

    def build(self, settings: Settings, allocation: alloc.Allocation | None = None, progress=None,
              inplace: bool = False) -> Result:
        """The compressed copy for these settings; the original model is left untouched. With `inplace`
        the original itself is converted (a batch run that never uses it again peaks lower); this
        Workbench then builds nothing more. The method's handler (methods.py) builds the new state;
        surgery is the same for every method."""
        settings.check()
        state = handler(settings.method).new_state(self, settings, allocation, progress)
        if refines(settings.refine):
            with self.memory.phase(P.REFINE):
                state.weights, info = self.refine(settings, state.allocation, progress, fallback=state.weights)
            state.timings_s[P.REFINE] = info["seconds"]
            state.info = dict(state.info, refine=info)
        t0 = time.perf_counter()
        with self.memory.phase("surgery"):
            model = self._surgery(state.weights, inplace)
        timings = dict(self.timings_s, **state.timings_s, surgery=time.perf_counter() - t0)
        return Result(model, state.allocation, settings, timings, state.info)

    def refine(self, settings: Settings, allocation: alloc.Allocation, progress=None,
               fallback: dict | None = None) -> tuple[dict, dict]:
        """Sequential compensation (refine.py) of this allocation's factored matrices: one more streaming pass.
        `fallback`, the unrefined factors, makes it validated: a block is refined only where that lowers its
        held-out error (the unrefined factors of these settings, sliced from the cache, when not given)."""
        from ..refine.choices import refine_choice
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
                      compensate=settings.compensate)

    def _surgery(self, weights, inplace: bool) -> torch.nn.Module:
        if self._converted:
            raise DipSVDError("this model was already converted in place; load it again to build another")
        self._converted = inplace
        return compress_model(self.lm.model, weights, inplace=inplace)

    def eval_windows(self, source: str, max_tokens: int | None = 16384, seqlen: int | None = None) -> torch.Tensor:
        return evaluation_windows(self.lm.tokenizer, source, seqlen or self.seqlen, max_tokens)

