"""A model's structure as the engine sees it: its decoder blocks (the longest ModuleList of blocks holding Linears,
with no per-architecture names) and the targeted Linears inside them."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..common.errors import DipSVDError


@dataclass(frozen=True)
class Target:
    """One targeted Linear: y = W x with W of shape (out, in)."""

    name: str  # full module name, e.g. "model.layers.3.self_attn.q_proj"
    block: int  # index of its decoder block
    out_features: int
    in_features: int
    has_bias: bool

    @property
    def params(self) -> int:
        return self.out_features * self.in_features


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the longest ModuleList whose every entry contains an nn.Linear."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            if all(any(isinstance(m, nn.Linear) for m in blk.modules()) for blk in mod):
                if best is None or len(mod) > len(best[1]):
                    best = (name, mod)
    if best is None:
        kinds = sorted({type(m).__name__ for m in model.modules() if "Conv1D" in type(m).__name__})
        hint = f" (its layers are {', '.join(kinds)}, not nn.Linear)" if kinds else ""
        raise DipSVDError(
            f"unsupported architecture {type(model).__name__}: no decoder blocks holding nn.Linear layers "
            f"were found{hint}. Use a Llama-, Mistral-, Qwen2- or Gemma-style causal LM")
    return best


def find_targets(model: nn.Module) -> list[Target]:
    """Every nn.Linear inside the decoder blocks, in module order. Embeddings and lm_head are outside."""
    prefix, blocks = find_blocks(model)
    targets = []
    for b, blk in enumerate(blocks):
        for sub, mod in blk.named_modules():
            if isinstance(mod, nn.Linear):
                name = f"{prefix}.{b}.{sub}" if prefix else f"{b}.{sub}"
                targets.append(Target(name, b, mod.out_features, mod.in_features, mod.bias is not None))
    return targets
