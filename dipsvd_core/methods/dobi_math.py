"""Dobi-SVD's tensor math (arXiv 2502.02723): the pieces its training and export steps are built from.

Dobi-SVD truncates activations A = x W^T (rows are tokens), not weights, and learns one continuous
truncation position gamma per matrix:
- `truncation_weights` / `masked_svd`: A' = U diag(S * t(gamma)) V^T with a tanh mask t, so the
  loss is differentiable in gamma as well as in A. `rank_from_gamma` turns a trained gamma into a rank.
- `stable_svd`: the SVD whose backward survives (nearly) equal and tiny singular values, which
  activations of real models have plenty of; the plain SVD gradient divides by S_k^2 - S_j^2.
- `IncrementalPCA` / `ipca_basis`: the right basis V_k of the stacked activations of many batches
  with bounded memory, so the weight is rebuilt as W' = (W^T V_k V_k^T)^T = W V_k V_k^T.
- `quantize_absmax` and the storage counts: Dobi-SVD's "remapping" stores the factors in 8 bits,
  so rank up to (about) min(out, in) fits in the bytes of the 16-bit dense matrix.
No model walking here: every function takes and returns tensors or numbers.
"""
from __future__ import annotations

from typing import Iterable

import torch

from ..common.errors import DipSVDError

QMAX = 127  # symmetric int8 range [-127, 127]: -128 is left out so that q and -q both exist
SCALE_BYTES = 4  # one float32 scale per remapped rank vector


def truncation_weights(gamma: torch.Tensor, n: int, beta: float = 10.0) -> torch.Tensor:
    """t_i = 0.5 tanh(beta (gamma - i)) + 0.5 for i = 1..n (1-based: sigma_1 is the largest); shape (n,).

    t_i = 0.5 exactly at i = gamma, so gamma = k + 0.5 keeps components 1..k almost fully and
    drops the rest. Differentiable in gamma (a 0-d tensor); the result has gamma's dtype.
    """
    gamma = torch.as_tensor(gamma, dtype=torch.float64) if not torch.is_tensor(gamma) else gamma
    if gamma.ndim != 0:
        raise DipSVDError(f"gamma must be a single number (a 0-d tensor), got shape {tuple(gamma.shape)}")
    if n < 1 or beta <= 0:
        raise DipSVDError(f"need n >= 1 and beta > 0 (got n={n}, beta={beta})")
    i = torch.arange(1, n + 1, dtype=gamma.dtype, device=gamma.device)
    return 0.5 * torch.tanh(beta * (gamma - i)) + 0.5


def rank_from_gamma(gamma, kmax: int) -> int:
    """The integer rank of a trained gamma: floor(gamma) clamped to [1, kmax].

    The mask has t_i > 0.5 exactly for i < gamma, so floor(gamma) components are the ones kept
    (at an integer gamma the boundary component, t = 0.5, is counted as kept).
    """
    if kmax < 1:
        raise DipSVDError(f"kmax must be at least 1 (got {kmax})")
    return int(min(max(int(float(gamma) // 1), 1), kmax))


def _inverse_gaps(S: torch.Tensor, taylor_terms: int, rel_gap: float, eps: float) -> torch.Tensor:
    """F (k, k) with F_jk ~ 1 / (lambda_k - lambda_j), lambda = max(S, eps S.max())^2; 0 on the diagonal.

    Near-equal pairs get the truncated geometric series of 1 / (lmax - lmin) = (1/lmax) / (1 - q),
    q = lmin / lmax, so F stays bounded by (taylor_terms + 1) / lmax even when lambda_k == lambda_j.
    """
    floor = (eps * S.max()).clamp_min(torch.finfo(S.dtype).tiny ** 0.5)  # an all-zero S still gives lambda > 0
    lam = S.clamp_min(floor) ** 2
    diff = lam[None, :] - lam[:, None]  # [j, k] = lambda_k - lambda_j, the E of the plain formula
    lmax = torch.maximum(lam[None, :], lam[:, None])
    q = torch.minimum(lam[None, :], lam[:, None]) / lmax
    series = torch.ones_like(q)
    for _ in range(taylor_terms):  # Horner: 1 + q (1 + q (1 + ...)) = sum_{n=0}^{N} q^n
        series = 1 + q * series
    sign = torch.where(diff >= 0, 1.0, -1.0).to(S.dtype)  # + when exactly equal
    near = diff.abs() < rel_gap * lmax
    F = torch.where(near, sign * series / lmax, 1 / torch.where(near, torch.ones_like(diff), diff))
    return F.fill_diagonal_(0)  # skew(.) is 0 there anyway


class _StableSVD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A, taylor_terms, rel_gap, eps):
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        ctx.save_for_backward(U, S, Vh)
        ctx.opts = (taylor_terms, rel_gap, eps)
        ctx.set_materialize_grads(False)  # unused outputs arrive as None: skip their terms
        return U, S, Vh

    @staticmethod
    def backward(ctx, gU, gS, gVh):
        U, S, Vh = ctx.saved_tensors
        taylor_terms, rel_gap, eps = ctx.opts
        m, n, k = U.shape[0], Vh.shape[1], S.numel()
        if gU is None and gS is None and gVh is None:
            return None, None, None, None
        S_inv = 1 / S.clamp_min((eps * S.max()).clamp_min(torch.finfo(S.dtype).tiny))
        F = _inverse_gaps(S, taylor_terms, rel_gap, eps)  # F = 1 / E off the diagonal
        inner = torch.zeros(k, k, dtype=S.dtype, device=S.device)
        gA = torch.zeros(m, n, dtype=S.dtype, device=S.device)
        if gU is not None:
            UtgU = U.T @ gU  # (k, k)
            inner = inner + (UtgU - UtgU.T) * F * S[None, :]  # (skew / E) S: column k times S_k
            if m > k:  # (I_m - U U^T) gU S^{-1} V^T; zero when U is square
                gA = gA + ((gU - U @ UtgU) * S_inv[None, :]) @ Vh
        if gVh is not None:
            VtgV = Vh @ gVh.T  # V^T gV, (k, k)
            inner = inner + S[:, None] * ((VtgV - VtgV.T) * F)  # S (skew / E): row j times S_j
            if n > k:  # U S^{-1} gV^T (I_n - V V^T) = U S^{-1} (gVh - (V^T gV)^T Vh)
                gA = gA + U @ (S_inv[:, None] * (gVh - VtgV.T @ Vh))
        if gS is not None:
            inner = inner + torch.diag(gS)
        return gA + U @ inner @ Vh, None, None, None


def stable_svd(A: torch.Tensor, taylor_terms: int = 10, rel_gap: float = 1e-2,
               eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) = torch.linalg.svd(A, full_matrices=False) of a real (m, n) matrix, k = min(m, n),
    with Dobi-SVD's stabilised backward.

    The backward is the standard real reduced-SVD gradient (the one PyTorch uses), V = Vh^T:
      gA = U [(skew(U^T gU) / E) S + S (skew(V^T gV) / E) + diag(gS)] V^T
           + (I_m - U U^T) gU S^{-1} V^T + U S^{-1} gV^T (I_n - V V^T),
    skew(X) = X - X^T, E_jk = lambda_k - lambda_j with lambda = S^2; gradients that arrive as None
    count as zero. Two changes keep it finite:
    (a) S is clamped below at eps * S.max() wherever it is divided by (S^{-1} and lambda);
    (b) where |lambda_k - lambda_j| < rel_gap * max(lambda_k, lambda_j), 1 / (lambda_k - lambda_j)
        becomes sign(lambda_k - lambda_j) (1 / lmax) sum_{n=0}^{taylor_terms} q^n, q = lmin / lmax
        (sign + when equal), the truncated Taylor series of 1 / (lmax - lmin): at most
        (taylor_terms + 1) / lmax instead of infinity. Elsewhere the exact value is used, so for
        well-separated singular values the gradient is PyTorch's.
    """
    if A.ndim != 2 or A.is_complex():
        raise DipSVDError(f"stable_svd takes one real 2-D matrix, got shape {tuple(A.shape)} and dtype "
                          f"{A.dtype}; loop over a batch yourself")
    if taylor_terms < 0 or rel_gap < 0 or eps < 0:
        raise DipSVDError("taylor_terms, rel_gap and eps must be non-negative")
    return _StableSVD.apply(A, taylor_terms, rel_gap, eps)


def masked_svd(A: torch.Tensor, gamma: torch.Tensor, beta: float = 10.0, **svd_kw) -> torch.Tensor:
    """Dobi-SVD's differentiable truncation A' = U diag(S t(gamma)) Vh of an activation matrix
    A = x W^T (tokens, out); differentiable in A and gamma. svd_kw goes to stable_svd.

    The result does not depend on the signs LAPACK picks for the singular vectors.
    """
    U, S, Vh = stable_svd(A, **svd_kw)
    t = truncation_weights(gamma, S.numel(), beta).to(S.dtype)
    return (U * (S * t)[None, :]) @ Vh


class IncrementalPCA:
    """Uncentered incremental PCA: the top right singular vectors of all rows seen, chunk by chunk.

    No mean is subtracted: the goal is A ~ A V_k V_k^T. The state is diag(s) V^T (c, dim), which
    has the same Gram V diag(s^2) V^T as every row seen when nothing was dropped; each chunk is
    stacked under it and re-decomposed. Memory is (c + chunk rows) x dim with c <= max_components.
    With max_components >= dim (or None) the result is exactly the PCA of all rows, up to signs.
    """

    def __init__(self, dim: int, max_components: int | None = None, dtype=torch.float64):
        if dim < 1 or (max_components is not None and max_components < 1):
            raise DipSVDError(f"need dim >= 1 and max_components >= 1 or None (got {dim}, {max_components})")
        self.dim, self.max_components, self.dtype = dim, max_components, dtype
        self._s = torch.zeros(0, dtype=dtype)
        self._Vt = torch.zeros(0, dim, dtype=dtype)
        self.n_seen = 0

    def partial_fit(self, chunk: torch.Tensor) -> "IncrementalPCA":
        if chunk.ndim != 2 or chunk.shape[1] != self.dim:
            raise DipSVDError(f"chunk must be (rows, {self.dim}), got {tuple(chunk.shape)}; "
                              "flatten the batch and sequence dimensions first")
        if chunk.shape[0] == 0:
            return self
        self._s, self._Vt = self._s.to(chunk.device), self._Vt.to(chunk.device)
        stacked = torch.cat([self._s[:, None] * self._Vt, chunk.detach().to(self.dtype)])
        s, Vt = _right_svd(stacked)
        self.n_seen += chunk.shape[0]
        keep = min(self.max_components or self.dim, self.n_seen, self.dim)
        self._s, self._Vt = s[:keep].clone(), Vt[:keep].clone()  # clone: free the full SVD
        return self

    @property
    def components(self) -> torch.Tensor:
        """(c, dim): rows are right singular vectors, by descending singular value."""
        return self._Vt

    @property
    def singular_values(self) -> torch.Tensor:
        """(c,) descending; their squares are the eigenvalues of sum A^T A (when nothing was dropped)."""
        return self._s


def _right_svd(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, Vt) of M (r, d), descending, from the eigendecomposition of the smaller Gram matrix.

    eigh of M M^T (r < d) or M^T M is 5-10x faster than a full SVD on a CPU; squaring costs
    precision only in directions below sqrt(machine eps) of the largest, which are dropped.
    """
    r, d = M.shape
    if r < d:
        lam, U = torch.linalg.eigh(M @ M.T)
        lam, U = lam.flip(0), U.flip(1)
        s = lam.clamp_min(0).sqrt()
        keep = s > s[0] * torch.finfo(M.dtype).eps ** 0.5 if s[0] > 0 else s > 0
        s, U = s[keep], U[:, keep]
        return s, (U.T @ M) / s[:, None]
    lam, V = torch.linalg.eigh(M.T @ M)
    return lam.flip(0).clamp_min(0).sqrt(), V.flip(1).T


def ipca_basis(chunks: Iterable[torch.Tensor], dim: int, k: int,
               max_components: int | None = None) -> torch.Tensor:
    """V_k (dim, k): the top-k right singular vectors (as columns) of all chunks stacked."""
    pca = IncrementalPCA(dim, max_components)
    for chunk in chunks:
        pca.partial_fit(chunk)
    if not 1 <= k <= pca.components.shape[0]:
        raise DipSVDError(f"asked for {k} components but only {pca.components.shape[0]} are available "
                          f"({pca.n_seen} rows seen, max_components={max_components}); feed more "
                          "calibration rows or lower k")
    return pca.components[:k].T.contiguous()


def quantize_absmax(M: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8, scale float32): per-vector absmax 8-bit quantisation; the vectors run along `dim`.

    scale = max |M| over each vector / 127 (1 for an all-zero vector), q = round(M / scale) in
    [-127, 127]. `scale` has M's shape without `dim`: dim=0 on u (out, k) gives one per rank column.
    """
    if not torch.isfinite(M).all():
        raise DipSVDError("the matrix to quantise has inf or nan entries; check the factors before remapping")
    M32 = M.detach().float()
    scale = M32.abs().amax(dim=dim) / QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # zero vector: no division by zero
    q = torch.round(M32 / scale.unsqueeze(dim)).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_absmax(q: torch.Tensor, scale: torch.Tensor, dim: int) -> torch.Tensor:
    """float32 q * scale, with scale broadcast back along `dim` (the inverse of quantize_absmax)."""
    return q.float() * scale.float().unsqueeze(dim)


def _check_shape(out_features: int, in_features: int, dense_bytes: int):
    if out_features < 1 or in_features < 1 or dense_bytes < 1:
        raise DipSVDError(f"need positive sizes and dense_bytes (got {out_features}, {in_features}, {dense_bytes})")


def dense_storage_bytes(out_features: int, in_features: int, dense_bytes: int = 2) -> int:
    """Bytes of the dense matrix; 2 = the 16-bit model Dobi-SVD counts against."""
    _check_shape(out_features, in_features, dense_bytes)
    return out_features * in_features * dense_bytes


def lowrank_storage_bytes(k: int, out_features: int, in_features: int, remap: bool,
                          dense_bytes: int = 2) -> int:
    """Bytes of u (out, k) and v (k, in): k (out + in) dense entries, or with remap k (out + in)
    int8 entries plus one float32 scale per rank vector of u and of v (2k scales)."""
    _check_shape(out_features, in_features, dense_bytes)
    if k < 0:
        raise DipSVDError(f"rank must be non-negative (got {k})")
    if remap:
        return k * (out_features + in_features) + 2 * k * SCALE_BYTES
    return k * (out_features + in_features) * dense_bytes


def max_remap_rank(out_features: int, in_features: int, dense_bytes: int = 2) -> int:
    """The largest k whose remapped bytes fit in the dense bytes, capped at min(out, in).

    Without the scales k = min(out, in) always fits a 16-bit matrix (k (out + in) <= 2 out in); the
    2k float32 scales push a square matrix just over, so there the cap is a few ranks lower.
    """
    per_rank = lowrank_storage_bytes(1, out_features, in_features, remap=True, dense_bytes=dense_bytes)
    fit = dense_storage_bytes(out_features, in_features, dense_bytes) // per_rank
    return min(fit, out_features, in_features)
