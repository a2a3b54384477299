"""The flow on a tiny random Llama: targets, statistics, surgery, save/load, perplexity, data."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from dipsvd_core.compressed import load_compressed, save_compressed
from dipsvd_core.data import _chunks, calibration_windows, evaluation_windows, load_documents
from dipsvd_core.errors import DipSVDError
from dipsvd_core.evaluate import generate, param_report, perplexity, speed
from dipsvd_core.models import count_params, find_targets, load_model
from dipsvd_core.pipeline import Settings, Workbench
from dipsvd_core.stats import collect_stats
from dipsvd_core.surgery import LowRankLinear, module_ranks


@pytest.fixture(scope="module")
def bench(tiny_lm):
    return Workbench(tiny_lm, "wiki", calib_windows=4, seqlen=64, seed=0)


def test_targets_are_every_block_linear(tiny_lm):
    names = [t.name for t in tiny_lm.targets]
    assert len(names) == 2 * 7
    assert "model.layers.0.self_attn.q_proj" in names and "model.layers.1.mlp.down_proj" in names
    assert not any("lm_head" in n or "embed" in n for n in names)
    k = next(t for t in tiny_lm.targets if t.name.endswith("layers.0.self_attn.k_proj"))
    assert (k.out_features, k.in_features, k.block) == (32, 64, 0)


def test_unsupported_architecture_is_named(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(DipSVDError, match="unsupported architecture GPT2LMHeadModel.*Conv1D"):
        find_targets(model)


def test_bad_model_specs_give_clear_errors(tmp_path):
    with pytest.raises(DipSVDError, match="model path not found"):
        load_model("./no/such/model")
    with pytest.raises(DipSVDError, match="GGUF file not found"):
        load_model(str(tmp_path / "x.gguf"))
    with pytest.raises(DipSVDError, match="not a model folder"):
        load_model(str(tmp_path))
    with pytest.raises(DipSVDError, match="could not load 'someone/not-a-real-model-xyz' from the Hugging Face hub"):
        load_model("someone/not-a-real-model-xyz")


def test_statistics_share_grams_and_match_a_direct_computation(tiny_lm, bench):
    windows = bench.windows()
    st = collect_stats(tiny_lm.model, [t.name for t in tiny_lm.targets], windows)
    g = st.group_of
    assert g["model.layers.0.self_attn.k_proj"] == g["model.layers.0.self_attn.v_proj"] == \
        "model.layers.0.self_attn.q_proj"
    assert g["model.layers.1.mlp.up_proj"] == "model.layers.1.mlp.gate_proj"
    assert g["model.layers.1.mlp.down_proj"] == "model.layers.1.mlp.down_proj"
    assert len(st.grams) == 2 * 4 and st.n_tokens == 4 * 64
    # Direct: capture the down_proj input of block 1 and form X^T X in float64.
    xs = []
    mod = tiny_lm.model.get_submodule("model.layers.1.mlp.down_proj")
    h = mod.register_forward_pre_hook(lambda m, a: xs.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for w in windows:
            tiny_lm.model(w[None])
    h.remove()
    X = torch.cat(xs).double()
    assert torch.allclose(st.gram("model.layers.1.mlp.down_proj"), X.T @ X, rtol=1e-5, atol=1e-5)
    assert torch.allclose(st.abs_mean("model.layers.1.mlp.down_proj"), X.abs().mean(0), rtol=1e-5)
    assert len(st.block_grams) == 2 and st.block_grams[0].shape == (64, 64)


def test_nan_activations_are_a_clear_error(tiny_model_dir):
    lm = load_model(tiny_model_dir)
    with torch.no_grad():
        lm.model.model.layers[0].input_layernorm.weight[0] = float("nan")
    with pytest.raises(DipSVDError, match="NaN"):
        collect_stats(lm.model, [t.name for t in lm.targets], torch.randint(0, 100, (2, 16)))
    with pytest.raises(DipSVDError, match="not finite"):
        perplexity(lm.model, torch.randint(0, 100, (1, 16)))


@pytest.mark.parametrize("method,form", [("svd", "code"), ("svd-llm", "code"), ("dipsvd", "paper"),
                                         ("dipsvd", "code")])
def test_compression_end_to_end(tiny_lm, bench, method, form):
    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    res = bench.build(Settings(method=method, ratio=0.3, whitening=form))
    assert abs(res.allocation.ratio_realized - 0.3) <= 0.005
    ranks = module_ranks(res.model)
    assert len(ranks) == 14 and ranks == {n: k for n, k in res.allocation.ranks.items()}
    for k, v in tiny_lm.model.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k]), k
    params = param_report(tiny_lm.model, res.model, tiny_lm.targets, res.allocation.ranks)
    assert params["targeted_after"] == sum(m.u.weight.numel() + m.v.weight.numel()
                                           for m in res.model.modules() if isinstance(m, LowRankLinear))
    assert params["total_before"] - params["total_after"] == params["targeted_before"] - params["targeted_after"]
    ev = bench.eval_windows("wiki", max_tokens=256)
    assert math.isfinite(perplexity(res.model, ev))


def test_compressed_weights_are_the_truncated_factors(tiny_lm, bench):
    res = bench.build(Settings(method="svd", ratio=0.5))
    W = tiny_lm.model.get_submodule("model.layers.0.mlp.gate_proj").weight.detach().double()
    m = res.model.get_submodule("model.layers.0.mlp.gate_proj")
    U, s, Vt = torch.linalg.svd(W, full_matrices=False)
    k = m.rank
    best = (U[:, :k] * s[:k]) @ Vt[:k]
    assert torch.allclose(m.u.weight.double() @ m.v.weight.double(), best, atol=1e-5)


def test_full_rank_low_rank_linear_keeps_bias_and_output(tmp_path):
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import make_tiny_llama

    lm = load_model(make_tiny_llama(tmp_path / "biased", seed=1, bias=True))
    wb = Workbench(lm, "wiki", 2, 64)
    factors = wb.factors(Settings(method="svd-llm").spec)
    from dipsvd_core.surgery import compress_model, low_rank_weights

    full = {t.name: min(t.out_features, t.in_features) for t in lm.targets}
    model = compress_model(lm.model, low_rank_weights(factors, full))
    name = "model.layers.0.self_attn.q_proj"
    assert torch.equal(model.get_submodule(name).u.bias, lm.model.get_submodule(name).bias)
    x = wb.windows()[:1]
    with torch.no_grad():
        assert torch.allclose(model(x).logits, lm.model(x).logits, atol=2e-3, rtol=1e-3)


def test_save_load_round_trip_gives_identical_logits(tiny_lm, bench, tmp_path):
    res = bench.build(Settings(method="dipsvd", ratio=0.25))
    out = save_compressed(res.model, tmp_path / "c", tiny_lm.tokenizer, {"method": "dipsvd"})
    files = sorted(os.listdir(out))
    assert "model.safetensors" in files and "config.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    entry = json.loads((out / "config.json").read_text())["dipsvd_compression"]
    assert entry["method"] == "dipsvd" and entry["ranks"] == module_ranks(res.model)
    lm2 = load_compressed(out)
    x = bench.windows()[:2]
    with torch.no_grad():
        assert torch.equal(lm2.model(x).logits, res.model(x).logits)
    assert count_params(lm2.model) == count_params(res.model)
    assert load_model(str(out)).model.config.dipsvd_compression["ranks"] == entry["ranks"]  # via load_model too
    assert not hasattr(res.model.config, "dipsvd_compression")  # saving left the model as it was


def test_save_refuses_to_overwrite(tiny_lm, bench, tmp_path):
    res = bench.build(Settings(method="svd", ratio=0.5))
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(DipSVDError, match="already exists"):
        save_compressed(res.model, target, tiny_lm.tokenizer)
    assert (target / "notes.txt").read_text() == "keep me"
    save_compressed(res.model, target, tiny_lm.tokenizer, force=True)
    assert not (target / "notes.txt").exists() and (target / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # no temporary folders left behind


def test_perplexity_matches_the_models_own_loss(tiny_lm, bench):
    ev = bench.eval_windows("wiki", max_tokens=192)
    assert ev.shape == (3, 64)
    with torch.no_grad():
        losses = [tiny_lm.model(w[None], labels=w[None]).loss.item() for w in ev]
    assert perplexity(tiny_lm.model, ev) == pytest.approx(math.exp(sum(losses) / 3), rel=1e-5)


def test_generation_and_speed(tiny_lm):
    out = generate(tiny_lm.model, tiny_lm.tokenizer, ["Hello there"], max_new_tokens=5)
    assert out[0]["new_tokens"] == 5 and out[0]["tokens_per_s"] > 0
    sp = speed(tiny_lm.model, seqlen=32, new_tokens=4, repeats=1)
    assert sp["prefill_tok_s"] > 0 and sp["decode_tok_s"] > 0


def test_text_sources(tiny_lm, tmp_path, monkeypatch):
    calib, ev = load_documents("wiki", "calib"), load_documents("wiki", "eval")
    assert len(calib) >= 40 and len(ev) >= 40 and not set(calib) & set(ev)
    assert "Anarchism" in calib[0][:200] and "'''" not in calib[0]
    news = load_documents("news")
    assert len(news) > 250 and "bushfire" in news[0]
    tok = tiny_lm.tokenizer
    a = calibration_windows(tok, "wiki", 8, 64, seed=1)
    assert torch.equal(a, calibration_windows(tok, "wiki", 8, 64, seed=1))
    assert not torch.equal(a, calibration_windows(tok, "wiki", 8, 64, seed=2))
    assert len({tuple(w.tolist()) for w in a}) == 8
    with pytest.raises(DipSVDError, match="too short"):
        calibration_windows(tok, "wiki", 10**6, 512)
    (tmp_path / "t.txt").write_text("one doc here.\n\nanother doc there.")
    assert load_documents(str(tmp_path / "t.txt")) == ["one doc here.", "another doc there."]
    (tmp_path / "t.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    assert load_documents(str(tmp_path / "t.jsonl")) == ["a", "b"]
    (tmp_path / "bad.jsonl").write_text('{"txt": "a"}\n')
    with pytest.raises(DipSVDError, match="line 1 has no string field 'text'"):
        load_documents(str(tmp_path / "bad.jsonl"))
    with pytest.raises(DipSVDError, match="too short"):
        calibration_windows(tok, str(tmp_path / "t.txt"), 4, 64)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DipSVDError, match="wikitext2.*offline"):
        load_documents("wikitext2", "eval")
    with pytest.raises(DipSVDError, match="unknown text source"):
        load_documents("nope")


def test_windows_start_with_bos_when_the_tokenizer_adds_one():
    stream = torch.arange(100, 120)
    w = _chunks(stream, 5, bos=7)
    assert w.shape == (5, 5) and (w[:, 0] == 7).all() and w[0, 1:].tolist() == [100, 101, 102, 103]
    assert _chunks(stream, 5, bos=None).shape == (4, 5)


def test_eval_windows_do_not_overlap(tiny_lm):
    ev = evaluation_windows(tiny_lm.tokenizer, "news", 32, max_tokens=320)
    assert ev.shape == (10, 32)
    assert torch.equal(ev[1, :5], evaluation_windows(tiny_lm.tokenizer, "news", 32)[1, :5])
