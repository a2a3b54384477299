"""Step 2 of the flow: one pass over the calibration windows, collecting second moments.

For each targeted Linear y = W x we need the input Gram G = sum_tokens x x^T (in x in). Layers
that read the very same input tensor (q/k/v, gate/up) share one Gram, computed once: the groups
are found by tensor identity in a short probe forward. We also keep H^T H (d x d) of each decoder
block's output for the effective rank. Hooks live here and nowhere else; the math consumes
plain tensors.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from .cache import load_tensors, make_key, save_tensors
from .errors import DipSVDError
from .models import LoadedModel, find_blocks


@dataclass
class Stats:
    grams: dict[str, torch.Tensor]  # group name (its first Linear) -> (in, in) float64
    group_of: dict[str, str]  # Linear name -> group name
    block_grams: list[torch.Tensor]  # per block: (d, d) float64 Gram of the block output
    n_tokens: int
    abs_means: dict[str, torch.Tensor]  # group name -> (in,) mean |x_j| over tokens
    seconds: float = 0.0

    def gram(self, name: str) -> torch.Tensor:
        return self.grams[self.group_of[name]]

    def abs_mean(self, name: str) -> torch.Tensor:
        return self.abs_means[self.group_of[name]]

    def alpha(self, name: str) -> torch.Tensor:
        """Channel importance (paper Eq. 1): alpha_j = ||G[:, j]||_2, since alpha_j^2 = ||X^T x_j||^2."""
        return channel_importance(self.gram(name))


def channel_importance(gram: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(gram, dim=0)


class GramAccumulator:
    """Accumulates X^T X over windows in float64. Each window's product (a few hundred rows) is
    taken in float32, which is 10x faster on CPU and loses ~1e-7 relative per window."""

    def __init__(self, dim: int, device: torch.device):
        self.gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.abs_sum = torch.zeros(dim, dtype=torch.float64, device=device)  # for ASVD's mean |x_j|
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        if not torch.isfinite(x).all():
            raise NonFiniteActivations()
        x = x.float()
        self.gram += (x.T @ x).to(torch.float64)
        self.abs_sum += x.abs().sum(0, dtype=torch.float64)
        self.n += x.shape[0]


class NonFiniteActivations(Exception):
    pass


def _linear_modules(model: nn.Module, names: list[str]) -> dict[str, nn.Linear]:
    mods = dict(model.named_modules())
    return {n: mods[n] for n in names}


def find_input_groups(model: nn.Module, names: list[str], sample: torch.Tensor) -> dict[str, str]:
    """Map each Linear to the first Linear that reads the identical input tensor."""
    seen: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.__setitem__(n, args[0]))
               for n, m in _linear_modules(model, names).items()]
    try:
        with torch.no_grad():
            model(sample)
    finally:
        for h in handles:
            h.remove()
    # All inputs are still referenced by `seen`, so identity cannot be confused by memory reuse.
    group_of, owner = {}, {}
    for n in names:
        if n not in seen:
            raise DipSVDError(f"layer {n} was never called in a forward pass; this architecture is not supported")
        key = id(seen[n])
        owner.setdefault(key, n)
        group_of[n] = owner[key]
    return group_of


def collect_stats(model: nn.Module, names: list[str], windows: torch.Tensor, progress=None) -> Stats:
    """One forward pass per calibration window; windows is (n, seqlen) token ids."""
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    windows = windows.to(device)
    group_of = find_input_groups(model, names, windows[:1, : min(8, windows.shape[1])])
    leaders = _linear_modules(model, sorted(set(group_of.values()), key=names.index))
    accs = {n: GramAccumulator(m.in_features, device) for n, m in leaders.items()}
    _, blocks = find_blocks(model)
    block_accs: list[GramAccumulator | None] = [None] * len(blocks)

    def block_hook(i):
        def hook(mod, args, out):
            h = out[0] if isinstance(out, tuple) else out
            if block_accs[i] is None:
                block_accs[i] = GramAccumulator(h.shape[-1], device)
            block_accs[i].add(h.detach())
        return hook

    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: accs[n].add(args[0].detach()))
               for n, m in leaders.items()]
    handles += [blk.register_forward_hook(block_hook(i)) for i, blk in enumerate(blocks)]
    try:
        with torch.no_grad():
            for i in range(len(windows)):
                try:
                    model(windows[i: i + 1])
                except NonFiniteActivations:
                    raise DipSVDError(
                        f"NaN or infinite activations in calibration window {i}; the model overflows in this "
                        "dtype. Load it in float32 (--dtype float32)") from None
                except torch.OutOfMemoryError:
                    raise DipSVDError("out of memory while collecting statistics; use a shorter --seqlen, "
                                      "fewer windows, or the CPU") from None
                if progress:
                    progress((i + 1) / len(windows), f"statistics: window {i + 1}/{len(windows)}")
    finally:
        for h in handles:
            h.remove()
    grams = {n: a.gram.cpu() for n, a in accs.items()}
    abs_means = {n: (a.abs_sum / a.n).cpu() for n, a in accs.items()}
    return Stats(grams, group_of, [a.gram.cpu() for a in block_accs], accs[next(iter(accs))].n,
                 abs_means, time.perf_counter() - t0)


def stats_key(lm: LoadedModel, windows: torch.Tensor) -> str:
    return make_key("stats-v3", lm.fingerprint, windows.shape, make_key(windows.tolist()))


def cached_stats(lm: LoadedModel, windows: torch.Tensor, progress=None) -> Stats:
    """Statistics for these exact windows, from the cache when present."""
    key = stats_key(lm, windows)
    hit = load_tensors("stats", key)
    if hit is not None:
        tensors, meta = hit
        grams = {n: tensors[f"gram/{n}"] for n in meta["leaders"]}
        blocks = [tensors[f"block/{i}"] for i in range(meta["n_blocks"])]
        abs_means = {n: tensors[f"absmean/{n}"] for n in meta["leaders"]}
        return Stats(grams, meta["group_of"], blocks, meta["n_tokens"], abs_means, 0.0)
    names = [t.name for t in lm.targets]
    st = collect_stats(lm.model, names, windows, progress)
    tensors = {f"gram/{n}": g for n, g in st.grams.items()}
    tensors.update({f"block/{i}": g for i, g in enumerate(st.block_grams)})
    tensors.update({f"absmean/{n}": m for n, m in st.abs_means.items()})
    save_tensors("stats", key, tensors, {"leaders": list(st.grams), "group_of": st.group_of,
                                         "n_blocks": len(st.block_grams), "n_tokens": st.n_tokens,
                                         "seconds": st.seconds})
    return st
