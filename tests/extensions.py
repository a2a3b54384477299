"""A test-only allocation and a test-only scaling, each one small definition plus one registration line, and (in
extension_probe.py, one file) an allocation that needs a probe of its own: the conformance test
(test_conformance.py) registers them while it runs and shows that the CLI, the plan, the sweep, the run's passes
and the conformance checks themselves pick them up with no other edit."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import extension_probe
import torch

from dipsvd_core.allocation import budget as alloc
from dipsvd_core.allocation.context import Context
from dipsvd_core.allocation.strategies import register_allocation, unregister_allocation
from dipsvd_core.common.errors import DipSVDError
from dipsvd_core.common.knobs import Widget, knob
from dipsvd_core.engine import passes
from dipsvd_core.lowrank.scalings import DIAG_FLOOR, Scaling, diagonal_scale, register_scaling, unregister_scaling


def first_dense(ctx, settings, bounds, **_):
    """Block 0 kept dense, the other blocks uniform at whatever keeps the whole budget. What the run hands a
    strategy is its Context (allocation/context.py), never the Workbench."""
    assert type(ctx) is Context, type(ctx)
    targets = ctx.targets
    rest = [t for t in targets if t.block > 0]
    ratio = settings.ratio * sum(t.params for t in targets) / sum(t.params for t in rest)
    if ratio >= 1:
        raise DipSVDError(f"first-dense cannot remove {settings.ratio:g} with block 0 dense")
    ranks = {t.name: alloc.DENSE for t in targets if t.block == 0}
    ranks.update(alloc.uniform(rest, ratio, **bounds).ranks)
    return alloc.from_ranks(ranks, targets, settings.ratio, "first-dense")


@dataclass(frozen=True)
class GramDiagonalOptions:
    """Its own option, declared once: the CLI's --gram-diag-power, the app's widget and the factor cache key follow."""

    power: float = knob(0.5, "exponent on each channel's mean square (0.5: its RMS)",
                        widget=Widget("Exponent on G_jj", 0.0, 2.0, 0.05))

    def check(self):
        if not 0 <= self.power <= 2:
            raise DipSVDError(f"gram-diag's power must be in [0, 2] (got {self.power})")


class GramDiagonal(Scaling):
    """S = diag(G_jj^power): each input channel scaled by its RMS over the calibration tokens (a Jacobi scaling) at
    the default power 0.5."""

    name, help = "gram-diag", "channels scaled by their RMS activation (a test-only scaling)"
    needs = frozenset({passes.GRAMS})
    Options = GramDiagonalOptions
    default_allocation = "first-dense"  # its own default path: a build that names no allocation gets it

    def key(self, spec) -> tuple:
        return (self.name, DIAG_FLOOR, spec.options.power)

    def scale(self, spec, name, group, data, compute):
        g = torch.diagonal(data.grams[group]).clamp_min(0)
        return diagonal_scale(g ** spec.options.power, f"RMS scale of {group}")


TEST_ONLY = {"first-dense", "gram-diag", "split-by-part"}  # the names registered here
_depth = [0]  # registered() nests: only the outermost registers and unregisters


@contextlib.contextmanager
def registered():
    """All registered for the duration (one line each), then gone again."""
    if _depth[0] == 0:
        register_allocation("first-dense", help="block 0 dense, the rest uniform (test only)")(first_dense)
        register_scaling(GramDiagonal())
        extension_probe.register()
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1
        if _depth[0] == 0:
            unregister_allocation("first-dense")
            unregister_scaling("gram-diag")
            extension_probe.unregister()
