"""The text sources beyond wiki: the calibration mix, the news split, and the evaluation panel."""
import shutil

import pytest
import torch

from dipsvd_core.common.errors import DipSVDError
from dipsvd_core.engine import data
from dipsvd_core.refine.sequential import held_windows


def test_mix_plan_apportions_the_held_out_windows_and_the_others_alike():
    plan = data.mix_plan(32, {"wiki-chat": 2, "wiki": 1, "news": 1})
    assert [plan.count(s) for s in ("wiki-chat", "wiki", "news")] == [16, 8, 8]
    held = [plan[i] for i in sorted(held_windows(32))]
    assert sorted(held) == ["news", "news", "wiki", "wiki", "wiki-chat", "wiki-chat", "wiki-chat", "wiki-chat"]
    fit = [plan[i] for i in range(32) if i not in held_windows(32)]
    assert [fit.count(s) for s in ("wiki-chat", "wiki", "news")] == [12, 6, 6]
    assert plan[:4] == ["wiki-chat", "wiki", "news", "wiki-chat"]  # interleaved, not in runs
    assert data._apportion(5, {"a": 1, "b": 1, "c": 1}) == {"a": 2, "b": 2, "c": 1}
    assert data._apportion(7, {"a": 3, "b": 1}) == {"a": 5, "b": 2}


def test_mix_shares_parse_and_refuse():
    assert data.mix_shares("wiki") is None
    assert data.mix_shares("mix") == {"wiki-chat": 2, "wiki": 1, "news": 1}
    assert data.mix_shares("mix:wiki=3,news") == {"wiki": 3.0, "news": 1.0}
    for bad in ("mix:wiki=0", "mix:nope=1", "mix:mix=1", "mix:wiki=x", "mix:kjv=1"):
        with pytest.raises(DipSVDError, match="SOURCE=SHARE"):
            data.mix_shares(bad)


def test_mixed_windows_are_each_sources_own(tiny_lm):
    tok = tiny_lm.tokenizer
    mixed = data.calibration_windows(tok, "mix:wiki=1,news=1", 8, 64)
    plan = data.mix_plan(8, {"wiki": 1, "news": 1})
    wiki = data.calibration_windows(tok, "wiki", plan.count("wiki"), 64)
    news = data.calibration_windows(tok, "news", plan.count("news"), 64)
    assert torch.equal(mixed[[i for i, s in enumerate(plan) if s == "wiki"]], wiki)
    assert torch.equal(mixed[[i for i, s in enumerate(plan) if s == "news"]], news)
    held = data.heldout_windows(tok, "mix:wiki=1,news=1", 4, 64, skip=8)
    assert held.shape == (4, 64) and not {tuple(w.tolist()) for w in held} & {tuple(w.tolist()) for w in mixed}
    plan4 = data.mix_plan(4, {"wiki": 1, "news": 1})
    assert torch.equal(held[[i for i, s in enumerate(plan4) if s == "wiki"]],
                       data.heldout_windows(tok, "wiki", plan4.count("wiki"), 64, skip=plan.count("wiki")))
    with pytest.raises(DipSVDError, match="calibration mix"):
        data.evaluation_windows(tok, "mix", 64)


def test_news_calibration_never_reads_the_evaluated_stories(tiny_lm):
    tok = tiny_lm.tokenizer
    ev = data.evaluation_windows(tok, "news", 64)
    cal = data.calibration_windows(tok, "news", 16, 64)
    assert not {tuple(w.tolist()) for w in cal} & {tuple(w.tolist()) for w in ev}
    evaluated = set(data.load_documents("news", "eval"))
    assert not evaluated & set(data.load_documents("news", "calib"))


def test_panel_texts(monkeypatch):
    docs = data.load_documents("python-docs", "eval")
    assert len(docs) >= 30 and any("assert" in d for d in docs)
    assert not set(docs) & set(data.load_documents("python-docs", "calib"))
    if shutil.which("bible"):
        kjv = data.load_documents("kjv", "eval")
        assert kjv[0].startswith("In the beginning God created the heaven and the earth.") and len(kjv) > 80
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(DipSVDError, match="apt-get install bible-kjv"):
        data.load_documents("kjv", "eval")
    monkeypatch.setattr(data, "FORTUNES", data.Path("/nonexistent"))
    with pytest.raises(DipSVDError, match="apt-get install fortunes"):
        data.load_documents("fortunes", "eval")


def test_self_text_is_the_models_own_seeded_and_extended_in_place(tiny_lm, monkeypatch):
    """`self`: documents the model writes from calibration-half prompts; the same seed gives the same stream, a
    longer request extends it (the cached prefix kept), the held-out windows follow the calibration ones, and a mix
    reads it through the writer."""
    from dipsvd_core.engine import self_text
    from dipsvd_core.run.calibration import Calibration

    monkeypatch.setattr(self_text, "NEW_TOKENS", 24)
    monkeypatch.setattr(self_text, "BATCH", 8)  # the logic at a quarter of the product's group: a quarter of the time
    tok = tiny_lm.tokenizer
    asked = self_text.prompts(tok, 0)
    assert len(asked) == self_text.BATCH and tok.decode(asked[0]).count("Tell me about") == 1
    assert tok.decode(asked[1]).split() == data.load_documents("news", "calib")[0].split()[: self_text.PROMPT_WORDS]
    docs = self_text.write_group(tiny_lm.model, tok, 0, seed=0)
    assert [d[: len(p)] for d, p in zip(docs, asked)] == asked  # each document is its prompt and what followed
    assert all(len(asked[i]) < len(d) <= len(asked[i]) + 24 for i, d in enumerate(docs))
    assert docs == self_text.write_group(tiny_lm.model, tok, 0, seed=0)
    assert docs != self_text.write_group(tiny_lm.model, tok, 0, seed=1)
    own = self_text.write_group(tiny_lm.model, tok, 0, seed=0, purpose=self_text.DISTILL_TEXT)  # distillation's text
    assert [d[: len(q)] for d, q in zip(own, asked)] == asked and own != docs  # the same prompts, sampled apart

    short = self_text.self_stream(tiny_lm.model, tok, tiny_lm.fingerprint, 100)
    long = self_text.self_stream(tiny_lm.model, tok, tiny_lm.fingerprint, short.numel() + 1)
    assert short.numel() >= 100 and long.numel() > short.numel() and torch.equal(long[: short.numel()], short)
    assert short[: len(docs[0])].tolist() == docs[0]

    cal = Calibration(tiny_lm, "self", 3, 32, seed=0)
    windows, held = cal.windows(), cal.heldout(2)
    body = 32 if data.bos_id(tok) is None else 31
    stream = self_text.self_stream(tiny_lm.model, tok, tiny_lm.fingerprint, 5 * body)
    assert torch.equal(torch.cat([windows, held])[:, -body:].reshape(-1), stream[: 5 * body])
    said = []  # more windows than the text written so far: the writing reports each group to the progress
    many = Calibration(tiny_lm, "self", 5 * self_text.BATCH, 32, seed=0)  # a few groups past the text so far
    many.windows(lambda f, text: said.append((f, text)))
    assert many.timings_s["writing"] > 0 and "writing" in many.memory.phases  # the plan's writing phase, measured
    first = many.timings_s["writing"]
    many.heldout(self_text.BATCH)  # held-out windows after those: more writing, added to the same pass
    assert many.timings_s["writing"] > first
    fractions = [f for f, _ in said]
    assert len(said) >= 2 and fractions == sorted(fractions) and fractions[-1] == 1.0
    assert "the model writes its calibration text" in said[-1][1]
    assert f"{5 * self_text.BATCH * body:,} tokens" in said[-1][1]
    # distillation's own text: a stream of its own, timed as writing too (seed 5: no other test has written it)
    apart = Calibration(tiny_lm, "self", 3, 32, seed=5)
    own = apart.own_text(3, lambda f, text: said.append((f, text)))
    assert own.shape == (3, 32) and apart.timings_s["writing"] > 0 and "text to distil on" in said[-1][1]
    assert torch.equal(own, Calibration(tiny_lm, "wiki", 3, 32, seed=5).own_text(3))  # cached: one per model, seed
    assert not torch.equal(own, apart.windows())  # the same prompts (a first window may be all prompt), sampled apart
    mixed = Calibration(tiny_lm, "mix:self=1,news=1", 4, 32, seed=0).windows()
    plan = data.mix_plan(4, {"self": 1, "news": 1})
    assert plan.count("self") == 3 and torch.equal(mixed[[i for i, s in enumerate(plan) if s == "self"]], windows)
    with pytest.raises(DipSVDError, match="needs the loaded model"):
        data.calibration_windows(tok, "self", 2, 32)
    with pytest.raises(DipSVDError, match="writes for its own calibration"):
        data.evaluation_windows(tok, "self", 32)


def test_self_text_refuses_an_offloaded_model(tiny_lm, monkeypatch):
    """Writing token by token through offloaded blocks would stream the model once per token: refused, with the fix."""
    from dipsvd_core.model.models import LoadedModel
    from dipsvd_core.run.calibration import Calibration

    monkeypatch.setattr(LoadedModel, "offloaded", property(lambda self: True))
    with pytest.raises(DipSVDError, match="--device-memory"):
        Calibration(tiny_lm, "mix:self=1,wiki=1", 4, 32, seed=0).windows()
    assert Calibration(tiny_lm, "wiki", 2, 32, seed=0).windows().shape == (2, 32)  # other sources read no model
