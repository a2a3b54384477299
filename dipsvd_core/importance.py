"""Step 3b of the flow: global importance signals per decoder block (DESIGN.md section 4).

Computed from the calibration windows and the cached statistics, returned as plain arrays:
- Fisher sensitivity S_l: one backward pass of the next-token loss per calibration window, taken one
  decoder block at a time (`fisher_info`), so that it fits where the model fits (offload too). For a
  targeted weight theta, s = ||grad||_F / (||theta||_F + eps) where grad is the gradient of the
  MEAN calibration loss (the mean over windows of each window's mean token NLL), and
  S_l = sum of s over the block's targeted weights. The same pass keeps, per weight, the
  row-wise Fisher f_j = sum over windows of sum_i grad_w[i, j]^2 (one value per input channel j,
  grad_w the gradient of window w's loss), which FWSVD needs, and the Fisher trace
  sum_j f_j / n_windows. And at each targeted Linear's OUTPUT y (the same hooks): the mean over tokens of
  ||dL_w/dy_t||^2 and of ||y_t||^2, the two numbers the coupled allocator weighs a matrix's error with.
- Effective rank R_l: the eigenvalues of H_l^T H_l (Stats.block_spectra, taken while the block streamed)
  are sigma_i^2 of H_l; R_l = min k with cumulative energy >= tau, the energy being sigma^2
  (Alg. 5, default) or sigma (Eq. 11).
- Combined score Q_l = S~^beta * R~^(1 - beta), S~ and R~ min-max normalised plus eps. Higher Q
  keeps more: p_l proportional to Q_l (Eq. 13). The paper's Alg. 4 ends with "return S^-1", which
  would keep LESS of the more sensitive blocks and contradicts its own text; we follow the text.
Fisher results are cached on disk under the statistics key (same model, same windows).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .cache import load_tensors, make_key, save_tensors
from .errors import DipSVDError
from .models import Target, weights_of

ENERGIES = ("sigma2", "sigma")
FISHER_VERSION = "fisher-v3"  # v2: block-by-block backward; v3: output-gradient and output energies
GRAD_EPS = 1e-8  # in ||grad|| / (||theta|| + eps)
NORM_EPS = 1e-6  # added after min-max normalisation so that no Q_l is exactly zero


@dataclass
class FisherInfo:
    """Per-block and per-matrix Fisher signals from one set of backward passes."""

    per_block: np.ndarray  # (n_blocks,) S_l
    per_matrix: dict[str, float]  # name -> ||grad||_F / (||theta||_F + eps)
    rows: dict[str, torch.Tensor]  # name -> (in,) float64 row-wise Fisher f_j (for fwsvd)
    trace: dict[str, float]  # name -> mean over windows of ||grad_w||_F^2
    out_grad2: dict[str, float]  # name -> mean over tokens of ||dL_w/dy_t||^2 at the Linear's output (coupled)
    out_energy: dict[str, float]  # name -> mean over tokens of ||y_t||^2 (coupled)
    n_windows: int
    loss: float  # mean calibration loss
    key: str = ""  # cache key, part of the fwsvd factor key
    seconds: float = 0.0


class _Inject(nn.Module):
    """Stands in for a decoder block while the top of the model runs: the last one returns a given
    hidden state (the leaf whose gradient is wanted), the others pass their input through."""

    def __init__(self, value: torch.Tensor | None, as_tuple: bool):
        super().__init__()
        self.value, self.as_tuple = value, as_tuple

    def forward(self, *args, **kwargs):
        h = self.value if self.value is not None else (args[0] if args else kwargs["hidden_states"])
        return (h,) if self.as_tuple else h


def fisher_info(model: nn.Module, targets: list[Target], windows: torch.Tensor, progress=None) -> FisherInfo:
    """Backward passes over `windows` (n, seqlen), one decoder block at a time (stream.py), so that memory
    holds one block's gradients, not the whole model's:

    1. a no-grad streaming pass keeps every block's input for every window;
    2. per window, the top of the model (final norm, lm_head, loss) runs on the last block's output
       with the blocks stood in for, giving dL_w/dh at that output;
    3. from the last block down, each block is run again on its saved inputs and back-propagated from
       dL_w/dh; for every targeted Linear y = x W^T its weight gradient is grad_y^T x (hooks, no
       requires_grad on any weight, so accelerate-offloaded weights work), and the gradient at the
       block's input is passed down.
    The weights' requires_grad flags and .grad are left exactly as they were."""
    from .models import find_blocks
    from .stream import capture_inputs, forward_block, window_ids

    t0 = time.perf_counter()
    prefix, blocks = find_blocks(model)
    n, n_blocks = len(windows), len(blocks)
    mods = dict(model.named_modules())
    names_of: dict[int, list[str]] = {}
    for t in targets:
        names_of.setdefault(t.block, []).append(t.name)
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    originals = list(blocks)
    grad_sum, rows, total_loss = {}, {}, 0.0
    out_grad2, out_energy = {t.name: 0.0 for t in targets}, {t.name: 0.0 for t in targets}
    try:
        for p, _ in saved_flags:
            p.requires_grad_(False)
        with torch.no_grad():  # 1. every block's inputs
            inputs = capture_inputs(model, blocks, windows)
            out = blocks[0](inputs.hidden[0], **inputs.kwargs[0])
            as_tuple = isinstance(out, tuple)
            del out
            # on a GPU every block's inputs wait in host memory (Llama-3-8B: 4.3 GB) and come back a block at a time
            saved = []
            to_host = inputs.hidden[0].device.type == "cuda"
            for b, block in enumerate(blocks):
                saved.append([h.to("cpu") for h in inputs.hidden] if to_host else list(inputs.hidden))
                forward_block(block, inputs, progress=lambda i, m, b=b: progress and progress(
                    0.5 * (b + i / m) / n_blocks, f"fisher: forward, block {b + 1}/{n_blocks}"))
        grads = []  # 2. dL_w/dh at the last block's output
        for i, ids in window_ids(model, windows):
            top = inputs.hidden[i].detach().requires_grad_(True)
            for b in range(n_blocks):
                blocks[b] = _Inject(top if b == n_blocks - 1 else None, as_tuple)
            with torch.enable_grad():
                logits = model(ids, use_cache=False).logits.float()
                loss = nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])  # mean next-token NLL
                if not torch.isfinite(loss):
                    raise DipSVDError(f"the loss is not finite on calibration window {i}; load the model in "
                                      "float32 (--dtype float32)")
                loss.backward()
            total_loss += loss.item()
            grads.append(top.grad)
            del logits, loss, top
        for b, block in enumerate(originals):
            blocks[b] = block
        for b in reversed(range(n_blocks)):  # 3. block by block, from the top
            names = names_of.get(b, [])
            for name in names:
                W = mods[name].weight
                grad_sum[name] = torch.zeros(W.shape, dtype=torch.float32, device=grads[0].device)
                rows[name] = torch.zeros(W.shape[1], dtype=torch.float64, device=grads[0].device)

            def hook(name):
                def forward_hook(module, args, y):
                    x = args[0].detach()
                    out_energy[name] += float(y.detach().double().pow(2).sum())

                    def on_grad(g):
                        out_grad2[name] += float(g.double().pow(2).sum())
                        gw = g.reshape(-1, g.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()  # (out, in)
                        grad_sum[name] += gw.to(grad_sum[name].device)
                        rows[name] += (gw.double() ** 2).sum(0).to(rows[name].device)  # one value per input channel
                    y.register_hook(on_grad)
                return forward_hook

            handles = [mods[nm].register_forward_hook(hook(nm)) for nm in names]
            try:
                for i in range(n):
                    x = saved[b][i].to(inputs.hidden[0].device).detach().requires_grad_(True)
                    with torch.enable_grad():
                        out = originals[b](x, **inputs.kwargs[i])
                        h = out[0] if isinstance(out, tuple) else out
                        h.backward(grads[i].to(h.device))
                    grads[i] = x.grad
                    if progress:
                        progress(0.5 + 0.5 * (n_blocks - b - 1 + (i + 1) / n) / n_blocks,
                                 f"fisher: backward, block {b + 1}/{n_blocks}, window {i + 1}/{n}")
            finally:
                for h_ in handles:
                    h_.remove()
            saved[b] = None
    finally:
        for b, block in enumerate(originals):
            blocks[b] = block
        for p, flag in saved_flags:
            p.requires_grad_(flag)
    per_matrix, trace = {}, {}
    tokens = windows.numel()
    per_block = np.zeros(1 + max(t.block for t in targets))
    for t in targets:
        g = grad_sum[t.name].double() / n  # gradient of the mean loss over windows
        with weights_of(mods[t.name]):
            norm_w = torch.linalg.norm(mods[t.name].weight.detach().double()).to(g.device)
        s = (torch.linalg.norm(g) / (norm_w + GRAD_EPS)).item()
        per_matrix[t.name] = s
        trace[t.name] = rows[t.name].sum().item() / n
        per_block[t.block] += s
    return FisherInfo(per_block, per_matrix, {k: v.cpu() for k, v in rows.items()}, trace,
                      {k: v / tokens for k, v in out_grad2.items()}, {k: v / tokens for k, v in out_energy.items()},
                      n, total_loss / n, seconds=time.perf_counter() - t0)


def cached_fisher(lm, windows: torch.Tensor, stats_key: str, progress=None) -> FisherInfo:
    """Fisher signals for these windows, from the cache when present (keyed by the statistics key)."""
    key = make_key(FISHER_VERSION, stats_key)
    hit = load_tensors("fisher", key)
    names = [t.name for t in lm.targets]
    if hit is not None and hit[1].get("names") == names:
        t, meta = hit
        return FisherInfo(np.asarray(meta["per_block"]), meta["per_matrix"], {n: t[f"rows/{n}"] for n in names},
                          meta["trace"], meta["out_grad2"], meta["out_energy"], meta["n_windows"], meta["loss"], key,
                          0.0)
    info = fisher_info(lm.model, lm.targets, windows, progress)
    info.key = key
    save_tensors("fisher", key, {f"rows/{n}": r for n, r in info.rows.items()},
                 {"names": names, "per_block": info.per_block.tolist(), "per_matrix": info.per_matrix,
                  "trace": info.trace, "out_grad2": info.out_grad2, "out_energy": info.out_energy, "n_windows": info.n_windows, "loss": info.loss, "seconds": info.seconds})
    return info


def check_importance(beta: float, tau: float, energy: str) -> None:
    if not 0 <= beta <= 1:
        raise DipSVDError(f"beta must be in [0, 1] (weight of Fisher sensitivity in Q); got {beta}")
    if not 0 < tau <= 1:
        raise DipSVDError(f"tau must be in (0, 1] (energy kept by the effective rank, e.g. 0.95); got {tau}")
    if energy not in ENERGIES:
        raise DipSVDError(f"unknown energy '{energy}'; use sigma2 (Alg. 5) or sigma (Eq. 11)")


def effective_rank(eigs_or_gram, tau: float = 0.95, energy: str = "sigma2") -> int:
    """min k with cumulative energy >= tau. Give the eigenvalues sigma_i^2 (1-D) or the Gram H^T H (2-D)."""
    check_importance(0.0, tau, energy)
    x = torch.as_tensor(eigs_or_gram, dtype=torch.float64)
    if x.ndim == 2:
        if x.shape[0] != x.shape[1]:
            raise DipSVDError(f"a Gram matrix must be square; got shape {tuple(x.shape)}")
        x = torch.linalg.eigvalsh(x)
    elif x.ndim != 1:
        raise DipSVDError("effective_rank takes eigenvalues (1-D) or a Gram matrix (2-D)")
    lam = torch.sort(x.clamp_min(0), descending=True).values  # rounding can make tiny eigenvalues negative
    e = lam if energy == "sigma2" else lam.sqrt()
    total = e.sum()
    if not total > 0:
        raise DipSVDError("the block output has zero energy; check the calibration text")
    cum = torch.cumsum(e, 0) / total
    # a relative slack of 1e-12 so that exact ties (e.g. tau = 1) are not lost to rounding
    return int(torch.searchsorted(cum, torch.tensor([tau - 1e-12], dtype=torch.float64)).item()) + 1


def effective_ranks(spectra: list[torch.Tensor], tau: float = 0.95, energy: str = "sigma2") -> np.ndarray:
    """R_l per block; each entry the eigenvalues (d,) of a block-output Gram, or the Gram (d, d) itself."""
    return np.array([effective_rank(g, tau, energy) for g in spectra], dtype=np.float64)


def minmax(x, eps: float = NORM_EPS) -> np.ndarray:
    """(x - min) / (max - min) + eps; all-equal inputs map to 1 (nothing distinguishes the blocks)."""
    x = np.asarray(x, dtype=np.float64)
    span = x.max() - x.min()
    if not span > 0:
        return np.ones_like(x)
    return (x - x.min()) / span + eps


def combined_score(S, R, beta: float = 0.25, eps: float = NORM_EPS) -> np.ndarray:
    """Q_l = S~^beta * R~^(1 - beta) with min-max normalised S and R (paper Eq. 12-13)."""
    S, R = np.asarray(S, dtype=np.float64), np.asarray(R, dtype=np.float64)
    if S.shape != R.shape or S.ndim != 1:
        raise DipSVDError(f"S and R need one value per block each; got shapes {S.shape} and {R.shape}")
    if not (np.isfinite(S).all() and np.isfinite(R).all()):
        raise DipSVDError("importance signals are not finite; recompute the statistics in float32")
    check_importance(beta, 0.95, "sigma2")
    return minmax(S, eps) ** beta * minmax(R, eps) ** (1 - beta)


def importance(fisher: FisherInfo, spectra: list[torch.Tensor], beta: float = 0.25, tau: float = 0.95,
               energy: str = "sigma2") -> dict[str, np.ndarray]:
    """Every per-block signal the heuristic uses, for tables and plots."""
    check_importance(beta, tau, energy)
    S, R = np.asarray(fisher.per_block, dtype=np.float64), effective_ranks(spectra, tau, energy)
    return {"S": S, "R": R, "S_norm": minmax(S), "R_norm": minmax(R), "Q": combined_score(S, R, beta)}


@contextlib.contextmanager
def truncated(model: nn.Module, targets: list[Target], factors, names, keep: float):
    """Within this block the Linears named in `names` answer at keep fraction `keep` (allocation.rank_for), with
    x V_k^T U_k^T (+ bias) from the cached factors through forward hooks: nothing of the model is written or
    copied, so this works where the model runs (offloaded too) at the factors of these matrices."""
    from .allocation import DENSE, rank_for

    mods = dict(model.named_modules())

    def swap(u, v, bias):
        def hook(module, args, y):
            x = args[0]
            z = (x @ v.to(x.device, x.dtype).T) @ u.to(x.device, x.dtype).T
            return z + bias.to(z.dtype) if bias is not None else z
        return hook

    handles = []
    try:
        for t in targets:
            k = rank_for(keep, t.out_features, t.in_features)
            if t.name not in names or k is DENSE:
                continue
            u, v = factors[t.name].low_rank(k)
            with weights_of(mods[t.name]):  # an offloaded bias is only real inside this
                bias = None if mods[t.name].bias is None else mods[t.name].bias.detach().clone()
            handles.append(mods[t.name].register_forward_hook(swap(u, v, bias)))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def group_sensitivity(model: nn.Module, targets: list[Target], factors, windows: torch.Tensor, keep: float,
                      groups: list[set[str]], labels: list[str] | None = None, progress=None) -> np.ndarray:
    """How much the mean next-token loss on `windows` grows when the matrices of one group ALONE are truncated,
    every one at keep fraction `keep` (`truncated`), one value per group: log ppl(cut) - log ppl(original)."""
    import math

    from .evaluate import perplexity

    base = math.log(perplexity(model, windows))
    out = np.zeros(len(groups))
    for g, names in enumerate(groups):
        with truncated(model, targets, factors, names, keep):
            out[g] = math.log(perplexity(model, windows)) - base
        if progress:
            what = labels[g] if labels else f"group {g + 1}"
            progress((g + 1) / len(groups), f"probing {what} ({g + 1}/{len(groups)}, keep {keep:g})")
    return out


def matrix_type(name: str) -> str:
    """A targeted Linear's type: the last part of its name (q_proj, gate_proj, ...), the same in every block."""
    return name.rsplit(".", 1)[-1]


PROBE_KINDS = ("block", "type")


def probe_groups(targets: list[Target], kind: str) -> tuple[list[set[str]], list[str]]:
    """The groups a probe cuts together, with their labels: "block", each block alone (block 1, block 2, ...);
    "type", every matrix of one type of the model (down_proj, gate_proj, ..., sorted)."""
    if kind == "block":
        n_blocks = 1 + max(t.block for t in targets)
        return ([{t.name for t in targets if t.block == b} for b in range(n_blocks)],
                [f"block {b + 1}" for b in range(n_blocks)])
    if kind == "type":
        types = sorted({matrix_type(t.name) for t in targets})
        return [{t.name for t in targets if matrix_type(t.name) == ty} for ty in types], types
    raise DipSVDError(f"unknown probe '{kind}'; use one of {', '.join(PROBE_KINDS)}")


def block_sensitivity(model: nn.Module, targets: list[Target], factors, windows: torch.Tensor, keep: float,
                      progress=None) -> np.ndarray:
    """d_l: how much the mean next-token loss on `windows` grows when block l ALONE is truncated, every
    matrix of it at keep fraction `keep` (`truncated`), one value per block."""
    return group_sensitivity(model, targets, factors, windows, keep, *probe_groups(targets, "block"), progress)


def type_sensitivity(model: nn.Module, targets: list[Target], factors, windows: torch.Tensor, keep: float,
                     progress=None) -> dict[str, float]:
    """d_type: how much the mean next-token loss on `windows` grows when every matrix of one type (all q_proj of
    the model, then all k_proj, ...) is truncated at keep fraction `keep`, the others dense."""
    groups, types = probe_groups(targets, "type")
    return dict(zip(types, group_sensitivity(model, targets, factors, windows, keep, groups, types, progress).tolist()))
