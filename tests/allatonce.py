"""The engine's previous all-at-once statistics pass, kept as the oracle of the streaming pass (issue 10).

Hooks on every targeted Linear of the whole model, one forward per window, every Gram held at once:
exactly what dipsvd_core/stats.py did before it streamed block by block. Only tests use it.
"""
from __future__ import annotations

import torch
from torch import nn

from dipsvd_core.engine.stats import GramAccumulator
from dipsvd_core.lowrank.factors import FactorSpec, factor_model


def all_at_once_grams(model: nn.Module, names: list[str], windows: torch.Tensor) -> tuple[dict, dict]:
    """(group_of, grams): each Linear's group (the first Linear reading the same tensor) and its Gram."""
    mods = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    handles = [mods[n].register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0])) for n in names]
    with torch.no_grad():
        model(windows[:1, :8])
    for h in handles:
        h.remove()
    group_of, owner = {}, {}
    for n in names:
        owner.setdefault(id(seen[n]), n)
        group_of[n] = owner[id(seen[n])]
    leaders = sorted(set(group_of.values()), key=names.index)
    accs = {n: GramAccumulator(mods[n].in_features, windows.device) for n in leaders}
    handles = [mods[n].register_forward_pre_hook(lambda m, a, n=n: accs[n].add(a[0].detach())) for n in leaders]
    try:
        with torch.no_grad():
            for i in range(len(windows)):
                model(windows[i: i + 1])
    finally:
        for h in handles:
            h.remove()
    return group_of, {n: a.gram for n, a in accs.items()}


def all_at_once_factors(lm, windows: torch.Tensor, spec: FactorSpec) -> dict:
    names = [t.name for t in lm.targets]
    group_of, grams = all_at_once_grams(lm.model, names, windows)
    mods = dict(lm.model.named_modules())
    return factor_model({n: mods[n].weight for n in names}, spec, group_of, grams)
