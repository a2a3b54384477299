"""A test-only allocation that needs a probe of its own, in one file: the probe (the model's attention matrices
against its MLP matrices, each part truncated at once) declared by one `register_probe`, and the allocation that
reads it by one `register_allocation`. Nothing else is edited: the pass, its button, its disk cache, the plan's
memory and time for it, the conformance build and the refusals all read the two registries
(tests/run/test_conformance.py registers both through extensions.registered and checks each of these)."""
from __future__ import annotations

from dipsvd_core.allocation import budget as alloc
from dipsvd_core.allocation.probes import register_probe, unregister_probe
from dipsvd_core.allocation.strategies import register_allocation, unregister_allocation
from dipsvd_core.common.errors import DipSVDError
from dipsvd_core.engine import passes


def part_of(name: str) -> str:
    """A targeted Linear's part of its block: the module it sits in ("self_attn", "mlp")."""
    return name.rsplit(".", 2)[-2]


def by_part(targets):
    """One group per part of the blocks (attention, MLP), every block's matrices of that part together."""
    parts = sorted({part_of(t.name) for t in targets})
    return [{t.name for t in targets if part_of(t.name) == p} for p in parts], parts


def split_by_part(ctx, settings, bounds, progress=None, **_):
    """Each part uniform at its own ratio, the removed share of each part proportional to 1 / d (its probe's loss
    increase): the part whose cut costs more keeps more, and the whole budget is spent."""
    d = ctx.probe(settings, "part", progress)
    targets = ctx.targets
    size = {p: sum(t.params for t in targets if part_of(t.name) == p) for p in d}
    removed = settings.ratio * sum(size.values())
    inverse = {p: 1 / max(v, 1e-9) for p, v in d.items()}
    scale = removed / sum(size[p] * inverse[p] for p in d)
    ratios = {p: scale * inverse[p] for p in d}
    if max(ratios.values()) >= 1:
        raise DipSVDError(f"split-by-part cannot remove {settings.ratio:g}: one part would lose everything")
    ranks = {}
    for p, r in ratios.items():
        ranks.update(alloc.uniform([t for t in targets if part_of(t.name) == p], r, **bounds).ranks)
    return alloc.from_ranks(ranks, targets, settings.ratio, "split-by-part")


def register():
    """The probe and the allocation: one registration each."""
    step = register_probe("part", by_part, "probe-parts-test", "one forward pass over the held-out windows with "
                          "the attention, then the MLP, of every block truncated", "a calibration by probing the "
                          "attention and the MLP once", "Probe the parts")
    register_allocation("split-by-part", needs=frozenset({passes.FACTORS, step}),
                        help="attention and MLP each uniform, the costlier part to cut keeps more (test only)"
                        )(split_by_part)


def unregister():
    unregister_allocation("split-by-part")
    unregister_probe("part")
