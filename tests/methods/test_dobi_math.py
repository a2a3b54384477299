"""Dobi-SVD's tensor math (dipsvd_core.methods.dobi_math), asserted on numbers."""
import math

import pytest
import torch

from dipsvd_core.common.errors import DipSVDError
from dipsvd_core.methods.dobi_math import (IncrementalPCA, dense_storage_bytes, dequantize_absmax, ipca_basis,
                                           lowrank_storage_bytes, masked_svd, max_remap_rank, quantize_absmax,
                                           rank_from_gamma, stable_svd, truncation_weights)

F64 = torch.float64


def with_spectrum(m, n, s, seed=0):
    """A = P diag(s) Q^T (m, n) with orthonormal P, Q: singular values exactly s."""
    g = torch.Generator().manual_seed(seed)
    k = len(s)
    P = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=F64))[0]
    Q = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=F64))[0]
    return P @ torch.diag(torch.tensor(s, dtype=F64)) @ Q.T


def test_truncation_weights_values():
    t = truncation_weights(torch.tensor(2.5, dtype=F64), 5, beta=10.0)
    assert t.shape == (5,) and t.dtype == F64
    assert t[0] > 0.99 and t[1] > 0.99 and t[2] < 0.01 and t[4] < 1e-6
    assert t[1].item() == pytest.approx(0.5 * math.tanh(5) + 0.5, rel=1e-14)
    t3 = truncation_weights(torch.tensor(3.0, dtype=F64), 6, beta=4.0)
    assert t3[2].item() == 0.5  # i = gamma
    assert torch.all(t3[:-1] > t3[1:])  # decreasing in i
    g = torch.tensor(2.5, dtype=F64, requires_grad=True)
    truncation_weights(g, 5, beta=10.0).sum().backward()
    # d/dgamma = sum_i 0.5 beta sech^2(beta (gamma - i))
    want = sum(5 / math.cosh(10 * (2.5 - i)) ** 2 for i in range(1, 6))
    assert g.grad.item() == pytest.approx(want, rel=1e-12)
    with pytest.raises(DipSVDError):
        truncation_weights(torch.ones(2), 5)


def test_rank_from_gamma():
    assert rank_from_gamma(torch.tensor(2.3), 10) == 2
    assert rank_from_gamma(torch.tensor(2.7), 10) == 2  # t_3 = 0.0025 at gamma 2.7: component 3 is dropped
    assert rank_from_gamma(torch.tensor(3.0), 10) == 3
    t = truncation_weights(torch.tensor(2.7, dtype=F64), 5)
    assert int((t > 0.5).sum()) == rank_from_gamma(2.7, 5)
    assert rank_from_gamma(torch.tensor(-4.0), 10) == 1
    assert rank_from_gamma(torch.tensor(99.0), 10) == 10


def sign_invariant_loss(U, S, Vh, W1):
    """A loss of U diag(f(S)) Vh plus a function of S: it does not depend on singular vector signs."""
    return (W1 * ((U * torch.sin(S)[None, :]) @ Vh)).sum() + (S ** 3).sum()


@pytest.mark.parametrize("shape", [(7, 5), (5, 7)])
def test_stable_svd_gradient_equals_torch(shape):
    A = with_spectrum(*shape, [5.0, 4.0, 3.0, 2.0, 1.0])
    W1 = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    grads = []
    for svd in (stable_svd, lambda X: torch.linalg.svd(X, full_matrices=False)):
        X = A.clone().requires_grad_()
        sign_invariant_loss(*svd(X), W1).backward()
        grads.append(X.grad)
    assert grads[0].abs().max() > 0.1  # not trivially zero
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)
    # the forward is torch's SVD
    U, S, Vh = stable_svd(A)
    torch.testing.assert_close(S, torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=F64), rtol=1e-12, atol=0)
    torch.testing.assert_close((U * S) @ Vh, A, rtol=0, atol=1e-12)


def test_stable_svd_single_outputs_match_torch():
    """Gradients that arrive as None (outputs not used) count as zero: S alone, and U Vh alone."""
    A = with_spectrum(6, 5, [5.0, 4.0, 3.0, 2.0, 1.0], seed=2)
    W1 = torch.randn(6, 5, generator=torch.Generator().manual_seed(4), dtype=F64)
    for loss in (lambda U, S, Vh: (S ** 2 * torch.arange(5, dtype=F64)).sum(),
                 lambda U, S, Vh: (W1 * (U @ Vh)).sum()):
        grads = []
        for svd in (stable_svd, lambda X: torch.linalg.svd(X, full_matrices=False)):
            X = A.clone().requires_grad_()
            loss(*svd(X)).backward()
            grads.append(X.grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(6, 4), (4, 6)])
def test_masked_svd_gradcheck(shape):
    """Analytic gradients in A and gamma equal central finite differences (step 1e-6)."""
    A = with_spectrum(*shape, [5.0, 4.0, 3.0, 2.0], seed=1).requires_grad_()
    gamma = torch.tensor(2.3, dtype=F64, requires_grad=True)
    fn = lambda X, g: masked_svd(X, g, beta=4.0)  # noqa: E731  beta 4: d/dgamma well above rounding
    assert torch.autograd.gradcheck(fn, (A, gamma), eps=1e-6, atol=1e-8, rtol=1e-5)
    # and the gamma derivative is not negligible, so the check above means something
    out = fn(A, gamma)
    (dg,) = torch.autograd.grad(out.square().sum(), gamma)
    assert abs(dg.item()) > 1e-2


def test_masked_svd_truncates():
    A = with_spectrum(8, 5, [5.0, 4.0, 3.0, 2.0, 1.0])
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    out = masked_svd(A, torch.tensor(3.5, dtype=F64), beta=50.0)
    torch.testing.assert_close(out, (U[:, :3] * S[:3]) @ Vh[:3], rtol=0, atol=1e-12)


def test_equal_singular_values_stay_finite():
    A = with_spectrum(6, 4, [3.0, 2.0, 2.0, 1.0], seed=5)
    W1 = torch.randn(6, 4, generator=torch.Generator().manual_seed(6), dtype=F64)
    gamma = torch.tensor(2.5, dtype=F64)  # the mask cuts between the two equal values

    X = A.clone().requires_grad_()
    (W1 * masked_svd(X, gamma)).sum().backward()
    assert torch.isfinite(X.grad).all()
    assert X.grad.abs().max() < 1e6
    assert X.grad.abs().max() > 1e-3  # not zero

    # torch's own backward divides by S_2^2 - S_3^2 ~ 0: inf/nan or a huge value
    X = A.clone().requires_grad_()
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    t = truncation_weights(gamma, 4)
    (W1 * ((U * (S * t)) @ Vh)).sum().backward()
    assert not torch.isfinite(X.grad).all() or X.grad.abs().max() > 1e8


def test_inverse_gap_bound_for_exact_ties():
    """Exactly equal pairs give (taylor_terms + 1) / lambda_max, with the + sign."""
    from dipsvd_core.methods.dobi_math import _inverse_gaps
    S = torch.tensor([3.0, 2.0, 2.0, 1.0], dtype=F64)
    F = _inverse_gaps(S, taylor_terms=10, rel_gap=1e-2, eps=1e-6)
    assert F[1, 2].item() == pytest.approx(11 / 4, rel=1e-14) and F[2, 1].item() == pytest.approx(11 / 4, rel=1e-14)
    assert F[0, 3].item() == pytest.approx(1 / (1 - 9), rel=1e-14)  # exact elsewhere: 1 / (lam_3 - lam_0)
    assert F[3, 0].item() == pytest.approx(1 / (9 - 1), rel=1e-14)
    assert torch.all(F.diagonal() == 0)
    # a near tie inside rel_gap uses the series: value between the tie bound and the exact one
    S = torch.tensor([2.0, 2.0 * (1 - 1e-3)], dtype=F64)
    F = _inverse_gaps(S, taylor_terms=10, rel_gap=1e-2, eps=1e-6)
    lam = S ** 2
    q = (lam[1] / lam[0]).item()
    assert F[1, 0].item() == pytest.approx(sum(q ** n for n in range(11)) / lam[0].item(), rel=1e-12)
    assert F[0, 1].item() == pytest.approx(-F[1, 0].item(), rel=1e-14)


def correlated_rows(n, dim, seed=0, spectrum=None):
    g = torch.Generator().manual_seed(seed)
    if spectrum is None:
        mix = torch.eye(dim, dtype=F64) + 0.5 * torch.randn(dim, dim, generator=g, dtype=F64)
        return torch.randn(n, dim, generator=g, dtype=F64) @ mix
    Q = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=F64))[0]
    return torch.randn(n, dim, generator=g, dtype=F64) * torch.tensor(spectrum, dtype=F64) @ Q.T


def projector(V):
    return V @ V.T


def test_incremental_pca_equals_full_pca():
    X = correlated_rows(200, 12)
    pca = IncrementalPCA(12)
    for chunk in X.split(17):
        pca.partial_fit(chunk)
    assert pca.n_seen == 200 and pca.components.shape == (12, 12)
    _, s, Vt = torch.linalg.svd(X, full_matrices=False)
    torch.testing.assert_close(pca.singular_values, s, rtol=1e-10, atol=0)
    P_ipca = projector(pca.components[:5].T)
    assert torch.linalg.matrix_norm(P_ipca - projector(Vt[:5].T)) < 1e-8
    V5 = ipca_basis(X.split(17), 12, 5)
    assert V5.shape == (12, 5)
    assert torch.linalg.matrix_norm(projector(V5) - P_ipca) < 1e-10
    torch.testing.assert_close(V5.T @ V5, torch.eye(5, dtype=F64), rtol=0, atol=1e-12)


def test_incremental_pca_first_chunk_smaller_than_dim():
    X = correlated_rows(30, 12, seed=2)
    pca = IncrementalPCA(12)
    pca.partial_fit(X[:4])
    assert pca.components.shape == (4, 12)  # only 4 rows seen: rank 4
    pca.partial_fit(X[4:])
    torch.testing.assert_close(pca.singular_values, torch.linalg.svdvals(X), rtol=1e-10, atol=0)


def test_incremental_pca_bounded_memory():
    spectrum = [30.0, 20.0, 10.0] + [0.1] * 9  # a clear gap after 3
    X = correlated_rows(200, 12, seed=1, spectrum=spectrum)
    pca = IncrementalPCA(12, max_components=6)
    for chunk in X.split(17):
        pca.partial_fit(chunk)
        assert pca.components.shape[0] <= 6 and pca.singular_values.shape[0] <= 6
    Vt = torch.linalg.svd(X, full_matrices=False)[2]
    err = torch.linalg.matrix_norm(projector(pca.components[:3].T) - projector(Vt[:3].T))
    assert err < 1e-3
    with pytest.raises(DipSVDError):
        ipca_basis(X.split(17), 12, 7, max_components=6)
    with pytest.raises(DipSVDError):
        pca.partial_fit(torch.zeros(3, 11))


@pytest.mark.parametrize("dim", [0, 1])
def test_quantize_round_trip(dim):
    g = torch.Generator().manual_seed(7)
    M = torch.randn(40, 24, generator=g) * torch.logspace(-3, 2, 24)[None, :]  # very different vectors
    M[5] = 0
    M[:, 3] = 0
    q, scale = quantize_absmax(M, dim)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert scale.shape == (M.shape[1 - dim],)
    assert q.abs().max() <= 127 and q.abs().amax(dim=dim).max() == 127
    R = dequantize_absmax(q, scale, dim)
    assert R.dtype == torch.float32 and R.shape == M.shape
    err = (R - M).abs()
    absmax = M.abs().amax(dim=dim, keepdim=True)
    assert torch.all(err <= scale.unsqueeze(dim) / 2 + 1e-6 * absmax + 1e-30)
    assert torch.all(err <= absmax * (1 / 254 + 1e-6))
    zero_vec = R[5] if dim == 1 else R[:, 3]
    assert torch.all(zero_vec == 0)
    # a zero vector gets scale 1 (no division by zero), and the error is not trivially zero elsewhere
    assert scale[5 if dim == 1 else 3] == 1.0
    assert err.max() > 0


def test_quantize_rejects_nan():
    with pytest.raises(DipSVDError):
        quantize_absmax(torch.tensor([[1.0, float("nan")]]), 0)


SHAPES = [(576, 576), (576, 1536), (1536, 576), (192, 576), (64, 64), (1, 1)]


@pytest.mark.parametrize("out_f, in_f", SHAPES)
def test_storage_bytes(out_f, in_f):
    dense = dense_storage_bytes(out_f, in_f)
    assert dense == 2 * out_f * in_f
    r = min(out_f, in_f)
    assert lowrank_storage_bytes(3, out_f, in_f, remap=False) == 3 * (out_f + in_f) * 2
    assert lowrank_storage_bytes(3, out_f, in_f, remap=True) == 3 * (out_f + in_f) + 24
    # the 8-bit entries alone at full rank always fit a 16-bit dense matrix: r (out + in) <= 2 out in
    assert lowrank_storage_bytes(r, out_f, in_f, remap=True) - 8 * r <= dense
    k = max_remap_rank(out_f, in_f)
    assert 0 <= k <= r
    assert lowrank_storage_bytes(k, out_f, in_f, remap=True) <= dense
    if k < r:
        assert lowrank_storage_bytes(k + 1, out_f, in_f, remap=True) > dense
    # without remapping, full-rank 16-bit factors never fit: r (out + in) > out in
    assert lowrank_storage_bytes(r, out_f, in_f, remap=False) > dense


def test_max_remap_rank_values():
    # non-square with |out - in| >= 8: full rank fits with the scales included
    assert max_remap_rank(576, 1536) == 576
    assert max_remap_rank(192, 576) == 192
    assert lowrank_storage_bytes(192, 192, 576, remap=True) == 192 * 776 <= dense_storage_bytes(192, 576)
    # square: the 2k float32 scales cost 8 bytes per rank over k (2n) = 2 n^2, so a few ranks less
    assert max_remap_rank(576, 576) == 572  # 572 * 1160 = 663520 <= 663552 < 573 * 1160
    assert lowrank_storage_bytes(576, 576, 576, remap=True) == dense_storage_bytes(576, 576) + 8 * 576
    with pytest.raises(DipSVDError):
        max_remap_rank(0, 5)
