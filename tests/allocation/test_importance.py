"""Global importance signals (docs/DESIGN.md section 4): effective rank, Fisher sensitivity, Q."""
import numpy as np
import pytest
import torch

from dipsvd_core.allocation.fisher import cached_fisher, fisher_info
from dipsvd_core.allocation.importance import (NORM_EPS, combined_score, effective_rank, effective_ranks, minmax,
                                               rank_spectra)
from dipsvd_core.common.errors import DipSVDError
from dipsvd_core.engine.stats import stats_key
from dipsvd_core.run.pipeline import Settings, Workbench

F64 = torch.float64


@pytest.mark.parametrize("tau, energy, expected", [
    (0.95, "sigma2", 4), (0.9, "sigma2", 3), (0.7, "sigma2", 2), (0.71, "sigma2", 3), (0.4, "sigma2", 1),
    (1.0, "sigma2", 4), (0.8, "sigma", 3), (0.6, "sigma", 2), (0.61, "sigma", 3)])
def test_effective_rank_of_known_eigenvalues(tau, energy, expected):
    # sigma^2 = 4, 3, 2, 1 (plus exact zeros): cumulative sigma^2 energy 0.4, 0.7, 0.9, 1.0;
    # sigma = 2, 1.732, 1.414, 1: cumulative sigma energy 0.325, 0.607, 0.837, 1.0
    eigs = torch.tensor([1.0, 0.0, 4.0, 2.0, 3.0, 0.0], dtype=F64)
    assert effective_rank(eigs, tau, energy) == expected


def test_effective_rank_from_a_gram_with_a_known_spectrum():
    """H = U diag(s) V^T built directly: H^T H has eigenvalues s^2, so R follows from s alone."""
    g = torch.Generator().manual_seed(0)
    n, d = 200, 48
    U, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    s = 0.8 ** torch.arange(d, dtype=F64)  # geometric spectrum
    H = U @ torch.diag(s) @ V.T
    energy = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
    expected = int((energy < 0.95).sum()) + 1
    assert effective_rank(H.T @ H, 0.95, "sigma2") == expected == 7  # 1 - 0.64^7 = 0.956 >= 0.95 > 0.93
    energy1 = torch.cumsum(s, 0) / s.sum()
    assert effective_rank(H.T @ H, 0.95, "sigma") == int((energy1 < 0.95).sum()) + 1 == 14


def test_effective_rank_rejects_bad_input():
    with pytest.raises(DipSVDError, match="tau"):
        effective_rank(torch.ones(3), 1.5)
    with pytest.raises(DipSVDError, match="energy"):
        effective_rank(torch.ones(3), 0.9, "entropy")
    with pytest.raises(DipSVDError, match="zero energy"):
        effective_rank(torch.zeros(3), 0.9)


def test_combined_score_numbers():
    S, R = np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])
    Q = combined_score(S, R, beta=0.25)
    e = NORM_EPS
    expected = np.array([e ** 0.25 * (1 + e) ** 0.75, (0.5 + e) ** 0.25 * (0.5 + e) ** 0.75, (1 + e) ** 0.25 * e ** 0.75])
    np.testing.assert_allclose(Q, expected, rtol=1e-12)
    np.testing.assert_allclose(combined_score(S, R, beta=1.0), minmax(S), rtol=1e-12)
    np.testing.assert_allclose(combined_score(S, R, beta=0.0), minmax(R), rtol=1e-12)
    # equal signals carry no information: every block gets the same score
    np.testing.assert_allclose(combined_score(np.ones(4), np.full(4, 7.0), 0.25), np.ones(4))
    with pytest.raises(DipSVDError, match="beta"):
        combined_score(S, R, beta=1.5)


@pytest.fixture(scope="module")
def windows(tiny_lm):
    return Workbench(tiny_lm, "wiki", 3, 48).windows()


def test_fisher_matches_direct_autograd(tiny_lm, windows):
    model = tiny_lm.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    info = fisher_info(model, tiny_lm.targets, windows)

    mods = dict(model.named_modules())
    weights = [mods[t.name].weight for t in tiny_lm.targets]
    per_window = []
    outputs = {}
    hooks = [mods[t.name].register_forward_hook(lambda m, a, y, n=t.name: outputs.__setitem__(n, y))
             for t in tiny_lm.targets]
    g2 = {t.name: 0.0 for t in tiny_lm.targets}
    y2 = {t.name: 0.0 for t in tiny_lm.targets}
    for i in range(len(windows)):
        ids = windows[i: i + 1]
        logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
        ys = [outputs[t.name] for t in tiny_lm.targets]
        grads = torch.autograd.grad(loss, weights + ys)
        per_window.append(grads[: len(weights)])
        for t, y, gy in zip(tiny_lm.targets, ys, grads[len(weights):]):
            g2[t.name] += float(gy.double().pow(2).sum())
            y2[t.name] += float(y.detach().double().pow(2).sum())
    for h in hooks:
        h.remove()
    for t in tiny_lm.targets:  # output-side energies, per token
        assert info.out_grad2[t.name] == pytest.approx(g2[t.name] / windows.numel(), rel=1e-4)
        assert info.out_energy[t.name] == pytest.approx(y2[t.name] / windows.numel(), rel=1e-6)
    for j, t in enumerate(tiny_lm.targets):
        g_mean = sum(g[j].double() for g in per_window) / len(windows)
        expected = (torch.linalg.norm(g_mean) / (torch.linalg.norm(weights[j].double()) + 1e-8)).item()
        assert info.per_matrix[t.name] == pytest.approx(expected, rel=1e-4)
        rows = sum((g[j].double() ** 2).sum(0) for g in per_window)
        torch.testing.assert_close(info.rows[t.name], rows, rtol=1e-4, atol=1e-12)
        assert info.trace[t.name] == pytest.approx(rows.sum().item() / len(windows), rel=1e-4)
    blocks = np.zeros(tiny_lm.n_blocks)
    for t in tiny_lm.targets:
        blocks[t.block] += info.per_matrix[t.name]
    np.testing.assert_allclose(info.per_block, blocks, rtol=1e-12)
    assert all(v > 0 for v in info.per_matrix.values())
    # the model is left exactly as it was
    for n, p in model.named_parameters():
        assert p.requires_grad == flags[n] and p.grad is None
        assert torch.equal(p.detach(), before[n])


def test_fisher_is_cached_and_workbench_importance_has_every_signal(tiny_lm, windows):
    bench = Workbench(tiny_lm, "wiki", 3, 48)
    first = bench.fisher()
    again = cached_fisher(tiny_lm, windows, stats_key(tiny_lm, windows))
    assert again.seconds == 0.0  # from the disk cache
    np.testing.assert_allclose(again.per_block, first.per_block)
    name = tiny_lm.targets[0].name
    torch.testing.assert_close(again.rows[name], first.rows[name])
    imp = bench.importance(Settings(beta=0.25))
    assert set(imp) == {"S", "R", "S_norm", "R_norm", "Q"}
    assert all(v.shape == (tiny_lm.n_blocks,) for v in imp.values())
    np.testing.assert_allclose(imp["S"], first.per_block)
    np.testing.assert_allclose(imp["R"], effective_ranks(rank_spectra(bench.stats()), 0.95, "sigma2"))
    for tau, energy in ((0.95, "sigma2"), (0.9, "sigma"), (0.5, "sigma2")):  # cached spectra == the Grams
        np.testing.assert_array_equal(effective_ranks(rank_spectra(bench.stats()), tau, energy),
                                      effective_ranks(bench.stats().block_spectra, tau, energy))
    np.testing.assert_allclose(imp["Q"], imp["S_norm"] ** 0.25 * imp["R_norm"] ** 0.75)
    assert 1 <= imp["R"].min() and imp["R"].max() <= tiny_lm.model.config.hidden_size


@pytest.mark.parametrize("stage", ["fisher: forward", "fisher: backward"])
def test_fisher_leaves_the_model_as_it_was_when_interrupted(tiny_lm, windows, stage):
    """An error in any part (here the progress callback raising) restores the blocks, the requires_grad flags
    and the hooks: the stand-ins of the top pass and the weight-gradient hooks are gone."""
    from dipsvd_core.model.blocks import find_blocks

    model = tiny_lm.model
    _, blocks = find_blocks(model)
    originals = list(blocks)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    mods = dict(model.named_modules())

    def progress(fraction, message):
        if message.startswith(stage):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fisher_info(model, tiny_lm.targets, windows, progress)
    assert all(a is b for a, b in zip(blocks, originals)) and len(blocks) == len(originals)
    for n, p in model.named_parameters():
        assert p.requires_grad == flags[n] and p.grad is None
    assert not any(mods[t.name]._forward_hooks for t in tiny_lm.targets)


def test_checkpoint_every_keeps_all_that_fit_else_every_sqrt_l_th():
    from dipsvd_core.allocation.fisher import FISHER_KEEP_BYTES, checkpoint_every

    assert checkpoint_every(32, FISHER_KEEP_BYTES) == 1
    assert checkpoint_every(32, FISHER_KEEP_BYTES + 1) == 6  # ceil(sqrt(32)): Llama-3-8B holds 6 + 5 sets, not 32
    assert checkpoint_every(5, FISHER_KEEP_BYTES + 1) == 3
    assert checkpoint_every(1, FISHER_KEEP_BYTES + 1) == 1


def test_fisher_with_checkpoints_gives_the_same_figures_and_holds_fewer_inputs(tmp_path, monkeypatch):
    """Over the keep limit, the backward recomputes the inputs it did not keep: with 5 blocks the forward keeps
    blocks 0 and 3, the backward recomputes 4 from 3 and then 1, 2 from 0, and never holds more than 3 sets (not
    5); every figure equals the run that kept all. And each block's float32 gradient sums are dropped when its
    backward ends: no more than one block's at a time."""
    from devkit.models import make_tiny_llama

    from dipsvd_core.allocation import fisher
    from dipsvd_core.run.loading import load_model

    lm = load_model(make_tiny_llama(tmp_path / "five", layers=5), device="cpu", dtype="float32")
    windows = Workbench(lm, "wiki", 3, 48).windows()
    kept = fisher_info(lm.model, lm.targets, windows)

    seen, live = [], []
    real_forward, real_start = fisher._forward_inputs, fisher._Reductions.start

    def spy_forward(*args):
        fwd = real_forward(*args)
        seen.append(fwd)
        return fwd

    def spy_start(self, name, shape, device):
        live.append(len(self.grad_sum))
        real_start(self, name, shape, device)

    monkeypatch.setattr(fisher, "FISHER_KEEP_BYTES", 0)
    monkeypatch.setattr(fisher, "_forward_inputs", spy_forward)
    monkeypatch.setattr(fisher._Reductions, "start", spy_start)
    again = fisher_info(lm.model, lm.targets, windows)

    fwd = seen[0]
    assert fwd.every == 3 and fwd.most == 3 and fwd.held() == 0
    per_block = len(lm.targets) // 5
    assert max(live) == per_block - 1  # the block's own sums only, the block above's already reduced
    np.testing.assert_allclose(again.per_block, kept.per_block, rtol=1e-6)
    assert again.loss == kept.loss
    for t in lm.targets:
        assert again.per_matrix[t.name] == pytest.approx(kept.per_matrix[t.name], rel=1e-6)
        torch.testing.assert_close(again.rows[t.name], kept.rows[t.name], rtol=1e-6, atol=0)
        assert again.out_grad2[t.name] == pytest.approx(kept.out_grad2[t.name], rel=1e-6)
