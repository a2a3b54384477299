"""Every targeted matrix's full-rank factors, once per FactorSpec: sigma in memory, the rest on disk (FactorStore),
read as slices. Factor once, truncate many: a new ratio or allocation only slices what is here.

A scaling that whitens by the Grams factors each block inside one block-streaming statistics pass (for every such
spec at once, while the block's Grams exist); the others factor block by block from the weights.
"""
from __future__ import annotations

import contextlib
import time

from ..allocation.strategies import OBJECTIVE
from ..common.cache import cache_dir, make_key
from ..engine import passes as P
from ..engine.stats import stream_stats
from ..engine.stream import release_host_memory
from ..lowrank.factors import Factor, FactorSpec, FactorStore, ScaleData, factor_model
from ..model.offload import weights_of
from .calibration import Calibration
from .memo import Memo


class FactorCache:
    def __init__(self, data: Calibration, memo: Memo):
        self.data, self.memo = data, memo
        self._factors: dict[tuple, dict[str, Factor]] = {}

    def has(self, spec: FactorSpec) -> bool:
        return spec.key in self._factors

    def get(self, spec: FactorSpec, progress=None) -> dict[str, Factor]:
        if spec.key not in self._factors:
            self.prefactor([spec], progress)
        return self._factors[spec.key]

    def drop(self, spec: FactorSpec) -> None:
        """Free one method's factors (and its BO model copies); they reload from the disk cache."""
        self._factors.pop(spec.key, None)
        self.memo.drop(OBJECTIVE, lambda key: key[0] == spec.key)

    def _store(self, spec: FactorSpec) -> FactorStore:
        reads, lm = spec.scaling.needs, self.data.lm
        fisher = self.data.fisher() if P.FISHER in reads else None
        # a scaling that reads no data is keyed by the weights alone ("svd-": the name predates the registry)
        data = self.data.key if reads else f"svd-{lm.fingerprint}"
        return FactorStore(cache_dir() / "factors" / make_key("factors-v3", data, spec.key,
                                                              *([fisher.key] if fisher is not None else [])))

    def prefactor(self, specs: list[FactorSpec], progress=None) -> None:
        """Factors for several specs: from the disk cache where they are, else computed, the Gram methods
        (svd-llm, dipsvd, any weights) all in ONE block-streaming pass that factors each block for every
        spec while its Grams exist; the others block by block from the weights. Measured as the factors phase
        (with the statistics the Gram pass collects on the way)."""
        if all(spec.key in self._factors for spec in specs):
            return
        with self.data.memory.phase(P.FACTORS):
            self._prefactor(specs, progress)

    def _pending(self, specs: list[FactorSpec], progress) -> list[tuple[FactorSpec, FactorStore]]:
        """The specs whose factors are neither in memory nor complete on disk (those on disk are loaded)."""
        pending = []
        for spec in dict.fromkeys(specs):
            if spec.key in self._factors:
                continue
            if P.FISHER in spec.scaling.needs:
                self.data.fisher(progress)
            store = self._store(spec)
            hit = store.load() if store.complete else None
            if hit is not None:
                self._factors[spec.key] = hit
            else:
                pending.append((spec, store))
        return pending

    def _prefactor(self, specs: list[FactorSpec], progress=None) -> None:
        t0 = time.perf_counter()
        pending = self._pending(specs, progress)
        if not pending:
            return
        lm, data = self.data.lm, self.data
        mods = dict(lm.model.named_modules())
        outs = {spec.key: ({}, {}) for spec, _ in pending}

        def factor_block(b: int, todo, scale: ScaleData) -> None:
            if progress:
                progress(b / lm.n_blocks, f"block {b + 1}/{lm.n_blocks}: factoring")
            names = [t.name for t in lm.targets if t.block == b]
            with contextlib.ExitStack() as stack:  # offloaded blocks: their weights on the execution device
                for n in names:
                    stack.enter_context(weights_of(mods[n]))
                for spec, store in todo:
                    rows = data.fisher().rows if P.FISHER in spec.scaling.needs else None
                    factors = factor_model({n: mods[n].weight for n in names}, spec, scale.group_of, scale.grams,
                                           scale.abs_means, rows)
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
            stats = stream_stats(lm.model, [t.name for t in lm.targets], data.windows(progress),
                                 lambda b, st: factor_block(b, gram, ScaleData(st.group_of, st.grams)), progress)
            stats_s = stats.seconds
            data.adopt_stats(stats)  # the same pass gave the statistics: keep them
        for spec, store in other:
            stats = data.stats(progress) if P.STATISTICS in spec.scaling.needs else None
            for b in range(lm.n_blocks):
                factor_block(b, [(spec, store)], ScaleData(stats and stats.group_of, None, stats and stats.abs_means))
        for spec, store in pending:
            out, block_of = outs[spec.key]
            store.finish(block_of, out, {"spec": list(spec.key)})
            self._factors[spec.key] = out
        if progress:
            progress(1.0, f"block {lm.n_blocks}/{lm.n_blocks}: factors written")
        data.timings_s[P.FACTORS] = time.perf_counter() - t0 - stats_s
