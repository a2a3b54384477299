"""The probes, registered: a probe measures the loss increase of truncating one group of matrices at a time
(importance.group_sensitivity, at allocators.PROBE_KEEP, on the held-out windows BO uses), and an allocation
calibrates its estimate with it. A probe is declared once here, by `register_probe`: its kind, how it groups a
model's targeted matrices, its cache version and its words. That registers its pass (engine.passes), and
everything else reads the registry: the run's step and disk cache (run.probes, run.steps), the plan's memory and
time (one forward over the held-out windows per group, the largest group's truncated factors: plan.memory,
plan.timing), the app's "Probe ..." button. An allocation that needs it names its pass in its `needs` and reads
the result with `ctx.probe(settings, kind)` (a dict by group label).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..common.errors import DipSVDError
from ..engine import passes as P
from ..model.blocks import Target
from .importance import group_sensitivity, matrix_type

Groups = tuple[list[set[str]], list[str]]  # the groups of matrix names, and a label for each


@dataclass(frozen=True)
class Probe:
    kind: str  # "block", "type", ...
    step: str  # its pass (and plan phase), e.g. "block probe"
    version: str  # its disk cache's key prefix: change it when what the probe measures changes
    groups: Callable[[list[Target]], Groups]  # the targets -> the groups it cuts together, with their labels


PROBES: dict[str, Probe] = {}  # kind -> probe


def register_probe(kind: str, groups: Callable[[list[Target]], Groups], version: str, cost: str,
                   gives: str, button: str) -> str:
    """Declare a probe: `groups(targets)` gives the groups of matrix names it truncates one at a time and their
    labels; `cost` says what it runs and `gives` what an allocation gets from it, in a user's words; `button` is the
    app's ("Probe the blocks"). Registers its pass ("<kind> probe") and returns that name."""
    if kind in PROBES:
        raise ValueError(f"a probe of kind '{kind}' exists already")
    step = P.register_pass(f"{kind} probe", cost, (gives, button, f"Probing {button.removeprefix('Probe ')}"))
    PROBES[kind] = Probe(kind, step, version, groups)
    return step


def unregister_probe(kind: str) -> None:
    found = PROBES.pop(kind, None)
    if found is not None:
        P.unregister_pass(found.step)


def probe(kind: str) -> Probe:
    if kind not in PROBES:
        raise DipSVDError(f"unknown probe '{kind}'; use one of {', '.join(PROBES)}")
    return PROBES[kind]


def probe_of(step: str) -> Probe | None:
    """The probe whose pass is `step`, if it is one."""
    return next((p for p in PROBES.values() if p.step == step), None)


def probe_groups(targets: list[Target], kind: str) -> Groups:
    """The groups probe `kind` cuts together, with their labels."""
    return probe(kind).groups(targets)


def _by_block(targets: list[Target]) -> Groups:
    n_blocks = 1 + max(t.block for t in targets)
    return [{t.name for t in targets if t.block == b} for b in range(n_blocks)], [f"block {b + 1}" for b in range(n_blocks)]


def _by_type(targets: list[Target]) -> Groups:
    types = sorted({matrix_type(t.name) for t in targets})
    return [{t.name for t in targets if matrix_type(t.name) == ty} for ty in types], types


# each block alone (block 1, block 2, ...): coupled's calibration
BLOCK_PROBE = register_probe("block", _by_block, "probe-v1",
                             "one forward pass over the held-out windows with each block alone truncated",
                             "a calibration of its estimate by probing every block once", "Probe the blocks")
# every matrix of one type of the model (down_proj, gate_proj, ..., sorted): nested's calibration
TYPE_PROBE = register_probe("type", _by_type, "probe-types-v1",
                            "one forward pass over the held-out windows with all matrices of one type truncated",
                            "a calibration of its estimate by probing every matrix type once", "Probe the matrix types")


def block_sensitivity(model: nn.Module, targets: list[Target], factors, windows: torch.Tensor, keep: float,
                      progress=None) -> np.ndarray:
    """d_l: how much the mean next-token loss on `windows` grows when block l ALONE is truncated, every
    matrix of it at keep fraction `keep` (importance.truncated), one value per block."""
    return group_sensitivity(model, targets, factors, windows, keep, *probe_groups(targets, "block"), progress)


def type_sensitivity(model: nn.Module, targets: list[Target], factors, windows: torch.Tensor, keep: float,
                     progress=None) -> dict[str, float]:
    """d_type: how much the mean next-token loss on `windows` grows when every matrix of one type (all q_proj of
    the model, then all k_proj, ...) is truncated at keep fraction `keep`, the others dense."""
    groups, types = probe_groups(targets, "type")
    return dict(zip(types, group_sensitivity(model, targets, factors, windows, keep, groups, types, progress).tolist()))
