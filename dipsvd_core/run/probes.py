"""The probes a run measures (every probe registered in allocation.probes: the block probe that calibrates coupled,
the type probe that calibrates nested, any other): the loss increase of each group of matrices truncated at
PROBE_KEEP on the held-out windows BO uses, measured once per factors and held-out windows and cached on disk; and
the allocators' weights w_m the two built-in ones calibrate.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ..allocation import allocators
from ..allocation import budget as alloc
from ..allocation.importance import group_sensitivity, matrix_type
from ..allocation.probes import PROBES, probe, probe_groups
from ..allocation.strategies import strategy
from ..common.cache import load_tensors, make_key, save_tensors
from ..engine.stats import stats_key
from ..methods.settings import Settings
from .calibration import Calibration
from .factor_cache import FactorCache


class Probes:
    def __init__(self, data: Calibration, factors: FactorCache):
        self.data, self.factors = data, factors
        self._measured: dict[tuple, np.ndarray] = {}  # (kind, factor key, held-out windows) -> d

    def has(self, settings: Settings, kind: str | None = None) -> bool:
        """Whether probe `kind` (allocation.probes; by default the first the allocation needs) for these factors
        is in memory or in the disk cache."""
        if kind is None:
            kind = next((p.kind for p in PROBES.values() if p.step in strategy(settings.allocation).needs), "block")
        if (kind, settings.spec.key, settings.bo_windows) in self._measured:
            return True
        if not self.factors.has(settings.spec) or load_tensors("probe", self._key(settings, kind)) is None:
            return False
        self.measure(settings, kind)  # from the cache: no probe runs
        return True

    def _key(self, settings: Settings, kind: str) -> str:
        return make_key(probe(kind).version, self.data.key, settings.spec.key,
                        stats_key(self.data.lm, self.data.heldout(settings.bo_windows)), allocators.PROBE_KEEP)

    def measure(self, settings: Settings, kind: str, progress=None) -> np.ndarray:
        """The measured loss increase of each group of probe `kind` (allocation.probes) truncated at PROBE_KEEP,
        on the held-out windows BO uses: from memory, else the disk cache, else measured and cached."""
        ident = (kind, settings.spec.key, settings.bo_windows)
        if ident not in self._measured:
            key = self._key(settings, kind)
            hit = load_tensors("probe", key)
            self._measured[ident] = hit[0]["d"].numpy() if hit is not None else self._run(settings, kind, key, progress)
        return self._measured[ident]

    def _run(self, settings: Settings, kind: str, key: str, progress) -> np.ndarray:
        lm, data = self.data.lm, self.data
        factors = self.factors.get(settings.spec, progress)
        groups, labels = probe_groups(lm.targets, kind)
        with data.timed(probe(kind).step):
            t0 = time.perf_counter()
            d = group_sensitivity(lm.model, lm.targets, factors, data.heldout(settings.bo_windows),
                                  allocators.PROBE_KEEP, groups, labels, progress)
            save_tensors("probe", key, {"d": torch.from_numpy(d)}, {"keep": allocators.PROBE_KEEP, "groups": labels,
                                                                   "seconds": time.perf_counter() - t0})
        return d

    def labelled(self, settings: Settings, kind: str, progress=None) -> dict[str, float]:
        """Probe `kind`'s loss increase per group, by the group's label (Context.probe)."""
        return dict(zip(probe_groups(self.data.lm.targets, kind)[1], self.measure(settings, kind, progress).tolist()))

    def block_sensitivity(self, settings: Settings, progress=None) -> np.ndarray:
        """d_l: the measured loss increase with block l alone truncated at PROBE_KEEP (coupled's calibration)."""
        return self.measure(settings, "block", progress)

    def type_sensitivity(self, settings: Settings, progress=None) -> dict[str, float]:
        """d_type: the measured loss increase with every matrix of one type truncated at PROBE_KEEP, the rest dense
        (nested's calibration)."""
        return self.labelled(settings, "type", progress)

    def coupled_weights(self, settings: Settings, progress=None) -> dict[str, float]:
        """The coupled allocator's w_m (allocators.py): the second-order weight from the Fisher pass, times each
        block's calibration from the block probe."""
        targets = self.data.lm.targets
        factors = self.factors.get(settings.spec, progress)
        raw = allocators.coupled_weights(factors, self.data.fisher(progress), targets)
        probe = self.block_sensitivity(settings, progress)
        keep = np.full(len(probe), allocators.PROBE_KEEP)
        predicted = allocators.weighted_loss(factors, raw, alloc.ranks_for(keep, targets), targets)
        c = allocators.calibrate(probe, predicted)
        return {t.name: raw[t.name] * float(c[t.block]) for t in targets}

    def nested_weights(self, settings: Settings, progress=None) -> dict[str, float]:
        """The nested allocator's w_m (allocators.py): the second-order weight from the Fisher pass, times its
        matrix type's calibration from the type probe."""
        targets = self.data.lm.targets
        factors = self.factors.get(settings.spec, progress)
        raw = allocators.coupled_weights(factors, self.data.fisher(progress), targets)
        c = allocators.calibrate_types(self.type_sensitivity(settings, progress), factors, raw, targets)
        return {t.name: raw[t.name] * c[matrix_type(t.name)] for t in targets}

    def predicted_loss(self, settings: Settings, allocation: alloc.Allocation) -> np.ndarray:
        """Per block: sum of the whitened losses L_m(k_m)^2 of its matrices (from the factors, cheap)."""
        return allocators.predicted_loss(self.factors.get(settings.spec), allocation.ranks, self.data.lm.targets)

