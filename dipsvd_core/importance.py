"""Step 3b of the flow: global importance signals per decoder block (DESIGN.md section 4).

Computed from the calibration windows and the cached statistics, returned as plain arrays:
- Fisher sensitivity S_l: one backward pass of the next-token loss per calibration window. For a
  targeted weight theta, s = ||grad||_F / (||theta||_F + eps) where grad is the gradient of the
  MEAN calibration loss (the mean over windows of each window's mean token NLL), and
  S_l = sum of s over the block's targeted weights. The same pass keeps, per weight, the
  row-wise Fisher f_j = sum over windows of sum_i grad_w[i, j]^2 (one value per input channel j,
  grad_w the gradient of window w's loss), which FWSVD needs, and the Fisher trace
  sum_j f_j / n_windows, which the coupled allocator needs.
- Effective rank R_l: the eigenvalues of H_l^T H_l (Stats.block_spectra, taken while the block streamed)
  are sigma_i^2 of H_l; R_l = min k with cumulative energy >= tau, the energy being sigma^2
  (Alg. 5, default) or sigma (Eq. 11).
- Combined score Q_l = S~^beta * R~^(1 - beta), S~ and R~ min-max normalised plus eps. Higher Q
  keeps more: p_l proportional to Q_l (Eq. 13). The paper's Alg. 4 ends with "return S^-1", which
  would keep LESS of the more sensitive blocks and contradicts its own text; we follow the text.
Fisher results are cached on disk under the statistics key (same model, same windows).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .cache import load_tensors, make_key, save_tensors
from .errors import DipSVDError
from .models import Target

ENERGIES = ("sigma2", "sigma")
FISHER_VERSION = "fisher-v1"
GRAD_EPS = 1e-8  # in ||grad|| / (||theta|| + eps)
NORM_EPS = 1e-6  # added after min-max normalisation so that no Q_l is exactly zero


@dataclass
class FisherInfo:
    """Per-block and per-matrix Fisher signals from one set of backward passes."""

    per_block: np.ndarray  # (n_blocks,) S_l
    per_matrix: dict[str, float]  # name -> ||grad||_F / (||theta||_F + eps)
    rows: dict[str, torch.Tensor]  # name -> (in,) float64 row-wise Fisher f_j (for fwsvd)
    trace: dict[str, float]  # name -> mean over windows of ||grad_w||_F^2 (for the coupled allocator)
    n_windows: int
    loss: float  # mean calibration loss
    key: str = ""  # cache key, part of the fwsvd factor key
    seconds: float = 0.0


def fisher_info(model: nn.Module, targets: list[Target], windows: torch.Tensor, progress=None) -> FisherInfo:
    """Backward passes over `windows` (n, seqlen). Only the targeted weights get requires_grad; every
    flag and .grad is restored afterwards, so the model is left exactly as it was."""
    t0 = time.perf_counter()
    mods = dict(model.named_modules())
    weights = {t.name: mods[t.name].weight for t in targets}
    device = next(model.parameters()).device
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    grad_sum = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}  # (out, in)
    rows = {n: torch.zeros(w.shape[1], dtype=torch.float64, device=device) for n, w in weights.items()}
    total_loss = 0.0
    try:
        for p, _, _ in saved:
            p.requires_grad_(False)
            p.grad = None
        for w in weights.values():
            w.requires_grad_(True)
        with torch.enable_grad():
            for i in range(len(windows)):
                ids = windows[i: i + 1].to(device)
                logits = model(ids).logits.float()
                loss = nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])  # mean next-token NLL
                if not torch.isfinite(loss):
                    raise DipSVDError(f"the loss is not finite on calibration window {i}; load the model in "
                                      "float32 (--dtype float32)")
                loss.backward()
                total_loss += loss.item()
                for n, w in weights.items():
                    g = w.grad.float()
                    grad_sum[n] += g
                    rows[n] += (g.double() ** 2).sum(0)  # sum over the output dim: one value per input channel
                    w.grad = None
                if progress:
                    progress((i + 1) / len(windows), f"fisher: window {i + 1}/{len(windows)}")
    finally:
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad
    n = len(windows)
    per_matrix, trace = {}, {}
    per_block = np.zeros(1 + max(t.block for t in targets))
    for t in targets:
        g = grad_sum[t.name].double() / n  # gradient of the mean loss over windows
        s = (torch.linalg.norm(g) / (torch.linalg.norm(weights[t.name].detach().double()) + GRAD_EPS)).item()
        per_matrix[t.name] = s
        trace[t.name] = rows[t.name].sum().item() / n
        per_block[t.block] += s
    return FisherInfo(per_block, per_matrix, {k: v.cpu() for k, v in rows.items()}, trace, n, total_loss / n,
                      seconds=time.perf_counter() - t0)


def cached_fisher(lm, windows: torch.Tensor, stats_key: str, progress=None) -> FisherInfo:
    """Fisher signals for these windows, from the cache when present (keyed by the statistics key)."""
    key = make_key(FISHER_VERSION, stats_key)
    hit = load_tensors("fisher", key)
    names = [t.name for t in lm.targets]
    if hit is not None and hit[1].get("names") == names:
        t, meta = hit
        return FisherInfo(np.asarray(meta["per_block"]), meta["per_matrix"], {n: t[f"rows/{n}"] for n in names},
                          meta["trace"], meta["n_windows"], meta["loss"], key, 0.0)
    info = fisher_info(lm.model, lm.targets, windows, progress)
    info.key = key
    save_tensors("fisher", key, {f"rows/{n}": r for n, r in info.rows.items()},
                 {"names": names, "per_block": info.per_block.tolist(), "per_matrix": info.per_matrix,
                  "trace": info.trace, "n_windows": info.n_windows, "loss": info.loss, "seconds": info.seconds})
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
