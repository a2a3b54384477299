"""Step 3 of the flow: channel-weighted whitening and the SVD of every matrix, computed once.

For a Linear y = W x with input Gram G = X X^T and channel scale D = diag(d):
- "paper" form (DipSVD Eq. 3): G~ = D G D = Q L Q^T, S = Q L^{1/2}, S^{-1} = L^{-1/2} Q^T.
- "code" form (the authors' public code): SVD of G D = U Sig V^T, S = U Sig^{1/2}, so that
  S S^T = (G D^2 G)^{1/2}; with D = I this is SVD-LLM's whitening too.
- `svd` (no data): S = I.
- Baselines with a diagonal S (S^{-1} its inverse, so every rank is still a slice):
  `fwsvd` (Fisher-weighted SVD, Hsu et al. 2022): S = diag(sqrt(f_j)) with f_j the row-wise Fisher
  of input channel j (importance.fisher_info, the same backward passes as the sensitivity);
  `asvd` (activation-aware SVD, Yuan et al. 2023): S = diag(mean|x_j|^0.5) from the statistics,
  with a uniform ratio. ASVD's per-layer sensitivity search for the ratios is left out.
Then W S = U Sigma V^T and the rank-k matrix is W' = U_k Sigma_k (V_k^T S^{-1}). A Factor keeps
U Sigma^{1/2}, sigma and Sigma^{1/2} V^T S^{-1} for all min(out, in) components, so any rank is a
slice. In the paper form
||(W - W') D X||_F = sqrt(sum_{i>k} sigma_i^2) exactly (where no eigenvalue was floored).
Everything is float64; the factors are stored in float32 with sigma in float64.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from .cache import load_tensors, make_key, save_tensors
from .errors import DipSVDError

log = logging.getLogger(__name__)

WHITENING_FORMS = ("paper", "code")
DEFAULT_WHITENING = "code"  # measured best on held-out text: bench/RESULTS.md
METHODS = ("svd", "svd-llm", "dipsvd", "fwsvd", "asvd")
EIG_FLOOR = 1e-10  # eigenvalues below this fraction of the largest are raised to it
DIAG_FLOOR = 1e-6  # diagonal scales below this fraction of the largest are raised to it (dead channels)
ASVD_ALPHA = 0.5  # ASVD's exponent on mean |x_j|


@dataclass
class Factor:
    """W S = U diag(sigma) V^T, stored pre-scaled so that any rank is a slice:
    us = U Sigma^{1/2} (out, r) and vs = Sigma^{1/2} V^T S^{-1} (r, in), r = min(out, in)."""

    us: torch.Tensor
    sigma: torch.Tensor  # (r,) float64, descending
    vs: torch.Tensor
    floored: int = 0  # eigenvalues floored while whitening: the loss identity is then approximate

    @property
    def max_rank(self) -> int:
        return self.sigma.numel()

    def low_rank(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, v) with W' = u @ v = U_k Sigma_k V_k^T S^{-1}; u is (out, k), v is (k, in). Fresh copies."""
        return self.us[:, :k].contiguous(), self.vs[:k].clone()

    def weight(self, k: int) -> torch.Tensor:
        return self.us[:, :k].double() @ self.vs[:k].double()

    def loss_curve(self) -> torch.Tensor:
        """L(k) = sqrt(sum_{i>k} sigma_i^2) for k = 0..r: the whitened error of every rank."""
        return loss_curve(self.sigma)


def loss_curve(sigma: torch.Tensor) -> torch.Tensor:
    energy = sigma.double() ** 2
    tail = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0])
    return torch.cat([tail, tail.new_zeros(1)]).clamp_min(0).sqrt()


def channel_scale(alpha: torch.Tensor, weight: float, bar: float) -> torch.Tensor:
    """d_j = weight for the top `bar` fraction of channels by alpha (round(bar * n) of them), else 1."""
    if weight <= 0:
        raise DipSVDError(f"weight must be positive (got {weight}); 1 disables channel protection")
    if not 0 <= bar <= 1:
        raise DipSVDError(f"bar must be a fraction in [0, 1] (got {bar})")
    d = torch.ones_like(alpha, dtype=torch.float64)
    n_top = int(round(bar * alpha.numel()))
    if n_top > 0 and weight != 1:
        d[torch.topk(alpha, n_top).indices] = float(weight)
    return d


def _floor(values: torch.Tensor, what: str, rel: float = EIG_FLOOR) -> tuple[torch.Tensor, int]:
    top = values.max().clamp_min(0)
    if top <= 0 or not torch.isfinite(top):
        raise DipSVDError(f"the {what} is zero or not finite: this layer saw no usable activations; "
                          "check the calibration text and the model's dtype")
    floor = top * rel
    n = int((values < floor).sum())
    if n:
        log.info("%s: %d of %d eigenvalues floored at %.3g", what, n, values.numel(), floor.item())
    return values.clamp_min(floor), n


def whitening(gram: torch.Tensor, d: torch.Tensor, form: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(S, S^{-1}, n_floored) for Gram G and channel scale d, in float64."""
    G = gram.double()
    if form == "paper":
        L, Q = torch.linalg.eigh(d[:, None] * G * d[None, :])
        L, n = _floor(L, "weighted Gram")
        root = L.sqrt()
        return Q * root, Q.T / root[:, None], n
    if form == "code":
        U, sig, _ = torch.linalg.svd(G * d[None, :])
        sig, n = _floor(sig, "weighted Gram")
        root = sig.sqrt()
        return U * root, U.T / root[:, None], n
    raise DipSVDError(f"unknown whitening form '{form}'; use one of {', '.join(WHITENING_FORMS)}")


def factor_matrix(W: torch.Tensor, S: torch.Tensor | None = None, S_inv: torch.Tensor | None = None,
                  floored: int = 0, dtype: torch.dtype = torch.float32) -> Factor:
    """SVD of W S (or of W when S is None), keeping all min(out, in) components.

    The SVD is float64; `dtype` is how us and vs are stored (float32 halves the memory).
    """
    W64 = W.detach().double().cpu()
    U, sigma, Vt = torch.linalg.svd(W64 @ S if S is not None else W64, full_matrices=False)
    VtSinv = Vt @ S_inv if S_inv is not None else Vt
    root = sigma.sqrt()
    return Factor((U * root).to(dtype), sigma, (root[:, None] * VtSinv).to(dtype), floored)


@dataclass(frozen=True)
class FactorSpec:
    """What the factors depend on, besides the model and the calibration windows."""

    method: str = "dipsvd"
    weight: float = 30.0
    bar: float = 0.03
    whitening: str = DEFAULT_WHITENING

    def __post_init__(self):
        if self.method not in METHODS:
            raise DipSVDError(f"unknown method '{self.method}'; use one of {', '.join(METHODS)}")
        if self.whitening not in WHITENING_FORMS:
            raise DipSVDError(f"unknown whitening form '{self.whitening}'; use paper or code")

    @property
    def key(self) -> tuple:
        if self.method == "svd":
            return ("svd",)
        if self.method == "svd-llm":  # D = I: both forms give S S^T = G; eigh ("paper") is cheaper
            return ("svd-llm",)
        if self.method == "fwsvd":  # the Fisher key is added by cached_factors
            return ("fwsvd", DIAG_FLOOR)
        if self.method == "asvd":
            return ("asvd", ASVD_ALPHA, DIAG_FLOOR)
        return ("dipsvd", float(self.weight), float(self.bar), self.whitening)


def diagonal_scale(scale: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(S, S^{-1}, n_floored) for S = diag(scale); zero (dead) entries are floored so S^{-1} exists."""
    s, n = _floor(scale.double(), what, DIAG_FLOOR)
    return torch.diag(s), torch.diag(1 / s), n


def factor_model(weights: dict[str, torch.Tensor], stats, spec: FactorSpec, progress=None,
                 fisher_rows: dict[str, torch.Tensor] | None = None) -> dict[str, Factor]:
    """Factor every targeted matrix. The whitening of a shared input group is computed once.

    `fisher_rows` (name -> (in,) row-wise Fisher, from importance.fisher_info) is needed by fwsvd only.
    """
    if spec.method == "fwsvd" and fisher_rows is None:
        raise DipSVDError("fwsvd needs the Fisher weights of the calibration loss; pass fisher_rows "
                          "(Workbench.factors does this)")
    whiten_cache: dict[str, tuple] = {}
    out = {}
    for i, (name, W) in enumerate(weights.items()):
        if spec.method == "svd":
            out[name] = factor_matrix(W)
        elif spec.method == "fwsvd":  # per matrix: the Fisher of each weight differs even in a shared group
            S, S_inv, n = diagonal_scale(fisher_rows[name].sqrt(), f"Fisher scale of {name}")
            out[name] = factor_matrix(W, S, S_inv, n)
        elif spec.method == "asvd":
            group = stats.group_of[name]
            if group not in whiten_cache:
                whiten_cache[group] = diagonal_scale(stats.abs_means[group].double() ** ASVD_ALPHA,
                                                     f"activation scale of {group}")
            S, S_inv, n = whiten_cache[group]
            out[name] = factor_matrix(W, S, S_inv, n)
        else:
            group = stats.group_of[name]
            if group not in whiten_cache:
                gram = stats.grams[group]
                if spec.method == "dipsvd":
                    d = channel_scale(stats.alpha(name), spec.weight, spec.bar)
                    whiten_cache[group] = whitening(gram, d, spec.whitening)
                else:
                    whiten_cache[group] = whitening(gram, torch.ones(gram.shape[0], dtype=torch.float64), "paper")
            S, S_inv, n = whiten_cache[group]
            out[name] = factor_matrix(W, S, S_inv, n)
        if progress:
            progress((i + 1) / len(weights), f"factoring {name}")
    return out


def cached_factors(lm, stats_key: str, stats, spec: FactorSpec, progress=None,
                   fisher=None) -> tuple[dict[str, Factor], float]:
    """Factors from the disk cache when present; returns (factors, seconds spent factoring).

    `fisher` (an importance.FisherInfo) is used by fwsvd only; its key joins the cache key.
    """
    fisher = fisher if spec.method == "fwsvd" else None
    key = make_key("factors-v2", stats_key, spec.key, *([fisher.key] if fisher is not None else []))
    hit = load_tensors("factors", key)
    if hit is not None:
        t, meta = hit
        return {n: Factor(t[f"{n}/us"], t[f"{n}/sigma"], t[f"{n}/vs"], meta["floored"][n])
                for n in meta["names"]}, 0.0
    t0 = time.perf_counter()
    mods = dict(lm.model.named_modules())
    weights = {t.name: mods[t.name].weight for t in lm.targets}
    factors = factor_model(weights, stats, spec, progress, fisher.rows if fisher is not None else None)
    seconds = time.perf_counter() - t0
    tensors = {}
    for n, f in factors.items():
        tensors.update({f"{n}/us": f.us, f"{n}/sigma": f.sigma, f"{n}/vs": f.vs})
    save_tensors("factors", key, tensors, {"names": list(factors), "spec": list(spec.key),
                                           "floored": {n: f.floored for n, f in factors.items()},
                                           "seconds": seconds})
    return factors, seconds
