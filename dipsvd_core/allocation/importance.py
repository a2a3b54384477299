"""Step 3b of the flow: global importance signals per decoder block (docs/DESIGN.md section 4), and the probes.

Computed from the calibration windows and the cached statistics, returned as plain arrays:
- Fisher sensitivity S_l (fisher.py): one backward pass of the next-token loss per calibration window, taken one
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
Fisher results are cached on disk under the statistics key (same model, same windows). The probes
(group_sensitivity) measure the loss of truncating one group of matrices at a time.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from ..common.errors import DipSVDError
from ..model.blocks import Target
from ..model.offload import weights_of
from .fisher import FisherInfo

ENERGIES = ("sigma2", "sigma")
NORM_EPS = 1e-6  # added after min-max normalisation so that no Q_l is exactly zero
# Which block-output spectrum R_l is taken of (Settings.rank_of): the name, its words, and the Stats field it reads
RANKS_OF = {"output": ("the paper's: of the block output H_l (Eq. 12, Alg. 5)", "block_spectra"),
            "trimmed": ("of H_l with its massive hidden dimensions set aside (energy over 500x the median "
                        "dimension's, stats.massive_dims): not blinded by them", "trimmed_spectra")}


def check_rank_of(rank_of: str) -> None:
    if rank_of not in RANKS_OF:
        raise DipSVDError(f"unknown rank_of '{rank_of}'; use one of {', '.join(RANKS_OF)}")


def rank_spectra(stats, rank_of: str = "output") -> list[torch.Tensor]:
    """The per-block eigenvalues R_l is taken of (RANKS_OF) from a stats.Stats."""
    check_rank_of(rank_of)
    return getattr(stats, RANKS_OF[rank_of][1])


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


HANDFUL = 8  # an effective rank at most this counts a handful of directions, not the block's output


def energy_shares(energy: list[torch.Tensor], k: int = HANDFUL) -> dict[str, np.ndarray]:
    """Where each block output's energy goes, from the diagonals of H^T H (Stats.block_energy): the share of the
    largest hidden dimension, of the k largest, and which dimension is the largest. Since the k largest eigenvalues
    hold at least the k largest diagonal entries (Ky Fan), a top-k share >= tau bounds R_l (sigma2) by k."""
    out = {"top1": [], "topk": [], "dim": []}
    for e in energy:
        e = torch.as_tensor(e, dtype=torch.float64).clamp_min(0)
        top = torch.sort(e, descending=True).values
        out["top1"].append(float(top[0] / e.sum()))
        out["topk"].append(float(top[:k].sum() / e.sum()))
        out["dim"].append(int(e.argmax()))
    return {name: np.asarray(v) for name, v in out.items()}


def degenerate_blocks(R, k: int = HANDFUL) -> list[int]:
    """The blocks whose effective rank counts only a handful (<= k) of directions."""
    return [b for b, r in enumerate(np.asarray(R)) if r <= k]


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
    from .budget import DENSE, rank_for

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

    from ..engine.evaluate import perplexity

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
