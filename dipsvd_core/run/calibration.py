"""The calibration side of a run: the windows, and the two data passes every allocation reads (statistics and
Fisher), each made once and timed; held-out windows disjoint from the calibration ones.

It owns what the other parts of a run share: the measured peak of each pass (`memory`) and its seconds
(`timings_s`, keyed by the pass's plan phase, engine.passes), so a run can be checked against its plan.
"""
from __future__ import annotations

import contextlib
import time

import torch

from ..allocation.fisher import FisherInfo, cached_fisher
from ..common.errors import DipSVDError
from ..engine import passes as P
from ..engine.data import SELF, calibration_windows, heldout_windows
from ..engine.memwatch import PhaseMemory
from ..engine.self_text import CALIBRATION_TEXT, DISTILL_TEXT, self_stream
from ..engine.stats import Stats, cached_stats, save_stats, stats_key
from ..model.models import LoadedModel


class Calibration:
    def __init__(self, lm: LoadedModel, calib: str, n_windows: int, seqlen: int, seed: int,
                 memory: PhaseMemory | None = None):
        self.lm, self.calib, self.n_windows, self.seqlen, self.seed = lm, calib, n_windows, seqlen, seed
        self._windows: torch.Tensor | None = None
        self._stats: Stats | None = None
        self._fisher: FisherInfo | None = None
        self._heldout: dict[int, torch.Tensor] = {}  # held-out windows, per count
        self.timings_s: dict[str, float] = {}
        self.memory = memory if memory is not None else PhaseMemory()  # each pass's measured peaks (the report's memory.phases)

    def windows(self, progress=None) -> torch.Tensor:
        """The calibration windows (for the `self` source the model writes them first, reported to `progress`)."""
        if self._windows is None:
            self._windows = calibration_windows(self.lm.tokenizer, self.calib, self.n_windows, self.seqlen, self.seed,
                                                lambda n: self._writer(n, progress))
        return self._windows

    def own_text(self, n_windows: int, progress=None) -> torch.Tensor:
        """`n_windows` windows of the text the model writes for distillation to train on (self_text.DISTILL_TEXT: a
        stream apart from the `self` source's, so none of it is a calibration or held-out window), timed as writing."""
        return calibration_windows(self.lm.tokenizer, SELF, n_windows, self.seqlen, self.seed,
                                   lambda n: self._writer(n, progress, DISTILL_TEXT))

    def _writer(self, n_tokens: int, progress=None, purpose: str = CALIBRATION_TEXT) -> torch.Tensor:
        """The model's own text, for the `self` source or for distillation (written once per model, seed and purpose,
        then read from the cache)."""
        if self.lm.offloaded:
            raise DipSVDError(f"calibration text '{self.calib}' has the model write text itself, token by token; with "
                              "blocks offloaded every token would stream the model from the CPU (hours at 8B). Load it "
                              "on one device (a larger --device-memory) or calibrate on another source")
        # in parts (the calibration windows, then held-out ones), inside whichever pass first drew them
        with self.timed(P.WRITING, accumulate=True):
            return self_stream(self.lm.model, self.lm.tokenizer, self.lm.fingerprint, n_tokens, self.seed, progress,
                               purpose)

    @property
    def key(self) -> str:
        """The cache key of the calibration windows on this model (statistics, Fisher, factors and probes)."""
        return stats_key(self.lm, self.windows())

    @property
    def has_stats(self) -> bool:
        return self._stats is not None

    @property
    def has_fisher(self) -> bool:
        return self._fisher is not None

    @contextlib.contextmanager
    def timed(self, phase: str, accumulate: bool = False):
        """Run the body as pass `phase`: its peak measured, its seconds recorded in `timings_s` (added to what it
        recorded before, with `accumulate`: a pass made in parts)."""
        t0 = time.perf_counter()
        with self.memory.phase(phase):
            yield
        self.timings_s[phase] = time.perf_counter() - t0 + (self.timings_s.get(phase, 0.0) if accumulate else 0.0)

    def stats(self, progress=None) -> Stats:
        if self._stats is None:
            with self.timed(P.STATISTICS):
                self._stats = cached_stats(self.lm, self.windows(progress), progress)
        return self._stats

    def adopt_stats(self, stats: Stats) -> None:
        """Statistics that another pass collected on the way (the Gram factoring pass): kept and cached on disk,
        unless some are already here."""
        if self._stats is None:
            save_stats(self.key, stats)
            self._stats = stats
            self.timings_s[P.STATISTICS] = stats.seconds

    def fisher(self, progress=None) -> FisherInfo:
        """Fisher sensitivity from backward passes over the calibration windows (cached on disk)."""
        if self._fisher is None:
            with self.timed(P.FISHER):
                self._fisher = cached_fisher(self.lm, self.windows(progress), self.key, progress)
        return self._fisher

    def heldout(self, n_windows: int) -> torch.Tensor:
        """Calibration-split windows disjoint from the calibration windows (BO's objective, the probes, refine's
        held-out check)."""
        if n_windows not in self._heldout:
            self._heldout[n_windows] = heldout_windows(self.lm.tokenizer, self.calib, n_windows, self.seqlen, self.seed,
                                                       skip=self.n_windows, writer=self._writer)
        return self._heldout[n_windows]
