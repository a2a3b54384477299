"""What a run hands to an allocation strategy (strategies.py) and a method handler (methods/handlers.py): the model
and its targets, the calibration and held-out windows, the caches (factors, probes, a memo), and the two things a
strategy or a handler may do to the run, each through one call: ask for another allocation or a refine, and record
its own pass's seconds and peak (`timed`). Never the run itself: a strategy cannot reach the Workbench's state, and
adding one needs nothing of the run but what is here. `run/pipeline.py` (Workbench.context) makes it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Context:
    lm: object  # the LoadedModel (model, tokenizer, fingerprint); its weights are only read
    targets: list
    windows: Callable[[], torch.Tensor]  # the calibration windows
    heldout: Callable[[int], torch.Tensor]  # n held-out windows, disjoint from the calibration ones
    factors: Callable  # (spec, progress=None) -> {name: Factor}, each spec factored once
    has_factors: Callable  # (spec) -> bool: factored already (in memory or on disk)
    importance: Callable  # (settings, progress=None) -> {"S", "R", ..., "Q"}, one value per block
    coupled_weights: Callable  # (settings, progress=None): the probes' loss weights (run/probes.py)
    nested_weights: Callable  # (settings, progress=None)
    probe: Callable  # (settings, kind, progress=None) -> {label: d}: a registered probe's loss increases (probes.py)
    memo: object  # get(kind, key, make) / has(kind, key): what a pass keeps in memory (run/memo.py)
    allocate: Callable  # (settings, progress=None) -> Allocation: another registered allocation
    refine: Callable  # (settings, allocation) -> (weights, info): the refined factors of an allocation
    memory: object  # PhaseMemory: the measured peak of each pass
    record: Callable[[str, float], None]  # (phase, seconds): a pass's time, under its plan phase (engine.passes)
    timed: Callable  # (phase) -> a context: the body run as that pass, its peak and seconds recorded (Calibration.timed)

    @property
    def model(self) -> torch.nn.Module:
        return self.lm.model
