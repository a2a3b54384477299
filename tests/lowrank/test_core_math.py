"""The math of docs/DESIGN.md sections 1-3, asserted on numbers."""
import math

import pytest
import torch

from dipsvd_core.allocation.budget import kept_params, project, rank_for, ranks_for, realized_ratio, uniform
from dipsvd_core.common.errors import DipSVDError
from dipsvd_core.engine.stats import channel_importance
from dipsvd_core.lowrank.factors import channel_scale, factor_matrix, loss_curve, right_inverse, whitening
from dipsvd_core.model.blocks import Target

F64 = torch.float64


def correlated_inputs(n_in=40, n_tok=300, seed=0):
    """X (in, N) with correlated channels and a few loud ones, like real activations."""
    g = torch.Generator().manual_seed(seed)
    A = torch.eye(n_in, dtype=F64) + 0.4 * torch.randn(n_in, n_in, generator=g, dtype=F64)
    X = A @ torch.randn(n_in, n_tok, generator=g, dtype=F64)
    X[:3] *= 20
    return X


@pytest.fixture
def setting():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(24, 40, generator=g, dtype=F64)
    X = correlated_inputs()
    G = X @ X.T
    d = channel_scale(channel_importance(G), weight=30, bar=0.1)
    return W, X, G, d


@pytest.mark.parametrize("k", [1, 3, 8, 15, 23])
def test_whitening_theorem_paper_form(setting, k):
    """||(W - W') D X||_F = sqrt(sum_{i>k} sigma_i^2) for the D G D whitening."""
    W, X, G, d = setting
    S, S_inv, floored = whitening(G, d, "paper")
    assert floored == 0
    f = factor_matrix(W, S, S_inv, dtype=F64)
    lhs = torch.linalg.norm((W - f.weight(k)) @ (d[:, None] * X))
    rhs = torch.sqrt((f.sigma[k:] ** 2).sum())
    assert lhs.item() == pytest.approx(rhs.item(), rel=1e-6)
    assert loss_curve(f.sigma)[k].item() == pytest.approx(rhs.item(), rel=1e-12)


@pytest.mark.parametrize("k", [1, 8, 23])
def test_whitening_theorem_in_float32(setting, k):
    """The same identity with the whitening and the SVD in float32 (the compute dtype offered for GPUs
    where float64 is slow). Without channel weighting (SVD-LLM) the Gram's condition number is 1e7
    here and the identity holds to 1e-4. DipSVD's weighting (a = 30) takes it to 1e10: float32 then
    floors 17 of 40 eigenvalues, says so, and the identity is off by up to 17%: float64 is the
    default for that reason."""
    W, X, G, d = setting
    ones = torch.ones_like(d)
    S, S_inv, floored = whitening(G.float(), ones, "paper", compute=torch.float32)
    assert floored <= 1 and S.dtype == torch.float32
    f = factor_matrix(W.float(), S, S_inv, compute=torch.float32)
    lhs = torch.linalg.norm((W - f.weight(k)) @ X)
    rhs = torch.sqrt((f.sigma[k:] ** 2).sum())
    assert lhs.item() == pytest.approx(rhs.item(), rel=1e-4)
    _, _, floored = whitening(G.float(), d, "paper", compute=torch.float32)
    assert floored == 17


def test_whitening_matrices_square_to_the_weighted_gram(setting):
    W, X, G, d = setting
    S, S_inv, _ = whitening(G, d, "paper")
    DGD = d[:, None] * G * d[None, :]
    assert torch.allclose(S @ S.T, DGD, rtol=1e-9, atol=1e-9 * DGD.abs().max())
    assert torch.allclose(right_inverse(S, S, S_inv), torch.eye(40, dtype=F64), atol=1e-8)
    # "code" form: S S^T = (G D^2 G)^{1/2}, i.e. (S S^T)^2 = G D^2 G
    S, S_inv, _ = whitening(G, d, "code")
    M = S @ S.T
    target = G @ torch.diag(d ** 2) @ G
    assert torch.allclose(M @ M, target, rtol=1e-8, atol=1e-8 * target.abs().max())
    assert torch.allclose(S @ S_inv, torch.eye(40, dtype=F64), atol=1e-8)


@pytest.mark.parametrize("k", [2, 10, 20])
def test_code_form_error_identity(setting, k):
    """For any whitening S: ||(W - W') S||_F = sqrt(sum_{i>k} sigma_i^2)."""
    W, X, G, d = setting
    S, S_inv, _ = whitening(G, d, "code")
    f = factor_matrix(W, S, S_inv, dtype=F64)
    lhs = torch.linalg.norm((W - f.weight(k)) @ S)
    assert lhs.item() == pytest.approx(torch.sqrt((f.sigma[k:] ** 2).sum()).item(), rel=1e-6)


@pytest.mark.parametrize("k", [2, 10, 20])
def test_code_form_by_eigh_truncates_as_its_svd(setting, k):
    """In float64 the code form takes U, Sig from eigh((G D)(G D)^T), not from the SVD of G D. With
    DipSVD's weighting (cond(G D) 3e8 here) every truncation leaves the same data error as the SVD
    route's: ||(W - W') D X||_F agrees to 1e-5 (measured: 1e-7 at k = 10, 1e-6 at k = 20)."""
    W, X, G, d = setting
    U, sig, _ = torch.linalg.svd(G * d[None, :])
    root = sig.sqrt()
    by_svd = factor_matrix(W, U * root, U.T / root[:, None], dtype=F64)
    by_eigh = factor_matrix(W, *whitening(G, d, "code")[:2], dtype=F64)
    DX = d[:, None] * X
    err = [torch.linalg.norm((W - f.weight(k)) @ DX).item() for f in (by_svd, by_eigh)]
    assert err[1] == pytest.approx(err[0], rel=1e-5)
    # sigma to 1e-7 of the largest (1.2e-8 measured) (an eigendecomposition's accuracy is relative to the largest eigenvalue)
    assert torch.allclose(by_eigh.sigma, by_svd.sigma, rtol=0, atol=1e-7 * by_svd.sigma[0].item())


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_factors_by_eigh_equal_the_svd(setting, shape):
    """float64 factors come from eigh of the smaller of A A^T and A^T A (A = W S): every rank's truncation is the
    SVD's to 1e-9 of ||W||, the full rank gives back W, and a rank-deficient W gives finite factors whose zero
    components stay zero."""
    _, X, _, d = setting
    n_in = shape[1]
    S, S_inv, _ = whitening(X[:n_in] @ X[:n_in].T, d[:n_in], "paper")
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    by_eigh = factor_matrix(W, S, S_inv, dtype=F64)
    U, sig, Vt = torch.linalg.svd(W @ S, full_matrices=False)
    assert torch.allclose(by_eigh.sigma, sig, rtol=0, atol=1e-10 * sig[0].item())
    for k in (1, 5, 12, 24):
        svd_k = U[:, :k] @ torch.diag(sig[:k]) @ right_inverse(Vt[:k], S, S_inv)
        assert torch.allclose(by_eigh.weight(k), svd_k, rtol=0, atol=1e-9 * W.abs().max().item())
    assert torch.allclose(by_eigh.weight(24), W, atol=1e-9)
    W[3:] = 0  # rank 3
    f = factor_matrix(W, S, S_inv, dtype=F64)
    assert torch.isfinite(f.us).all() and torch.isfinite(f.vs).all()
    assert torch.allclose(f.weight(3), W, atol=1e-9) and torch.allclose(f.weight(24), W, atol=1e-9)


def test_weight_one_or_bar_zero_is_svd_llm(setting):
    W, X, G, _ = setting
    ones = torch.ones(40, dtype=F64)
    base = factor_matrix(W, *whitening(G, ones, "paper")[:2], dtype=F64)
    for d in (channel_scale(channel_importance(G), 1.0, 0.1), channel_scale(channel_importance(G), 30, 0.0)):
        # the code form squares G (cond 1e7 here) in its eigendecomposition: 3e-9 measured, hence 1e-8
        for form, rtol in (("paper", 1e-9), ("code", 1e-8)):
            f = factor_matrix(W, *whitening(G, d, form)[:2], dtype=F64)
            assert torch.allclose(f.sigma, base.sigma, rtol=rtol)
            assert torch.allclose(f.weight(7), base.weight(7), atol=1e-8)


@pytest.mark.parametrize("form", ["paper", "code", None])
def test_full_rank_reconstructs_w(setting, form):
    W, X, G, d = setting
    f = factor_matrix(W, *whitening(G, d, form)[:2], dtype=F64) if form else factor_matrix(W, dtype=F64)
    assert f.max_rank == 24
    assert torch.allclose(f.weight(24), W, atol=1e-9)


@pytest.mark.parametrize("form", ["paper", "code"])
def test_error_on_calibration_inputs_falls_as_rank_rises(setting, form):
    W, X, G, d = setting
    f = factor_matrix(W, *whitening(G, d, form)[:2], dtype=F64)
    errs = [torch.linalg.norm((W - f.weight(k)) @ X).item() for k in range(1, 25)]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    assert errs[-1] < 1e-8 * errs[0]


def test_channel_weighting_protects_the_loud_channels(setting):
    """What DipSVD is for: at equal rank, the error on the protected channels' contribution drops."""
    W, X, G, d = setting
    top = d > 1
    plain = factor_matrix(W, *whitening(G, torch.ones(40, dtype=F64), "paper")[:2], dtype=F64)
    dip = factor_matrix(W, *whitening(G, d, "paper")[:2], dtype=F64)
    Xt = X.clone()
    Xt[~top] = 0  # only the protected channels
    k = 8
    e_plain = torch.linalg.norm((W - plain.weight(k)) @ Xt)
    e_dip = torch.linalg.norm((W - dip.weight(k)) @ Xt)
    assert e_dip < 0.5 * e_plain


def test_alpha_equals_direct_definition():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(50, 7, generator=g, dtype=F64)  # N tokens x in channels
    direct = torch.stack([torch.sqrt(X[:, j] @ (X @ X.T) @ X[:, j]) for j in range(7)])
    assert torch.allclose(channel_importance(X.T @ X), direct, rtol=1e-12)


def test_channel_scale_picks_the_top_fraction():
    alpha = torch.tensor([5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0, 0.5])
    d = channel_scale(alpha, 30, 0.3)
    assert d.tolist() == [1, 1, 30, 1, 30, 1, 30, 1, 1, 1]
    assert channel_scale(alpha, 30, 0.0).tolist() == [1.0] * 10
    with pytest.raises(DipSVDError, match="bar"):
        channel_scale(alpha, 30, 1.5)
    with pytest.raises(DipSVDError, match="weight"):
        channel_scale(alpha, 0, 0.1)


def test_singular_gram_is_floored_not_fatal():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(20, 5, generator=g, dtype=F64)  # rank 5 of 20
    G = X @ X.T
    S, S_inv, floored = whitening(G, torch.ones(20, dtype=F64), "paper")
    assert floored >= 14
    assert torch.isfinite(S_inv).all()
    W = torch.randn(6, 20, generator=g, dtype=F64)
    f = factor_matrix(W, S, S_inv, dtype=F64)
    assert torch.allclose(f.weight(6), W, atol=1e-6)
    with pytest.raises(DipSVDError, match="no usable activations"):
        whitening(torch.zeros(4, 4, dtype=F64), torch.ones(4, dtype=F64), "paper")


def test_rank_convention():
    assert rank_for(0.8, 576, 576) == math.floor(0.8 * 576 * 576 / 1152) == 230
    assert rank_for(0.9, 1536, 576) == math.floor(0.9 * 1536 * 576 / 2112) == 377
    assert rank_for(1.0, 10, 20) is None  # dense
    assert rank_for(0.0001, 10, 20) == 1  # clipped to at least 1


SMOL_SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def smol_targets(n_blocks=30):
    return [Target(f"b{b}.m{i}", b, o, n, False) for b in range(n_blocks) for i, (o, n) in enumerate(SMOL_SHAPES)]


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
def test_realized_ratio_within_half_a_percent(ratio):
    for targets in (smol_targets(), [Target(f"t{i}", i // 7, o // 9, n // 9, False)
                                    for i, (o, n) in enumerate(SMOL_SHAPES * 2)]):
        a = uniform(targets, ratio)
        assert abs(a.ratio_realized - ratio) <= 0.005
        assert a.ratio_realized >= ratio - 1e-12  # never over budget
        assert realized_ratio(a.ranks, targets) == a.ratio_realized


def test_projector_respects_bounds_and_budget():
    targets = smol_targets(6)
    for p in ([1, 1, 1, 1, 1, 1], [0, 0, 5, 0, 0, 0], [1, 2, 3, 4, 5, 1e6], [0.3, 0.9, 0.1, 0.5, 0.5, 0.2]):
        a = project(p, targets, 0.3, p_min=0.2, p_max=0.95)
        assert (a.p_blocks >= 0.2 - 1e-12).all() and (a.p_blocks <= 0.95 + 1e-12).all()
        assert abs(a.ratio_realized - 0.3) <= 0.005
    with pytest.raises(DipSVDError, match="p_min"):
        project([1] * 6, targets, 0.9, p_min=0.5)


def test_ranks_for_uses_the_block_ratio():
    targets = smol_targets(2)
    ranks = ranks_for([0.5, 1.0], targets)
    assert ranks["b0.m0"] == 144 and ranks["b1.m0"] is None
    assert kept_params(ranks, targets) == 144 * 1152 + sum(
        rank_for(0.5, o, n) * (o + n) for o, n in SMOL_SHAPES[1:]) + sum(o * n for o, n in SMOL_SHAPES)


@pytest.mark.parametrize("bad", [0, 1, -0.1, 1.5, float("nan")])
def test_ratio_out_of_range_is_a_clear_error(bad):
    with pytest.raises(DipSVDError, match="strictly between 0 and 1"):
        uniform(smol_targets(1), bad)


def test_symmetric_eigh_is_torchs_and_runs_on_the_host_only_off_the_cpu():
    """The one place float64 eigendecompositions run (whitening, the factors, refine's solve): on the CPU it is
    torch.linalg.eigh itself (the host is the device); the host route is taken only for a GPU measured slower."""
    from dipsvd_core.lowrank.scalings import eigh_on_host, symmetric_eigh

    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 64, dtype=torch.float64, generator=g)
    m = a @ a.T
    L, Q = symmetric_eigh(m)
    L0, Q0 = torch.linalg.eigh(m)
    assert torch.equal(L, L0) and torch.equal(Q, Q0)
    torch.testing.assert_close(Q @ torch.diag(L) @ Q.T, m, rtol=0, atol=1e-10 * float(L.max()))
    assert eigh_on_host(torch.device("cpu")) is False


def test_eigh_placement_is_chosen_by_width_from_the_measured_time_model(monkeypatch):
    """A GPU whose float64 eigh is latency-bound (50 ms) loses to the host at 1024 wide and wins at Llama-3-8B's
    14,336 (3.0 s against 59 s); the model's two terms come back exactly from two measured points."""
    from dipsvd_core.lowrank import scalings

    assert scalings.cubic_fit(512, 0.05 + 1e-12 * 512**3, 1536, 0.05 + 1e-12 * 1536**3) == pytest.approx((0.05, 1e-12))
    assert scalings.cubic_fit(512, 0.2, 1536, 0.1) == (0.2, 0.0)  # noise: never a negative rate
    monkeypatch.setattr(scalings, "eigh_rates", lambda device: ((0.05, 1e-12), (0.001, 2e-11)))  # (device, host)
    cuda = torch.device("cuda")
    assert scalings.eigh_on_host(cuda, 1024) is True
    assert scalings.eigh_on_host(cuda, 4096) is False
    assert scalings.eigh_on_host(cuda, 14336) is False
    assert scalings.eigh_on_host(torch.device("cpu"), 1024) is False  # the CPU: no measurement, as before


@pytest.mark.parametrize("shape", [(24, 40), (60, 40)])
def test_paper_form_takes_the_cholesky_root_where_no_eigenvalue_is_floored(shape):
    """In float64 the paper form's S is the Cholesky factor of D G D (lower triangular, S S^T = D G D) where the
    Gram is safely positive definite, and every rank's truncation, of a wide or a tall W, is the eigendecomposition
    route's (S = Q L^{1/2}) to 1e-9 of ||W||, with the same singular values. A singular Gram (fewer tokens than
    channels) takes the eigendecomposition and floors its null space, as before."""
    from dipsvd_core.lowrank.scalings import EIG_FLOOR, cholesky_root, right_inverse, symmetric_eigh

    X = correlated_inputs()
    X[:3] /= 20  # no loud channels: cond(G) about 1e3
    G = X @ X.T
    d = channel_scale(channel_importance(G), weight=5, bar=0.1)
    S, S_inv, floored = whitening(G, d, "paper")
    DGD = d[:, None] * G * d[None, :]
    assert floored == 0 and torch.equal(S, torch.tril(S)) and S_inv is None  # never formed: solved with S
    torch.testing.assert_close(S @ S.T, DGD, rtol=0, atol=1e-12 * DGD.abs().max())
    torch.testing.assert_close(right_inverse(S, S, None), torch.eye(40, dtype=F64), rtol=0, atol=1e-10)
    L, Q = symmetric_eigh(DGD)
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    by_chol = factor_matrix(W, S, S_inv, dtype=F64)
    by_eigh = factor_matrix(W, Q * L.sqrt(), Q.T / L.sqrt()[:, None], dtype=F64)
    torch.testing.assert_close(by_chol.sigma, by_eigh.sigma, rtol=0, atol=1e-10 * by_eigh.sigma[0].item())
    for k in (1, 7, 20, 24):
        torch.testing.assert_close(by_chol.weight(k), by_eigh.weight(k), rtol=0, atol=1e-9 * W.abs().max().item())
    singular = X[:, :30] @ X[:, :30].T  # rank 30 of 40
    assert cholesky_root(singular, EIG_FLOOR[F64]) is None
    S, S_inv, floored = whitening(singular, torch.ones(40, dtype=F64), "paper")
    assert floored >= 10 and not torch.equal(S, torch.tril(S)) and S_inv is not None


@pytest.mark.parametrize("n", [40, 300, 601])
def test_outer_product_and_lower_matmul_by_block_triangles(n):
    """A A^T from its upper block triangle and W L for a lower-triangular L from L's lower blocks equal the full products
    to float64 rounding (the float64 factoring's two largest products, 10 of 16 blocks each at 256 columns or more)."""
    from dipsvd_core.lowrank.scalings import lower_matmul, outer_product

    g = torch.Generator().manual_seed(n)
    A = torch.randn(n, 2 * n + 3, generator=g, dtype=F64)
    torch.testing.assert_close(outer_product(A), A @ A.T, rtol=0, atol=1e-12 * (A @ A.T).abs().max())
    assert torch.equal(outer_product(A), outer_product(A).T)
    L = torch.linalg.cholesky(A @ A.T)
    W = torch.randn(n // 2 + 1, n, generator=g, dtype=F64)
    torch.testing.assert_close(lower_matmul(W, L), W @ L, rtol=0, atol=1e-12 * (W @ L).abs().max())
