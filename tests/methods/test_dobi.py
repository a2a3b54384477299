"""Dobi-SVD on a tiny random Llama: trained truncation positions, the IPCA weight update, remapping,
and the round trip of a remapped model through save/load."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dipsvd_core.allocation.budget import DENSE
from dipsvd_core.common.errors import DipSVDError
from dipsvd_core.engine import passes as P
from dipsvd_core.engine.stats import stream_stats
from dipsvd_core.io.compressed import load_compressed, save_compressed
from dipsvd_core.lowrank.factors import FactorSpec
from dipsvd_core.methods import dobi
from dipsvd_core.methods.dobi import DobiConfig
from dipsvd_core.run import steps
from dipsvd_core.run.pipeline import Settings, Workbench


@pytest.fixture(scope="module")
def bench(tiny_lm):
    return Workbench(tiny_lm, "wiki", calib_windows=6, seqlen=64, seed=0)


def dobi_settings(ratio, remap, **kw):
    return Settings(method="dobi", allocation="trained", ratio=ratio,
                    dobi=DobiConfig(remap=remap, windows=4, epochs=3, **kw)).check()


@pytest.mark.parametrize("remap", [False, True])
@pytest.mark.parametrize("ratio", [0.2, 0.4])
def test_trained_gammas_meet_the_ratio_within_one_percent(bench, ratio, remap):
    s = dobi_settings(ratio, remap)
    trained = steps.run(bench, P.TRAINING, s)
    assert len(trained.history) == 3 * 4 and not trained.cancelled
    assert set(trained.gammas) == {t.name for t in bench.targets}
    # The ranks of the trained gammas themselves, before any budget fix-up:
    ranks = dobi.ranks_from_gammas(trained.gammas, bench.targets, remap)
    assert abs(dobi.storage_ratio(ranks, bench.targets, remap) - ratio) < 0.01
    # The gammas moved away from the uniform start in both directions: bytes went from some matrices
    # to others, so the allocation was learned, not copied.
    start = dobi.uniform_gammas(bench.targets, ratio, remap)
    moves = [trained.gammas[n] - start[n] for n in start]
    assert min(moves) < -0.5 and max(moves) > 0.5


def test_budget_fixup_is_exact_and_never_over(bench):
    for remap in (False, True):
        trained = steps.run(bench, P.TRAINING, dobi_settings(0.3, remap))
        ranks = dobi.meet_budget(trained.gammas, bench.targets, 0.3, remap)
        realized = dobi.storage_ratio(ranks, bench.targets, remap)
        assert 0.3 <= realized < 0.305


def test_remap_lifts_the_rank_limit(bench, tiny_lm):
    t = next(t for t in tiny_lm.targets if t.out_features == t.in_features)  # q_proj 64 x 64
    assert dobi.max_factored_rank(t, remap=False) == 31  # 32 * 128 = 64 * 64: rank 32 costs as much as dense
    assert dobi.max_factored_rank(t, remap=True) == 60  # 60 * (128 + 8) = 8160 <= 8192 bytes; 61 does not fit
    plain = dobi.uniform_gammas(tiny_lm.targets, 0.2, remap=False)
    remapped = dobi.uniform_gammas(tiny_lm.targets, 0.2, remap=True)
    square = [x.name for x in tiny_lm.targets if x.out_features == x.in_features]
    assert all(remapped[n] > 1.8 * plain[n] for n in square)  # about twice the rank for the same bytes
    # 64 x 128 at 80% of its 16-bit bytes: remapped, even full rank 64 fits (64 * 200 = 12800 <= 13107)
    wide = next(x for x in tiny_lm.targets if x.name.endswith("up_proj"))  # 128 x 64
    assert dobi.max_factored_rank(wide, remap=True) == 64 and int(remapped[wide.name]) == 64


def test_ipca_update_equals_svd_llm_truncation(tiny_lm):
    """With exact PCA over the same windows, V_k V_k^T W is the rank-k minimiser of ||(W - W') X||_F,
    which is also what SVD-LLM's whitened truncation computes: the two weights agree."""
    wb = Workbench(tiny_lm, "wiki", calib_windows=4, seqlen=64, seed=0)
    factors = wb.factors(FactorSpec("svd-llm"))
    ranks = {t.name: (12 if t.out_features > 32 else 6) for t in tiny_lm.targets}
    weights = dobi.ipca_weights(tiny_lm.model, tiny_lm.targets, wb.windows(), ranks, extra=10_000)
    grams = {}
    stream_stats(tiny_lm.model, [t.name for t in tiny_lm.targets], wb.windows(),
                 lambda b, st: grams.update({n: g.clone() for n, g in st.grams.items()}))
    G = grams[tiny_lm.targets[0].name]  # inputs of q/k/v in block 0
    for t in tiny_lm.targets[:3]:
        u, v = weights[t.name]
        W_dobi = u.double() @ v.double()
        W_svdllm = factors[t.name].weight(ranks[t.name])
        # Compare on the calibration inputs, where both are optimal: ||(W1 - W2) X||^2 = tr(D G D^T)
        D = W_dobi - W_svdllm
        err = torch.trace(D @ G @ D.T).sqrt() / torch.trace(W_svdllm @ G @ W_svdllm.T).sqrt()
        assert err < 1e-4, (t.name, float(err))
    # And IPCA with a bounded state stays close to the exact one
    small = dobi.ipca_weights(tiny_lm.model, tiny_lm.targets[:1], wb.windows(), ranks, extra=4)
    name = tiny_lm.targets[0].name
    W = dict(tiny_lm.model.named_modules())[name].weight.detach().double()
    C = W @ G @ W.T  # Gram of the activations x W^T

    def captured(V):  # the share of activation energy that the basis keeps
        V = V.double()
        return float(torch.trace(V.T @ C @ V) / torch.trace(C))

    bounded, exact = captured(small[name][0]), captured(weights[name][0])
    assert exact - 0.01 < bounded <= exact + 1e-9


def test_build_evaluate_and_remapped_round_trip(bench, tiny_lm, tmp_path):
    s = dobi_settings(0.3, remap=True)
    res = bench.build(s)
    assert abs(res.allocation.ratio_realized - 0.3) < 0.005
    assert res.info["storage"]["remap"] and res.info["storage"]["storage_ratio"] == res.allocation.ratio_realized
    assert res.allocation.method == "trained" and len(res.allocation.history) == 12
    # The original is untouched; the compressed model runs and differs from it
    ids = bench.windows()[:1]
    with torch.no_grad():
        ref = tiny_lm.model(ids).logits
        out = res.model(ids).logits
    assert torch.isfinite(out).all() and not torch.equal(ref, out)
    assert all(isinstance(m, torch.nn.Linear) for n, m in tiny_lm.model.named_modules() if n.endswith("q_proj"))
    # Saved as int8 with per-vector scales; loading dequantizes and gives the same logits
    info = {"method": "dobi", "remap": True}
    path = save_compressed(res.model, tmp_path / "dobi", tiny_lm.tokenizer, info)
    state = load_file(str(path / "model.safetensors"))
    q_keys = [k for k in state if k.endswith(".u.weight") or k.endswith(".v.weight")]
    assert q_keys and all(state[k].dtype == torch.int8 for k in q_keys)
    assert all(f"{k}_scale" in state for k in q_keys)
    entry = json.loads((path / "config.json").read_text())["dipsvd_compression"]
    assert entry["remap"] is True
    # What the file holds for the factors is exactly the storage the ratio was counted with
    on_disk = sum(state[k].numel() + 4 * state[f"{k}_scale"].numel() for k in q_keys)
    dense16 = sum(dobi.dense_cost(t) for t in tiny_lm.targets if res.allocation.ranks[t.name] is DENSE)
    assert on_disk + dense16 == res.info["storage"]["targeted_bytes_after"]
    back = load_compressed(path, device="cpu")
    with torch.no_grad():
        again = back.model(ids).logits
    assert torch.allclose(again, out, atol=1e-5, rtol=1e-5)


def test_dense_when_the_trained_rank_is_past_the_break_even(tiny_lm):
    t = tiny_lm.targets[0]
    cap = dobi.max_factored_rank(t, remap=False)
    gammas = {x.name: 5.5 for x in tiny_lm.targets}
    gammas[t.name] = cap + 1.2
    ranks = dobi.ranks_from_gammas(gammas, tiny_lm.targets, remap=False)
    assert ranks[t.name] is DENSE and ranks[tiny_lm.targets[1].name] == 5


def test_bad_dobi_settings_name_the_fix():
    with pytest.raises(DipSVDError, match="allocation 'trained'"):
        Settings(method="dobi", allocation="uniform").check()
    with pytest.raises(DipSVDError, match="use it with method dobi"):
        Settings(method="dipsvd", allocation="trained").check()
    with pytest.raises(DipSVDError, match="epochs"):
        Settings(method="dobi", allocation="trained", dobi=DobiConfig(epochs=0)).check()


def test_training_can_be_cancelled(bench):
    import threading

    stop = threading.Event()
    seen = []

    def cb(step, record):
        seen.append(record["task"])
        if step == 2:
            stop.set()

    s = dobi_settings(0.25, remap=False, lam=50.0)  # a config not trained by another test
    trained = dobi.train_gammas(bench.lm.model, bench.targets, bench.windows()[:4], 0.25, s.dobi,
                                callback=cb, cancel=stop)
    assert trained.cancelled and len(trained.history) == 2 and all(x > 0 for x in seen)
    assert all(p.requires_grad for p in bench.lm.model.parameters())  # parameters thawed again


def test_the_penalty_alone_holds_the_ratio_on_the_tiny_model(bench):
    """The paper's mechanism, without our per-step projection: lam * |ratio - target| in the loss."""
    cfg = dobi.DobiConfig(epochs=3, windows=4, project=False)
    trained = dobi.train_gammas(bench.lm.model, bench.targets, bench.windows()[:4], 0.3, cfg)
    for remap in (False,):
        ranks = dobi.ranks_from_gammas(trained.gammas, bench.targets, remap)
        assert abs(dobi.storage_ratio(ranks, bench.targets, remap) - 0.3) < 0.01
    assert max(abs(h["ratio"] - 0.3) for h in trained.history[1:]) < 0.03  # it drifts but is pulled back


def test_remap_says_when_a_small_ratio_cannot_be_spent(tiny_lm):
    # 64 x 128 and 32 x 64 matrices at full rank in 8 bits take 78% and 81% of their 16-bit bytes
    note = dobi.budget_note(tiny_lm.targets, 0.05, remap=True)
    full = {t.name: dobi.gamma_cap(t, True) for t in tiny_lm.targets}
    least = dobi.storage_ratio(dobi.ranks_from_gammas(full, tiny_lm.targets, True), tiny_lm.targets, True)
    assert 0.05 < least < 0.3 and note is not None and f"{least:.3f}" in note
    assert dobi.budget_note(tiny_lm.targets, 0.4, remap=True) is None
    assert dobi.budget_note(tiny_lm.targets, 0.05, remap=False) is None
