"""Step 5 of the flow: build the compressed model. The original is never modified.

Math and surgery are separate: `low_rank_weights` turns factors and ranks into a plain dict of
(u, v) tensors (k rows of each factor, read from disk); `compress_model` builds a second module tree
that shares every tensor it does not change with the original (embeddings, norms, lm_head, biases,
buffers and every matrix kept dense: the same storage, no copy) and swaps each factored Linear for
a LowRankLinear (x -> v -> u, u keeps the bias). Original plus compressed in memory is then the
original plus the kept factors. Nothing writes into a shared tensor: the compressed model is for
inference and saving, like the original.
"""
from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

from .factors import Factor


class LowRankLinear(nn.Module):
    """y = u(v(x)) with v: in -> rank (no bias) and u: rank -> out (keeps the original bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.v = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.u = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_weights(cls, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> "LowRankLinear":
        """Wrap existing tensors without a random initialisation (which would cost more than the copy)."""
        lr = cls(v.shape[1], u.shape[0], u.shape[1], bias is not None, device="meta")
        lr.v.weight = nn.Parameter(v)
        lr.u.weight = nn.Parameter(u)
        if bias is not None:  # the original's bias, shared
            lr.u.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach(), requires_grad=False)
        return lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u(self.v(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def low_rank_weights(factors: dict[str, Factor], ranks: dict[str, int | None]) -> dict[str, tuple]:
    """name -> (u, v) for every factored matrix; dense ones are left out."""
    return {n: factors[n].low_rank(k) for n, k in ranks.items() if k is not None}


def compress_model(model: nn.Module, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """`model` with each named Linear replaced by LowRankLinear(u, v), as a new module tree over the
    original's tensors: the original is unchanged and nothing but the factors is allocated."""
    mods = dict(model.named_modules())
    # deepcopy copies the modules; a memo entry that maps a tensor to itself makes the copy share it.
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    new = copy.deepcopy(model, memo)
    for name, (u, v) in weights.items():
        old = mods[name]
        dev, dt = old.weight.device, old.weight.dtype
        set_module(new, name, LowRankLinear.from_weights(u.to(dev, dt), v.to(dev, dt), old.bias))
    return new


def module_ranks(model: nn.Module) -> dict[str, int]:
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
