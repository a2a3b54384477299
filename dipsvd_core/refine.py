"""Sequential compensation: each block compressed against what the compressed blocks before it feed it.

Every factor method truncates W against the ORIGINAL model's inputs X: its ranks are chosen as if
block l saw the activations of an uncompressed model. After blocks 0..l-1 are compressed, block l
really sees X^, and the error compounds from block to block. `refine` (as in SAES-SVD, and in the
spirit of GPTQ's sequential quantization) takes the allocation's ranks and replaces each factored
matrix by the rank-k matrix closest to the original output on those inputs:

    min over rank(W') <= k  of  ||W X - W' X^||_F^2,

where X (in x tokens) are the inputs of W in the original model and X^ those in the model whose
earlier blocks are already compressed. With the Gram G^ = X^ X^^T and the cross-Gram C = X X^^T:

1. Least-squares target. The unconstrained minimiser solves W' G^ = W C, so W* = W C G^^{-1}.
   The residual W X - W* X^ is orthogonal to the rows of X^ (normal equations), so for ANY W'
       ||W X - W' X^||^2 = ||W X - W* X^||^2 + ||(W* - W') X^||^2
   (Pythagoras): the first term does not depend on W', and what is left is a whitened truncation.
2. Whitened truncation. ||(W* - W') X^||^2 = ||(W* - W') S||^2 for any S with S S^T = G^, and the best
   rank-k W' is U_k Sigma_k V_k^T S^{-1} from the SVD of W* S (Eckart-Young): the very step every
   factor method already takes, with G^ in place of G. G^^{-1} and S use the same eigenvalue floor.
3. Channel weighting still applies: dipsvd whitens with D G^ D (D from the channel importance of G^,
   with its weight and bar), asvd and fwsvd with their diagonal scales, so step 2 minimises the
   method's own weighted error of W* - W' while step 1 has already absorbed what X^ lost.

The pass streams like the statistics pass (stream.py), with two sets of activations: the original
path and the compressed one. For block l it runs the original block on both (hooks accumulate C and
G^ per input group, shared inputs once), refines the block's factored matrices, then runs the block
with its refined matrices on the compressed path to give block l+1 its inputs. Dense-kept matrices
stay the original's. Refining is a build step: the allocation (ranks) comes from the fast
factor-once path; one refine costs three block forwards per block plus one SVD per factored matrix.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from .errors import DipSVDError
from .factors import EIG_FLOOR, FactorSpec, factor_model
from .models import find_blocks, weights_of
from .stream import BlockInputs, capture_inputs, release_host_memory

REFINES = ("none", "sequential")


def least_squares_target(W: torch.Tensor, cross: torch.Tensor, gram_hat: torch.Tensor,
                         compute: torch.dtype = torch.float64) -> tuple[torch.Tensor, int]:
    """(W* = W C G^^{-1}, eigenvalues floored), with G^^{-1} from the floored eigendecomposition of G^."""
    G = gram_hat.to(compute)
    L, Q = torch.linalg.eigh(G)
    top = L.max()
    if not top > 0 or not torch.isfinite(top):
        raise DipSVDError("the compressed model's activations have a zero or non-finite Gram; nothing to refine "
                          "against (check the calibration text and the model's dtype)")
    floor = top * EIG_FLOOR[compute]
    n = int((L < floor).sum())
    L = L.clamp_min(floor)
    inv = (Q / L) @ Q.T
    return W.to(compute) @ cross.to(compute, copy=False).to(W.device) @ inv.to(W.device), n


class _PairStats:
    """C = sum x x^^T and G^ = sum x^ x^^T per input group of one block, with shared inputs once."""

    def __init__(self, linears: dict[str, nn.Linear], accumulate: torch.dtype = torch.float64):
        self.linears, self.accumulate = linears, accumulate
        self.group_of: dict[str, str] = {}
        self.cross: dict[str, torch.Tensor] = {}
        self.gram: dict[str, torch.Tensor] = {}
        self.taken: dict[str, torch.Tensor] = {}  # this window's original-path inputs, by group
        self.phase = "original"
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            seen = self._seen.get(id(x))
            if seen is not None and seen[0] is x:
                self.group_of[name] = seen[1]
                return
            self._seen[id(x)] = (x, name)
            self.group_of[name] = name
            x = x.detach().reshape(-1, x.shape[-1])
            if not torch.isfinite(x).all():
                raise DipSVDError(f"NaN or infinite activations at {name} while refining; load the model in float32")
            if self.phase == "original":
                self.taken[name] = x
                return
            x0 = self.taken.pop(name).float()
            xh = x.float()
            if name not in self.gram:
                dim = xh.shape[-1]
                self.gram[name] = torch.zeros(dim, dim, dtype=self.accumulate, device=xh.device)
                self.cross[name] = torch.zeros(dim, dim, dtype=self.accumulate, device=xh.device)
            self.gram[name] += (xh.T @ xh).to(self.accumulate)
            self.cross[name] += (x0.T @ xh).to(self.accumulate)
        return hook

    def window(self, phase: str) -> None:
        self.phase = phase
        self._seen.clear()

    def attach(self) -> list:
        return [m.register_forward_pre_hook(self._hook(n)) for n, m in self.linears.items()]


def _block_out(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def refine(model: nn.Module, names: list[str], windows: torch.Tensor, spec: FactorSpec, ranks: dict[str, int | None],
           abs_means: dict | None = None, fisher_rows: dict | None = None, progress=None) -> tuple[dict, dict]:
    """Refined (u, v) of every matrix that `ranks` factors, from one streaming pass over `windows`.
    Returns (weights, info) with info: seconds and the number of eigenvalues of G^ floored."""
    t0 = time.perf_counter()
    prefix, blocks = find_blocks(model)
    wanted = set(names)
    compute = torch.float64 if spec.compute == "float64" else torch.float32
    orig = capture_inputs(model, blocks, windows)
    hat = BlockInputs(list(orig.hidden), orig.kwargs)  # identical until block 0 is compressed
    out, floored = {}, 0
    n_blocks, n_win = len(blocks), len(orig.hidden)
    for b, block in enumerate(blocks):
        base = f"{prefix}.{b}" if prefix else str(b)
        linears = {f"{base}.{n}": m for n, m in block.named_modules()
                   if isinstance(m, nn.Linear) and f"{base}.{n}" in wanted}
        st = _PairStats(linears)
        handles = st.attach()
        try:
            for i in range(n_win):  # the original block on both paths: C and G^
                st.window("original")
                new = _block_out(block(orig.hidden[i], **orig.kwargs[i]))
                st.window("compressed")
                block(hat.hidden[i], **hat.kwargs[i])
                orig.hidden[i] = new
                if progress:
                    progress((b + 0.5 * (i + 1) / n_win) / n_blocks, f"block {b + 1}/{n_blocks}: refining, window "
                             f"{i + 1}/{n_win}")
        finally:
            for h in handles:
                h.remove()
        if progress:
            progress((b + 0.5) / n_blocks, f"block {b + 1}/{n_blocks}: refining, factoring")
        mods = {n: m for n, m in linears.items() if ranks.get(n) is not None}
        targets = {}
        for n, m in mods.items():
            g = st.group_of[n]
            with weights_of(m):
                W = m.weight.detach()
                targets[n], k = least_squares_target(W, st.cross[g], st.gram[g], compute)
            floored += k
        grams = {g: st.gram[g] for g in set(st.group_of[n] for n in mods)}
        factors = factor_model(targets, spec, st.group_of, grams, abs_means, fisher_rows)
        replaced = {}
        for n, m in mods.items():
            u, v = factors[n].low_rank(ranks[n])
            with weights_of(m):
                dev, dt = m.weight.device, m.weight.dtype
            out[n] = (u, v)
            replaced[n] = (u.to(dev, dt), v.to(dev, dt))
        del factors, targets, st, grams

        def swap(name):  # the refined matrix in place of the original, on the compressed path only
            def hook(module, args, y):
                u, v = replaced[name]
                z = nn.functional.linear(nn.functional.linear(args[0], v), u)
                return z + module.bias if module.bias is not None else z
            return hook

        handles = [m.register_forward_hook(swap(n)) for n, m in mods.items()]
        try:
            for i in range(n_win):
                hat.hidden[i] = _block_out(block(hat.hidden[i], **hat.kwargs[i]))
        finally:
            for h in handles:
                h.remove()
        release_host_memory()
    if progress:
        progress(1.0, f"block {n_blocks}/{n_blocks}: refined")
    return out, {"seconds": time.perf_counter() - t0, "floored": floored}
