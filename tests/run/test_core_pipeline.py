"""The flow on a tiny random Llama: targets, statistics, surgery, save/load, perplexity, data."""
import json
import math
import os

import pytest
import torch

from dipsvd_core.allocation.budget import param_report
from dipsvd_core.common.errors import DipSVDError
from dipsvd_core.engine.data import _chunks, calibration_windows, evaluation_windows, load_documents
from dipsvd_core.engine.evaluate import generate, perplexity, speed
from dipsvd_core.engine.stats import stream_stats
from dipsvd_core.io.compressed import load_compressed, save_compressed
from dipsvd_core.lowrank.factors import FactorStore, factor_matrix
from dipsvd_core.lowrank.scalings import ChannelOptions
from dipsvd_core.lowrank.surgery import LowRankLinear, module_ranks
from dipsvd_core.model.blocks import find_targets
from dipsvd_core.model.models import count_params
from dipsvd_core.run.loading import load_model
from dipsvd_core.run.pipeline import Settings, Workbench


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


def test_bad_model_specs_give_clear_errors(tmp_path, capfd):
    with pytest.raises(DipSVDError, match="model path not found"):
        load_model("./no/such/model")
    with pytest.raises(DipSVDError, match="GGUF file not found"):
        load_model(str(tmp_path / "x.gguf"))
    with pytest.raises(DipSVDError, match="not a model folder"):
        load_model(str(tmp_path))
    with pytest.raises(DipSVDError, match="could not load 'someone/not-a-real-model-xyz' from the Hugging Face hub"):
        load_model("someone/not-a-real-model-xyz")
    # offline (this machine), nothing waits out the hub client's retries: not even transformers' look for an adapter
    assert "Retrying" not in capfd.readouterr().err


def direct_inputs(model, name: str, windows) -> torch.Tensor:
    """The input rows of one Linear over all windows, captured in a plain whole-model forward (float64)."""
    xs = []
    mod = model.get_submodule(name)
    h = mod.register_forward_pre_hook(lambda m, a: xs.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for w in windows:
            model(w[None])
    h.remove()
    return torch.cat(xs).double()


def test_streamed_statistics_share_grams_and_match_a_whole_model_pass(tiny_lm, bench):
    """Block by block (stream.py) gives the Grams, alpha, mean |x| and output spectra that hooks on a
    whole-model forward give."""
    windows = bench.windows()
    grams, blocks_seen = {}, []

    def on_block(b, st):
        blocks_seen.append(b)
        grams.update({n: g.clone() for n, g in st.grams.items()})

    st = stream_stats(tiny_lm.model, [t.name for t in tiny_lm.targets], windows, on_block)
    g = st.group_of
    assert g["model.layers.0.self_attn.k_proj"] == g["model.layers.0.self_attn.v_proj"] == \
        "model.layers.0.self_attn.q_proj"
    assert g["model.layers.1.mlp.up_proj"] == "model.layers.1.mlp.gate_proj"
    assert g["model.layers.1.mlp.down_proj"] == "model.layers.1.mlp.down_proj"
    assert blocks_seen == [0, 1] and len(grams) == len(st.alphas) == 2 * 4 and st.n_tokens == 4 * 64
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        X = direct_inputs(tiny_lm.model, name, windows)
        assert torch.allclose(grams[name], X.T @ X, rtol=1e-5, atol=1e-5)
        assert torch.allclose(st.alpha(name), torch.linalg.vector_norm(X.T @ X, dim=0), rtol=1e-5)
        assert torch.allclose(st.abs_mean(name), X.abs().mean(0), rtol=1e-5)
    # Block 0's output is block 1's input; its Gram's eigenvalues are block 0's spectrum.
    outs = []
    blk = tiny_lm.model.model.layers[0]
    hook = blk.register_forward_hook(lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o).reshape(-1, 64)))
    with torch.no_grad():
        for w in windows:
            tiny_lm.model(w[None])
    hook.remove()
    H = torch.cat(outs).double()
    assert len(st.block_spectra) == 2 and st.block_spectra[0].shape == (64,)
    assert torch.allclose(st.block_spectra[0], torch.linalg.eigvalsh(H.T @ H), rtol=1e-5, atol=1e-4)


def test_a_factor_slice_read_from_disk_equals_the_in_memory_slice(tiny_lm, bench, tmp_path):
    """FactorStore: rank-k reads through safetensors get_slice are the first k rows, nothing else."""
    W = tiny_lm.model.get_submodule("model.layers.0.mlp.down_proj").weight
    f = factor_matrix(W, torch.eye(128, dtype=torch.float64), torch.eye(128, dtype=torch.float64))
    store = FactorStore(tmp_path / "factors")
    store.start()
    disk = store.write_block(0, {"m": f})["m"]
    store.finish({"m": 0}, {"m": disk}, {})
    loaded = store.load()["m"]
    assert loaded.file is not None and torch.equal(loaded.sigma, f.sigma)
    for k in (1, 17, 64):
        u, v = loaded.low_rank(k)
        u0, v0 = f.low_rank(k)
        assert torch.equal(u, u0) and torch.equal(v, v0) and u.is_contiguous()
        # the copies hold their k rows and nothing of the rest of the file
        assert (u.untyped_storage().nbytes(), v.untyped_storage().nbytes()) == (k * 64 * 4, k * 128 * 4)
    assert torch.equal(loaded.us, f.us) and torch.equal(loaded.vs, f.vs)
    (tmp_path / "factors" / "meta.json").write_text("{")  # a torn folder is not trusted
    assert store.load() is None


def test_nan_activations_are_a_clear_error(tiny_model_dir):
    lm = load_model(tiny_model_dir)
    with torch.no_grad():
        lm.model.model.layers[0].input_layernorm.weight[0] = float("nan")
    with pytest.raises(DipSVDError, match="NaN"):
        stream_stats(lm.model, [t.name for t in lm.targets], torch.randint(0, 100, (2, 16)))
    with pytest.raises(DipSVDError, match="not finite"):
        perplexity(lm.model, torch.randint(0, 100, (1, 16)))


@pytest.mark.parametrize("method,form", [("svd", "code"), ("svd-llm", "code"), ("dipsvd", "paper"),
                                         ("dipsvd", "code")])
def test_compression_end_to_end(tiny_lm, bench, method, form):
    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    res = bench.build(Settings(method=method, allocation="uniform", refine="none", ratio=0.3,
                                 dipsvd=ChannelOptions(whitening=form)))
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
    from devkit.models import make_tiny_llama

    lm = load_model(make_tiny_llama(tmp_path / "biased", seed=1, bias=True))
    wb = Workbench(lm, "wiki", 2, 64)
    factors = wb.factors(Settings(method="svd-llm").spec)
    from dipsvd_core.lowrank.surgery import compress_model, low_rank_weights

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
    assert 0 < out[0]["distinct_3"] <= 1 and out[0]["longest_repeat"] >= 0
    sp = speed(tiny_lm.model, seqlen=32, new_tokens=4, repeats=1)
    assert sp["prefill_tok_s"] > 0 and sp["decode_tok_s"] > 0


def test_repetition_counts_distinct_trigrams_and_the_longest_repeated_span():
    from dipsvd_core.engine.evaluate import repetition

    looped = repetition("The universe is the universe's universe. The universe is the universe's universe's universe.")
    # 21 words (a quote mark and a full stop are words each), 19 trigrams of which 10 are distinct; "the universe
    # is the universe ' s universe", 8 words, occurs twice
    assert looped == {"distinct_3": pytest.approx(10 / 19), "longest_repeat": 8}
    assert repetition("One two three four.") == {"distinct_3": 1.0, "longest_repeat": 0}
    assert repetition("a a a a") == {"distinct_3": 0.5, "longest_repeat": 3}  # overlapping repeats count
    assert repetition("Yes") == {"distinct_3": 1.0, "longest_repeat": 0}
    assert repetition("X y z, x Y Z!") == {"distinct_3": 5 / 6, "longest_repeat": 3}  # case is ignored


def test_text_sources(tiny_lm, tmp_path, monkeypatch):
    calib, ev = load_documents("wiki", "calib"), load_documents("wiki", "eval")
    assert len(calib) >= 40 and len(ev) >= 40 and not set(calib) & set(ev)
    assert "Anarchism" in calib[0][:200] and "'''" not in calib[0]
    news, news_calib = load_documents("news"), load_documents("news", "calib")
    assert len(news) == len(news_calib) == 150 and "bushfire" in news[0] and not set(news) & set(news_calib)
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


def storage_bytes(*models) -> int:
    """Bytes of the distinct tensor storages of these models together."""
    seen = {}
    for m in models:
        for t in [*m.parameters(), *m.buffers()]:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def test_compressed_model_shares_what_it_does_not_change(tiny_lm, bench):
    """Embeddings, norms, lm_head, biases and dense-kept matrices are the original's tensors; original
    plus compressed in memory is the original plus the kept factors."""
    from dipsvd_core.lowrank.surgery import compress_model, low_rank_weights

    factors = bench.factors(Settings(method="svd-llm").spec)
    ranks = {t.name: (None if t.block == 1 else 8) for t in tiny_lm.targets}  # block 1 stays dense
    model = compress_model(tiny_lm.model, low_rank_weights(factors, ranks))
    orig = dict(tiny_lm.model.named_parameters())
    new = dict(model.named_parameters())
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight",
                 "model.layers.1.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight"):
        assert new[name].data_ptr() == orig[name].data_ptr(), name
    assert model.lm_head.weight.data_ptr() == tiny_lm.model.lm_head.weight.data_ptr()
    assert isinstance(model.get_submodule("model.layers.0.mlp.up_proj"), LowRankLinear)
    kept = sum(m.u.weight.numel() + m.v.weight.numel() for m in model.modules() if isinstance(m, LowRankLinear))
    assert storage_bytes(tiny_lm.model, model) == storage_bytes(tiny_lm.model) + 4 * kept


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_pass_matches_the_cpu_pass(tiny_model_dir, tmp_path, monkeypatch):
    """The same streaming pass with the model on CUDA: Grams, whitening and SVD on the GPU (TF32 off)."""
    spec = Settings(method="dipsvd", dipsvd=ChannelOptions(whitening="paper")).spec
    out = {}
    for device in ("cpu", "cuda"):
        monkeypatch.setenv("DIPSVD_STUDIO_CACHE", str(tmp_path / device))  # its own cache: the pass really runs
        lm = load_model(tiny_model_dir, device=device, dtype="float32")
        out[device] = Workbench(lm, "wiki", 4, 64).factors(spec)
    for name, f in out["cpu"].items():
        g = out["cuda"][name]
        assert torch.allclose(g.sigma, f.sigma, rtol=1e-4, atol=1e-6 * f.sigma[0].item()), name


def test_prefactor_gives_several_gram_methods_from_one_pass(tiny_lm, monkeypatch):
    """A sweep over svd-llm and dipsvd runs ONE streaming pass for both (and its statistics), and each
    method's factors equal those of its own pass."""
    from dipsvd_core.run import factor_cache
    from dipsvd_core.run.pipeline import Settings, Workbench

    calls = []
    real = factor_cache.stream_stats
    monkeypatch.setattr(factor_cache, "stream_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    both = Workbench(tiny_lm, "wiki", 3, 48, seed=5)
    specs = [Settings(method="svd-llm").spec, Settings(method="dipsvd").spec]
    both.factor_cache.prefactor(specs)
    assert len(calls) == 1 and both.data.has_stats
    import shutil

    spec = specs[1]  # dipsvd: remove what the joint pass stored, and factor it in a pass of its own
    mine = {n: (f.sigma.clone(), f.low_rank(4)[0]) for n, f in both.factors(spec).items()}
    shutil.rmtree(both.factor_cache._store(spec).folder)
    alone = Workbench(tiny_lm, "wiki", 3, 48, seed=5).factors(spec)
    assert len(calls) == 2
    for name, (sigma, u) in mine.items():
        torch.testing.assert_close(alone[name].sigma, sigma)
        torch.testing.assert_close(alone[name].low_rank(4)[0], u)


def test_wiki_chat_frames_every_other_passage_as_a_chat_turn(tiny_lm, monkeypatch):
    """The default calibration: wiki's calibration articles in prose passages, the 1st, 3rd, ... of each article
    framed by the chat template as the answer to a question about the article's subject, the others plain; the
    template's markers become its special tokens; without a chat template every passage is plain."""
    from dipsvd_core.engine import data

    tok = tiny_lm.tokenizer
    docs = data.chat_documents(tok, "calib")
    ask = tok.apply_chat_template([{"role": "user", "content": "Tell me about Anarchism."}], tokenize=False)
    assert docs[0].startswith(ask) and "Anarchism is a political philosophy" in docs[0]
    assert "Tell me about" not in docs[1] and "<|im_start|>" not in docs[1]
    assert all(len(p) > data.CHAT_PARAGRAPH for p in docs[1].split("\n"))  # prose paragraphs only
    assert len(docs[1]) >= data.CHAT_PASSAGE
    framed = sum(d.startswith("<|im_start|>") for d in docs)
    assert 0.45 < framed / len(docs) < 0.6  # every other passage, the first of each article among them
    assert data.article_subject("Abraham Lincoln (; February 12, 1809 ...") == "Abraham Lincoln"
    assert data.article_subject("(no subject here)") == "this topic"
    windows = calibration_windows(tok, data.CHAT, 8, 64)
    assert data.DEFAULT_CALIB == data.MIX and data.CHAT in data.SOURCES
    start = tok.convert_tokens_to_ids("<|im_start|>")
    chat_stream = data.token_stream(tok, data.CHAT, "calib")
    assert (chat_stream == start).sum() == 3 * framed  # system, user, assistant: one special token each
    assert windows.shape == (8, 64)
    monkeypatch.setattr(tok, "chat_template", None)
    plain = data.chat_documents(tok, "calib")
    assert len(plain) == len(docs) and not any("<|im_start|>" in d for d in plain)
