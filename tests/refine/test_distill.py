"""End-to-end distillation after the build (refine/distill.py): what it trains, that it lowers the held-out KL or
keeps the build, that the original is untouched, its float32 masters for 16-bit weights, its refusals, and its
place in the plan and the CLI."""
import copy
import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dipsvd_core.common.errors import DipSVDError
from dipsvd_core.refine.choices import DistillConfig
from dipsvd_core.refine.distill import distill, distilled_summary, held_kl, kl_divergence
from dipsvd_core.run.pipeline import Settings, Workbench


def _built(tiny_lm, ratio=0.4):
    bench = Workbench(tiny_lm, "wiki", 6, 32)
    return bench, bench.build(Settings(method="svd-llm", ratio=ratio))


def test_kl_divergence_is_the_mean_over_tokens():
    torch.manual_seed(0)
    s, t = torch.randn(5, 11), torch.randn(5, 11)
    p, q = F.softmax(t, -1), F.softmax(s, -1)
    expected = sum(float((p[i] * (p[i] / q[i]).log()).sum()) for i in range(5)) / 5
    assert float(kl_divergence(s, t)) == pytest.approx(expected, rel=1e-5)
    assert float(kl_divergence(t, t)) == pytest.approx(0.0, abs=1e-6)


def test_distillation_lowers_the_kl_and_leaves_the_original(tiny_lm):
    """On windows it fits (a random model has nothing to generalise: its held-out KL is noise) the KL falls by
    more than 30% in three epochs (0.00103 to 0.00057 when written)."""
    bench, built = _built(tiny_lm)
    original = {n: p.detach().clone() for n, p in tiny_lm.model.named_parameters()}
    flags = {n: p.requires_grad for n, p in tiny_lm.model.named_parameters()}
    held = bench.windows()[:2]
    before = held_kl(built.model, tiny_lm.model, held)
    info = distill(built.model, tiny_lm.model, bench.windows(), held, DistillConfig(epochs=3, lr=3e-4,
                                                                                    weight_decay=0.0))
    assert info["held_kl"][0] == pytest.approx(before, rel=1e-6)
    assert info["kept_epoch"] >= 1 and info["held_kl"][info["kept_epoch"]] < 0.7 * before
    assert held_kl(built.model, tiny_lm.model, held) == pytest.approx(info["held_kl"][info["kept_epoch"]], rel=1e-5)
    # the factors and every norm are what it trains; the original's tensors (norms shared before) are as they were
    factors = sum(m.u.weight.numel() + m.v.weight.numel() for m in built.model.modules() if hasattr(m, "u"))
    norms = sum(p.numel() for n, p in built.model.named_parameters() if n.endswith("norm.weight"))
    assert info["trained_params"] == factors + norms
    for n, p in tiny_lm.model.named_parameters():
        assert torch.equal(p, original[n]) and p.requires_grad == flags[n], n


def test_the_norms_scope_trains_the_norms_alone(tiny_lm):
    bench, built = _built(tiny_lm)
    factors = {n: p.detach().clone() for n, p in built.model.named_parameters() if n.endswith(("u.weight", "v.weight"))}
    info = distill(built.model, tiny_lm.model, bench.windows(), bench.windows()[:2],
                   DistillConfig(epochs=2, lr=1e-2, weight_decay=0.0, scope="norms"))
    norms = [p for n, p in built.model.named_parameters() if n.endswith("norm.weight")]
    assert info["trained_params"] == sum(p.numel() for p in norms) and info["kept_epoch"] >= 1
    assert all(torch.equal(p, factors[n]) for n, p in built.model.named_parameters() if n in factors)
    assert any(not torch.equal(p, torch.ones_like(p)) for p in norms)  # the tiny model's norms start at 1
    with pytest.raises(DipSVDError, match="distill scope"):
        DistillConfig(scope="block").check()


def test_the_blocks_scope_trains_the_dense_matrices_too(tiny_lm, tiny_model_dir):
    """Scope "blocks": the factors, every norm and the matrices the allocation kept dense, each dense matrix first
    copied from the original, which stays as it was; the plan counts those copies beside scope "factors"."""
    from dipsvd_core import plan as P
    from dipsvd_core.plan.memory import _terms
    from dipsvd_core.refine.distill import _dense

    bench = Workbench(tiny_lm, "wiki", 6, 32)
    built = bench.build(Settings(method="dipsvd", ratio=0.2))  # nested keeps some matrices dense here
    original = {n: p.detach().clone() for n, p in tiny_lm.model.named_parameters()}
    theirs = {p.data_ptr() for p in tiny_lm.model.parameters()}
    dense = _dense(built.model)
    assert dense and all(m.weight.data_ptr() in theirs for m in dense)  # shared with the original before
    before = [m.weight.detach().clone() for m in dense]
    info = distill(built.model, tiny_lm.model, bench.windows(), bench.windows()[:2],
                   DistillConfig(epochs=3, lr=3e-4, weight_decay=0.0, scope="blocks"))
    factors = sum(m.u.weight.numel() + m.v.weight.numel() for m in built.model.modules() if hasattr(m, "u"))
    norms = sum(p.numel() for n, p in built.model.named_parameters() if n.endswith("norm.weight"))
    assert info["trained_params"] == factors + norms + sum(m.weight.numel() for m in dense)
    assert info["kept_epoch"] >= 1
    assert "distilled 3 epochs (every parameter of the blocks), kept" in distilled_summary(info)
    assert all(m.weight.data_ptr() not in theirs for m in dense)
    assert sum(not torch.equal(m.weight, w) for m, w in zip(dense, before)) == len(dense)
    for n, p in tiny_lm.model.named_parameters():
        assert torch.equal(p, original[n]), n
    config, _ = P.load_config(str(tiny_model_dir))
    sh = P.shapes_of(config)
    runs = {scope: P.run_of(method="svd-llm", calib_windows=8, seqlen=64, distill=DistillConfig(epochs=1, scope=scope))
            for scope in ("factors", "blocks")}
    costs = {scope: P.memory(sh, run, False, 0)["distill"].host_bytes for scope, run in runs.items()}
    t = _terms(sh, runs["blocks"], False)
    assert costs["blocks"] - costs["factors"] == t.kept * t.B > 0


def test_recomputed_activations_give_the_same_training(tiny_lm, monkeypatch):
    """Gradient checkpointing changes what autograd keeps, not what it computes: the curve matches the run that keeps
    every block's activations, every block of every step went through the checkpoint, and the blocks' own forwards
    are back afterwards."""
    from dipsvd_core.model.blocks import find_blocks
    from dipsvd_core.refine import distill as module

    bench, built = _built(tiny_lm)
    twin = copy.deepcopy(built.model)
    fit, cfg = bench.windows(), DistillConfig(epochs=2, lr=3e-4, weight_decay=0.0, held=2)
    kept = distill(built.model, tiny_lm.model, fit, fit[:2], cfg)
    calls = []
    monkeypatch.setattr(module, "checkpoint", lambda *a, **k: calls.append(1) or torch.utils.checkpoint.checkpoint(
        *a, **k))
    recomputed = distill(twin, tiny_lm.model, fit, fit[:2], dataclasses.replace(cfg, recompute=True))
    assert recomputed["held_kl"] == pytest.approx(kept["held_kl"], rel=1e-4)
    assert recomputed["held_kl"][-1] < 0.9 * recomputed["held_kl"][0]
    assert len(calls) == 2 * len(fit) * len(find_blocks(twin)[1])
    assert all("forward" not in block.__dict__ for block in find_blocks(twin)[1])


def test_an_epoch_that_does_not_help_is_not_kept(tiny_lm):
    """A learning rate far too high makes every epoch worse on the held-out windows: the build is kept as it was."""
    bench, built = _built(tiny_lm)
    held = bench.heldout(2)
    logits = built.model(held[:1]).logits.detach().clone()
    info = distill(built.model, tiny_lm.model, bench.windows(), held, DistillConfig(epochs=2, lr=5.0, warmup=0.0))
    assert info["kept_epoch"] == 0 and min(info["held_kl"][1:]) > info["held_kl"][0]
    assert "none lowered the held-out KL" in distilled_summary(info)
    assert torch.allclose(built.model(held[:1]).logits, logits, atol=1e-5)


def test_sixteen_bit_weights_train_float32_masters(tiny_lm):
    """bfloat16 factors step in float32 (a bfloat16 AdamW loses updates below its 8 bits of mantissa): the weights
    change and stay bfloat16."""
    bench, built = _built(tiny_lm)
    # copies: a cast of the built model would cast the tensors it shares with the session's original
    model = copy.deepcopy(built.model).to(torch.bfloat16)
    teacher = copy.deepcopy(tiny_lm.model).to(torch.bfloat16)
    first = next(m for m in model.modules() if hasattr(m, "u"))
    u0 = first.u.weight.detach().clone()
    info = distill(model, teacher, bench.windows(), bench.heldout(2), DistillConfig(epochs=1, lr=1e-3, held=2))
    assert first.u.weight.dtype == torch.bfloat16
    if info["kept_epoch"] == 1:
        assert not torch.equal(first.u.weight, u0)
    assert all(math.isfinite(k) for k in info["held_kl"])


def test_workbench_build_distills_and_refuses_what_it_cannot(tiny_lm):
    bench = Workbench(tiny_lm, "wiki", 6, 32)
    plain = bench.build(Settings(method="svd-llm", ratio=0.4))
    distilled = bench.build(Settings(method="svd-llm", ratio=0.4, distill=DistillConfig(epochs=2, lr=3e-3, held=2)))
    assert distilled.info["distill"]["epochs"] == 2 and "distill" in distilled.timings_s and "distill" not in plain.info
    held = bench.heldout(2)
    assert held_kl(distilled.model, tiny_lm.model, held) <= held_kl(plain.model, tiny_lm.model, held) + 1e-6
    with pytest.raises(DipSVDError, match="teacher"):
        bench.build(Settings(method="svd-llm", ratio=0.4, distill=DistillConfig(epochs=1)), inplace=True)
    with pytest.raises(DipSVDError, match="epochs >= 0"):
        Settings(distill=DistillConfig(epochs=-1)).check()


def test_the_model_s_own_text_is_trained_on_beside_the_calibration(tiny_lm, monkeypatch):
    """--distill-own-text N: the fit windows are the calibration windows and N windows the original writes (timed as
    writing, after the build); the held-out windows are the same calibration windows as without it."""
    from dipsvd_core.engine import self_text

    monkeypatch.setattr(self_text, "NEW_TOKENS", 24)
    bench = Workbench(tiny_lm, "wiki", 6, 32)
    cfg = DistillConfig(epochs=1, lr=3e-3, held=2, own_text=3)
    built = bench.build(Settings(method="svd-llm", ratio=0.4, distill=cfg))
    info = built.info["distill"]
    assert info["fit_windows"] == 9 and info["own_text"] == 3 and info["held_windows"] == 2
    assert built.timings_s["writing"] > 0 and "writing" in bench.memory.phases
    assert "on 9 windows, 3 of them the model's own text" in distilled_summary(info)
    with pytest.raises(DipSVDError, match="own text >= 0"):
        Settings(distill=DistillConfig(epochs=1, own_text=-1)).check()


def test_an_offloaded_model_is_refused_before_any_pass(tiny_model_dir):
    from dipsvd_core.plan import Placement
    from dipsvd_core.run.loading import load_model

    lm = load_model(tiny_model_dir, "cpu", "float32", offload=True, blocks=Placement(1, 0, 1, gpu=False))
    bench = Workbench(lm, "wiki", 4, 32)
    with pytest.raises(DipSVDError, match="offloaded: use --distill-epochs 0"):
        bench.build(Settings(method="svd-llm", ratio=0.4, distill=DistillConfig(epochs=1)))
    assert not bench.data.has_stats  # refused before the statistics pass


def test_the_plan_counts_distillation(tiny_model_dir):
    """Its phase is needed only where its epochs are set, keeps the original beside the copy, holds more than the
    surgery before it, and takes (epochs x windows x 4 + (epochs + 1) x held x 2) whole-model forwards."""
    from dipsvd_core import plan as P

    config, _ = P.load_config(str(tiny_model_dir))
    sh = P.shapes_of(config)
    off = P.run_of(method="svd-llm", calib_windows=8, seqlen=64)
    on = P.run_of(method="svd-llm", calib_windows=8, seqlen=64, distill=DistillConfig(epochs=4, held=2))
    assert "distill" not in off.phases and "distill" in on.phases
    assert on.inplace is False and off.inplace is True  # the original stays as the teacher
    phases = P.memory(sh, on, False, 0)
    assert phases["distill"].host_bytes > phases["surgery"].host_bytes
    block_s, matmul = 0.5, 1e9
    P.timing(phases, sh, on, P.Rates(1.0, block_s, 1.0, 1.0, matmul, 1e9))
    forward = sh.n_blocks * block_s + 2 * 64 * sh.hidden * sh.vocab / matmul
    assert phases["distill"].seconds == pytest.approx((4 * 8 * 4 + 5 * 2 * 2) * forward)
    # recompute: every block's input and one block's autograd kept instead of every block's; one more forward
    from dipsvd_core.plan.memory import _terms

    recomputing = P.run_of(method="svd-llm", calib_windows=8, seqlen=64,
                           distill=DistillConfig(epochs=4, held=2, recompute=True))
    again = P.memory(sh, recomputing, False, 0)
    t = _terms(sh, on, False)
    saved = t.L * 64 * t.H * t.B + t.layer_saved
    assert phases["distill"].host_bytes - again["distill"].host_bytes == t.L * t.layer_saved - saved > 0
    P.timing(again, sh, recomputing, P.Rates(1.0, block_s, 1.0, 1.0, matmul, 1e9))
    assert again["distill"].seconds == pytest.approx((4 * 8 * 5 + 5 * 2 * 2) * forward)
    # the model's own text: 3 more fit windows each epoch, and a writing phase (none without it on wiki)
    own = P.run_of(method="svd-llm", calib_windows=8, seqlen=64, distill=DistillConfig(epochs=4, held=2, own_text=3))
    assert "writing" in own.phases and "writing" not in on.phases and own.own_text == 3
    timed = P.memory(sh, own, False, 0)
    P.timing(timed, sh, own, P.Rates(1.0, block_s, 1.0, 1.0, matmul, 1e9))
    assert timed["distill"].seconds == pytest.approx((4 * 11 * 4 + 5 * 2 * 2) * forward)
    assert timed["writing"].seconds > 0
    undistilled = P.run_of(method="svd-llm", calib_windows=8, seqlen=64, distill=DistillConfig(epochs=0, own_text=3))
    assert "writing" not in undistilled.phases and undistilled.own_text == 0


def test_compress_distills_from_the_command_line(tiny_model_dir, tmp_path):
    report = tmp_path / "r.json"
    out = subprocess.run([sys.executable, "-m", "dipsvd_core", "compress", "--model", str(tiny_model_dir),
                          "--method", "svd-llm", "--ratio", "0.4", "--calib-windows", "4", "--seqlen", "32",
                          "--eval-tokens", "256", "--distill-epochs", "1", "--distill-held", "2", "--report",
                          str(report)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(report.read_text())
    assert r["distill"]["epochs"] == 1 and len(r["distill"]["held_kl"]) == 2 and "distill" in r["timings_s"]
    assert "distill: distilled 1 epoch (the factors and norms), " in out.stdout
