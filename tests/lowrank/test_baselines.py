"""Baselines fwsvd and asvd: exact at full rank, the weighted error identity, and guarded zeros."""
import pytest
import torch

from dipsvd_core.common.errors import DipSVDError
from dipsvd_core.lowrank.factors import FactorSpec, diagonal_scale, factor_matrix, factor_model
from dipsvd_core.run.pipeline import Settings, Workbench

F64 = torch.float64


@pytest.fixture(scope="module")
def bench(tiny_lm):
    return Workbench(tiny_lm, "wiki", 4, 64)


@pytest.mark.parametrize("method", ["fwsvd", "asvd"])
def test_full_rank_reproduces_every_weight(bench, tiny_lm, method):
    factors = bench.factors(FactorSpec(method))
    mods = dict(tiny_lm.model.named_modules())
    assert set(factors) == {t.name for t in tiny_lm.targets}
    for t in tiny_lm.targets:
        W = mods[t.name].weight.detach().double()
        f = factors[t.name]
        assert f.max_rank == min(t.out_features, t.in_features)
        err = torch.linalg.norm(f.weight(f.max_rank) - W) / torch.linalg.norm(W)
        assert err < 1e-5  # us and vs are stored in float32
        assert torch.linalg.norm(f.weight(f.max_rank // 2) - W) / torch.linalg.norm(W) > 1e-2


def test_fwsvd_scales_are_the_fisher_rows_and_the_error_identity_holds(bench, tiny_lm):
    """With S = diag(sqrt(f)), ||(W - W_k) S||_F = sqrt(sum_{i>k} sigma_i^2) for every k."""
    fisher = bench.fisher()
    t = tiny_lm.targets[4]
    W = dict(tiny_lm.model.named_modules())[t.name].weight.detach().double()
    f = fisher.rows[t.name]
    assert f.shape == (t.in_features,) and (f > 0).all()
    S, S_inv, _ = diagonal_scale(f.sqrt(), "test")
    fac = factor_matrix(W, S, S_inv, dtype=F64)
    torch.testing.assert_close(fac.sigma, torch.linalg.svdvals(W * f.sqrt()[None, :]))
    for k in (1, 5, 20, 40):
        lhs = torch.linalg.norm((W - fac.weight(k)) * f.sqrt()[None, :])
        assert lhs.item() == pytest.approx(torch.sqrt((fac.sigma[k:] ** 2).sum()).item(), rel=1e-8)
    # the cached factors are this very factorisation
    cached = bench.factors(FactorSpec("fwsvd"))[t.name]
    torch.testing.assert_close(cached.sigma, fac.sigma, rtol=1e-9, atol=1e-12)


def test_asvd_scale_is_mean_abs_activation_to_the_half(bench, tiny_lm):
    stats = bench.stats()
    t = tiny_lm.targets[0]
    W = dict(tiny_lm.model.named_modules())[t.name].weight.detach().double()
    s = stats.abs_mean(t.name).double() ** 0.5
    cached = bench.factors(FactorSpec("asvd"))[t.name]
    torch.testing.assert_close(cached.sigma, torch.linalg.svdvals(W * s[None, :]), rtol=1e-9, atol=1e-12)


def test_zero_channels_are_guarded_and_fwsvd_needs_fisher(tiny_lm, bench):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 10, generator=g, dtype=F64)
    rows = torch.rand(10, generator=g, dtype=F64)
    rows[[2, 7]] = 0.0  # dead input channels: no gradient ever reached them
    S, S_inv, n = diagonal_scale(rows.sqrt(), "test")
    assert n == 2 and torch.isfinite(S_inv).all()
    fac = factor_matrix(W, S, S_inv, dtype=F64)
    torch.testing.assert_close(fac.weight(6), W, rtol=1e-9, atol=1e-9)
    weights = {"x": W}
    with pytest.raises(DipSVDError, match="Fisher"):
        factor_model(weights, FactorSpec("fwsvd"))
    out = factor_model(weights, FactorSpec("fwsvd"), fisher_rows={"x": rows})  # stored in float32
    assert torch.isfinite(out["x"].vs).all()
    torch.testing.assert_close(out["x"].weight(6), W, rtol=0, atol=1e-5 * W.abs().max().item())


def test_baselines_build_a_model_on_budget(bench):
    for method in ("fwsvd", "asvd"):
        result = bench.build(Settings(method=method, ratio=0.25))
        assert 0 <= result.allocation.ratio_realized - 0.25 <= 0.005
        assert result.allocation.method == "uniform"
