"""The Studio app driven through Streamlit's AppTest on a tiny random Llama (issue 4).

Each test starts a fresh session, loads the tiny model through the Model and data page (the model
itself is shared through st.cache_resource), then drives the page under test: it sets widgets,
clicks buttons, waits for the background job and asserts on values, tables, figure data and
error messages.
"""
from __future__ import annotations

import base64
import json
import os
import re
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from studio import ui

APP = os.path.join(os.path.dirname(__file__), "..", "..", "app.py")


@pytest.fixture(scope="module", autouse=True)
def small_defaults(tmp_path_factory, tiny_model_dir):
    """The app's defaults, pointed at a tiny model and small calibration."""
    root = tmp_path_factory.mktemp("studio")
    # A slice of the news corpus as both calibration and evaluation text: tokenizing all of the
    # Wikipedia extract takes seconds per use, and these tests are about the app, not the data.
    from dipsvd_core.engine.data import load_documents

    text = root / "news.txt"
    text.write_text("\n\n".join(load_documents("news")[:40]))
    env = {"DIPSVD_STUDIO_DEFAULT_MODEL": tiny_model_dir, "DIPSVD_STUDIO_CALIB": str(text),
           "DIPSVD_STUDIO_CALIB_WINDOWS": "4", "DIPSVD_STUDIO_SEQLEN": "64", "DIPSVD_STUDIO_EVAL": f"news,{text}",
           "DIPSVD_STUDIO_EVAL_TOKENS": "256", "DIPSVD_STUDIO_NEW_TOKENS": "8"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield root
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def settle(at: AppTest) -> AppTest:
    """Rerun until the session's background job has finished, then once more to show its result."""
    at.run()
    studio = at.session_state["studio"]
    if studio.job is not None:
        studio.job.wait()
        at.run()  # the run above may have started while the job was still going
    assert not at.exception, [e.value for e in at.exception]
    return at


def click(at: AppTest, label: str) -> AppTest:
    buttons = [b for b in at.button if b.label == label]
    assert buttons, f"no button '{label}' among {[b.label for b in at.button]}"
    buttons[0].click()
    return settle(at)


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def metric(at: AppTest, label: str) -> str:
    found = [m.value for m in at.metric if m.label == label]
    assert found, f"no metric '{label}' among {[m.label for m in at.metric]}"
    return found[0]


def figure(at: AppTest, key: str) -> dict:
    """The plotly spec of the chart with this key; numpy arrays (plotly's base64 'bdata') as lists."""
    for chart in at.get("plotly_chart"):
        if chart.proto.id and key in chart.proto.id:
            spec = json.loads(chart.proto.spec)
            for trace in spec["data"]:
                for k, v in trace.items():
                    if isinstance(v, dict) and "bdata" in v:
                        arr = np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"])
                        trace[k] = arr.reshape([int(n) for n in v["shape"].split(",")]).tolist() \
                            if "shape" in v else arr.tolist()
            return spec
    raise AssertionError(f"no plotly chart with key {key}")


def loaded() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    return click(at, "Load model and collect statistics")


def page(at: AppTest, name: str) -> AppTest:
    at.switch_page(f"pages/{name}.py")
    return settle(at)


def factored(at: AppTest) -> AppTest:
    """The fast path most tests start from: uniform, factored, unrefined (the defaults, nested and refined, are
    test_the_defaults_are_the_best_path's and prepared's)."""
    page(at, "allocation")
    at.radio(key="k_s_allocation").set_value("uniform")
    settle(at)
    at.session_state["studio"].settings = replace(at.session_state["studio"].settings, refine="none")
    return click(at, "Factor matrices")


def prepared(at: AppTest) -> AppTest:
    """The defaults' passes run, in one click on the Allocation page."""
    page(at, "allocation")
    return click(at, "Run all 3 passes (fisher, factors, type probe)")


# --- Model and data -----------------------------------------------------------------------------

def test_load_shows_architecture_and_statistics():
    at = loaded()
    assert not errors(at)
    assert metric(at, "Decoder blocks") == "2"
    assert metric(at, "Targeted Linears") == "14"  # q k v o gate up down, two blocks
    assert metric(at, "Calibration tokens") == "256"  # 4 windows x 64 tokens
    tables = [df.value for df in at.dataframe]
    rows = next(t for t in tables if "linear" in t.columns)
    assert any("Device: **CPU**" in c.value for c in at.caption)
    at.toggle(key="k_plan_show").set_value(True)
    at.run()
    plan = next(df.value for df in at.dataframe if "phase" in df.value.columns)  # from the config alone
    assert list(plan["phase"]) == ["load", "writing", "statistics", "factors", "fisher", "block probe", "type probe",
                                  "search", "training", "weight update", "refine", "surgery", "distill", "evaluation",
                                  "save"]
    # the defaults, dipsvd + nested + refine: the statistics pass factors each block; nested reads Fisher and the type
    # probe, and refine is one more pass
    assert [n for n, needed in zip(plan["phase"], plan["needed"]) if needed == "yes"] == [
        "load", "statistics", "factors", "fisher", "type probe", "refine", "surgery", "evaluation"]
    assert list(rows["linear"]) == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert list(rows["out x in"])[-1] == "64 x 128" and list(rows["blocks"]) == [2] * 7
    studio = at.session_state["studio"]
    assert studio.bench.n_windows == 4 and studio.settings.ratio == 0.1  # small model: 0.1 removed by default
    assert not any("GGUF" in i.value for i in at.info)  # a plain folder, not dequantized


def _load_with(at: AppTest, kind: str = "Local folder", spec: str | None = None, calib_path: str | None = None,
               windows: int | None = None) -> AppTest:
    at.radio(key="k_load_kind").set_value(kind)
    at.run()
    if spec is not None:
        at.text_input(key="k_load_spec").input(spec)
    if calib_path is not None:
        at.selectbox(key="k_load_calib").set_value("a local .txt or .jsonl file")
        at.run()
        at.text_input(key="k_load_calib_path").input(calib_path)
    if windows is not None:
        at.number_input(key="k_load_windows").set_value(windows)
    at.run()
    return click(at, "Load model and collect statistics")


def test_bad_model_path_is_a_clear_error(tmp_path):
    at = AppTest.from_file(APP, default_timeout=60).run()
    _load_with(at, spec=str(tmp_path / "no-such-model"))
    assert errors(at) == [f"model path not found: {tmp_path / 'no-such-model'}; check the path, or give a hub id "
                          "like HuggingFaceTB/SmolLM2-135M"]
    assert at.session_state["studio"].lm is None
    folder = tmp_path / "empty"
    folder.mkdir()
    _load_with(at, spec=str(folder))
    assert "is not a model folder (no config.json)" in errors(at)[0]


def test_model_without_decoder_linears_is_a_clear_error(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    at = AppTest.from_file(APP, default_timeout=60).run()
    _load_with(at, spec=str(tmp_path / "gpt2"))
    [msg] = errors(at)
    assert "unsupported architecture GPT2LMHeadModel" in msg and "Conv1D" in msg
    assert "Traceback" not in msg


def test_calibration_text_too_short_is_a_clear_error(tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("Only a few words of calibration text.\n")
    at = AppTest.from_file(APP, default_timeout=60).run()
    _load_with(at, kind="Local folder", spec=os.environ["DIPSVD_STUDIO_DEFAULT_MODEL"], calib_path=str(text),
               windows=64)
    [msg] = errors(at)
    assert msg.startswith(f"calibration text '{text}' is too short") and "64 were requested" in msg


def test_pages_ask_for_a_model_first():
    at = AppTest.from_file(APP, default_timeout=60).run()
    for name in ("importance", "allocation", "compress", "side_by_side", "export"):
        page(at, name)
        assert at.info[0].value == "Load a model and collect calibration statistics first."


# --- Importance ---------------------------------------------------------------------------------

def test_importance_figures():
    from dipsvd_core.allocation.importance import effective_ranks, rank_spectra

    at = page(loaded(), "importance")
    heat = figure(at, "fig_alpha_heat")["data"][0]
    assert heat["type"] == "heatmap" and len(heat["z"]) == 2 and len(heat["z"][0]) == 64  # blocks x channels
    studio = at.session_state["studio"]
    alpha = studio.bench.stats().alpha("model.layers.1.self_attn.q_proj")
    assert heat["z"][1][5] == pytest.approx(float(torch.log10(alpha[5])), rel=1e-6)
    groups = at.selectbox(key="k_imp_group").options
    assert groups == ["self_attn.q_proj / k_proj / v_proj", "self_attn.o_proj", "mlp.gate_proj / up_proj",
                      "mlp.down_proj"]
    at.selectbox(key="k_imp_group").set_value("mlp.down_proj")
    at.number_input(key="k_imp_block").set_value(1)
    settle(at)
    assert len(figure(at, "fig_alpha_heat")["data"][0]["z"][0]) == 128
    curve = figure(at, "fig_alpha_sorted")
    assert curve["data"][0]["y"] == sorted(curve["data"][0]["y"], reverse=True)
    assert len(curve["data"][1]["x"]) == round(0.03 * 128)  # the protected top-bar channels
    ranks = figure(at, "fig_rank")["data"][0]["y"]
    assert [int(r) for r in ranks] == list(effective_ranks(rank_spectra(studio.bench.stats()), 0.95, "sigma2"))
    top1, topk = figure(at, "fig_energy")["data"][:2]  # where each block output's energy goes
    diag = [torch.sort(e, descending=True).values for e in studio.bench.stats().block_energy]
    assert top1["y"] == pytest.approx([float(d[0] / d.sum()) for d in diag])
    assert topk["y"] == pytest.approx([float(d[:8].sum() / d.sum()) for d in diag])
    assert at.session_state["k_imp_tab"] == "Channel importance α"
    at.session_state["k_imp_tab"] = "Block importance S, R, Q"  # the tab the user opened stays open after the job

    click(at, "Compute Fisher sensitivity")
    assert at.session_state["k_imp_tab"] == "Block importance S, R, Q"
    fisher = figure(at, "fig_fisher")["data"][0]["y"]
    assert fisher == pytest.approx(list(studio.fisher.per_block))
    q = figure(at, "fig_q")["data"]
    assert [t["name"].split(" ")[0] for t in q] == ["S̃", "R̃", "Q"] and len(q[2]["y"]) == 2

    click(at, "Factor svd, svd-llm, dipsvd")
    spectra = figure(at, "fig_spectra")["data"]
    assert [t["name"].split(" ")[0] for t in spectra] == ["svd", "svd-llm", "dipsvd"]
    assert all(t["y"][0] == pytest.approx(1.0) and len(t["y"]) == 64 for t in spectra)  # q_proj is 64 x 64


# --- Allocation ---------------------------------------------------------------------------------

def test_allocation_preview_slices_cached_factors_fast():
    at = page(loaded(), "allocation")
    at.radio(key="k_s_allocation").set_value("uniform")
    settle(at)
    assert "No factors yet" in at.warning[0].value
    click(at, "Factor matrices")
    assert metric(at, "Target ratio removed") == "0.1"
    assert abs(float(metric(at, "Realized ratio")) - 0.1) < 0.005
    keep = figure(at, "fig_keep")["data"]
    assert keep[0]["y"] == pytest.approx(keep[1]["y"])  # uniform against uniform
    at.slider(key="k_s_ratio").set_value(0.3)
    t0 = time.perf_counter()
    at.run()
    assert time.perf_counter() - t0 < 1.0  # re-allocation only: no new SVD
    assert abs(float(metric(at, "Realized ratio")) - 0.3) < 0.005
    assert any(m.value == "**ratio 0.3 removed, 70% kept**" for m in at.markdown)
    loss = figure(at, "fig_loss")["data"]
    assert len(loss[0]["y"]) == 2 and all(v > 0 for v in loss[0]["y"])

    at.slider(key="k_s_dipsvd_weight").set_value(10.0)
    at.run()
    assert "No factors yet for method dipsvd with a=10" in at.warning[0].value  # a refactor is needed
    assert any(b.label == "Factor matrices" for b in at.button)


def test_a_methods_own_options_are_drawn_from_its_knobs():
    """The Allocation page draws the chosen method's own options (common/options.py) from their knobs: DipSVD's
    three, none for SVD-LLM, and the test-only scaling's one option (tests/extensions.py) with no page edited."""
    from extensions import registered

    with registered():
        at = page(loaded(), "allocation")
        assert at.slider(key="k_s_dipsvd_bar").value == 0.03 and at.radio(key="k_s_dipsvd_whitening").value == "code"
        at.selectbox(key="k_s_method").set_value("svd-llm")
        settle(at)
        assert not [w for w in at.slider if w.key.startswith("k_s_dipsvd_")]
        at.selectbox(key="k_s_method").set_value("gram-diag")
        settle(at)
        box = at.number_input(key="k_s_gram-diag_power")
        assert box.value == 0.5 and box.label == "Exponent on G_jj"
        box.set_value(1.0)
        settle(at)
        assert getattr(at.session_state["studio"].settings, "gram-diag").power == 1.0
        assert any("No factors yet for method gram-diag" in w.value for w in at.warning)


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_ratio_outside_0_1_is_a_clear_error(ratio):
    at = factored(loaded())
    at.slider(key="k_s_ratio").set_value(ratio)
    at.run()
    assert errors(at) == [f"ratio must be strictly between 0 and 1 (the fraction of targeted parameters removed; "
                          f"0.2 removes 20%, keeps 80%); got {ratio}"]
    assert not at.get("plotly_chart")


def test_heuristic_and_coupled_allocations_differ_from_uniform():
    at = factored(loaded())
    at.slider(key="k_s_ratio").set_value(0.3)
    at.radio(key="k_s_allocation").set_value("heuristic")
    settle(at)
    assert "needs Fisher sensitivity" in at.warning[0].value
    click(at, "Compute Fisher sensitivity")
    bars, uniform = figure(at, "fig_keep")["data"]
    assert bars["name"] == "heuristic" and bars["y"] != pytest.approx(uniform["y"])
    assert abs(float(metric(at, "Realized ratio")) - 0.3) < 0.005
    at.radio(key="k_s_allocation").set_value("coupled")
    settle(at)
    assert "probing every block once" in at.warning[0].value
    click(at, "Probe the blocks")
    assert figure(at, "fig_keep")["data"][0]["name"] == "coupled"
    assert abs(float(metric(at, "Realized ratio")) - 0.3) < 0.005
    heuristic_keep = bars["y"]
    at.radio(key="k_s_allocation").set_value("nested")
    settle(at)
    assert "probing every matrix type once" in at.warning[0].value
    click(at, "Probe the matrix types")
    bars = figure(at, "fig_keep")["data"][0]
    assert bars["name"] == "nested" and abs(float(metric(at, "Realized ratio")) - 0.3) < 0.01
    # each block keeps at most the heuristic's share, and the blocks it keeps dense stay dense
    assert all(n <= h + 1e-9 for n, h in zip(bars["y"], heuristic_keep))
    assert [h == pytest.approx(1.0) for h in heuristic_keep] == [n == pytest.approx(1.0) for n in bars["y"]]


def test_bayesian_optimization_converges_and_can_be_cancelled():
    at = factored(loaded())
    at.radio(key="k_s_allocation").set_value("bayes")
    settle(at)
    click(at, "Compute Fisher sensitivity")  # the heuristic warm start needs it
    at.number_input(key="k_s_bo_calls").set_value(5)
    settle(at)
    click(at, "Run Bayesian optimization")
    conv = figure(at, "fig_bo")["data"]
    assert len(conv[0]["y"]) == 5 and conv[1]["y"] == sorted(conv[1]["y"], reverse=True)  # best so far falls
    assert abs(float(metric(at, "Realized ratio")) - 0.1) < 0.005

    at.number_input(key="k_s_bo_calls").set_value(200)
    settle(at)
    [b for b in at.button if b.label == "Run Bayesian optimization"][0].click()
    at.run()
    studio = at.session_state["studio"]
    while len(studio.job.values) < 3:
        time.sleep(0.1)
    at.run()
    assert at.slider(key="k_s_ratio").disabled  # no interrupting widget while the job runs
    [b for b in at.button if b.label == "Cancel"][0].click()
    settle(at)
    assert at.warning[0].value.startswith("Bayesian optimization: cancelled after")
    assert studio.bo["cancelled"] and 3 <= len(studio.bo["allocation"].values) < 200


def test_refined_kl_search_on_the_allocation_page():
    """refined-kl is a search on request: three refined candidates scored by KL, its curve and its winner kept."""
    at = factored(loaded())
    at.radio(key="k_s_allocation").set_value("refined-kl")
    settle(at)
    for label in ("Compute Fisher sensitivity", "Probe the matrix types"):
        if any(b.label == label for b in at.button):
            click(at, label)
    assert any("refines each of its 3 candidate allocations" in i.value for i in at.info)
    click(at, "Run the refined-kl search")
    fig = figure(at, "fig_bo")
    assert fig["layout"]["title"]["text"].startswith("The refined-kl search") and len(fig["data"][0]["y"]) == 3
    chosen = at.session_state["studio"].bo["allocation"]
    assert chosen.method.startswith("refined-kl (") and min(chosen.values) == chosen.history[-1]
    assert abs(float(metric(at, "Realized ratio")) - 0.1) < 0.005


def test_dobi_trains_previews_builds_and_exports(tmp_path):
    at = loaded()
    page(at, "allocation")
    at.selectbox(key="k_s_method").set_value("dobi")
    settle(at)
    assert at.radio(key="k_s_allocation").options == ["trained"]  # Dobi-SVD's own allocation only
    at.number_input(key="k_s_dobi_windows").set_value(2)
    at.checkbox(key="k_s_dobi_remap").check()
    at.slider(key="k_s_ratio").set_value(0.3)
    settle(at)
    click(at, "Train truncation positions")
    assert not errors(at)
    curve = figure(at, "fig_dobi")["data"]
    assert len(curve[0]["y"]) == 2 * 2 and all(v > 0 for v in curve[0]["y"])  # epochs x windows steps
    assert abs(float(metric(at, "Ratio the gammas reached")) - 0.3) < 0.01
    assert abs(float(metric(at, "Realized after the budget fix")) - 0.3) < 0.005
    keep = figure(at, "fig_keep")["data"]
    assert len(keep[0]["y"]) == 2  # one bar per block
    page(at, "compress")
    click(at, "Build compressed model")
    studio = at.session_state["studio"]
    assert studio.result.settings.method == "dobi" and studio.result.info["storage"]["remap"]
    assert any("8-bit factors" in c.value for c in at.caption)
    # The ratio sweep puts Dobi-SVD next to SVD-LLM on the same windows
    at.multiselect(key="k_sw_methods").set_value(["svd-llm", "dobi"])
    at.multiselect(key="k_sw_ratios").set_value([0.1, 0.3])
    settle(at)
    click(at, "Run sweep")
    traces = {t["name"]: t for t in figure(at, "fig_sweep")["data"] if t.get("name") in ("svd-llm", "dobi")}
    assert set(traces) == {"svd-llm", "dobi"} and all(len(t["y"]) == 2 for t in traces.values())
    page(at, "export")
    at.text_input(key="k_ex_folder").set_value(str(tmp_path / "dobi-out"))
    settle(at)
    click(at, "Save")
    entry = json.loads((tmp_path / "dobi-out" / "config.json").read_text())["dipsvd_compression"]
    assert entry["method"] == "dobi" and entry["remap"] is True


# --- Compress and evaluate ----------------------------------------------------------------------

def test_the_defaults_are_the_best_path():
    """A new session starts on the best path of the quality panel: dipsvd + nested, refined with compensation. The
    Allocation page runs the three passes nested reads in one click, and the first build refines (a background job,
    not a quick slice)."""
    at = loaded()
    studio = at.session_state["studio"]
    assert (studio.settings.method, studio.settings.allocation, studio.settings.refine, studio.settings.compensate) \
        == ("dipsvd", "nested", "sequential", "auto")
    page(at, "allocation")
    assert [w.value.split(":")[0] for w in at.warning][:3] == [
        "The nested allocation needs Fisher sensitivity", "No factors yet for method dipsvd with a=30, bar=0.03, code "
        "whitening", "The nested allocation needs a calibration of its estimate by probing every matrix type once"]
    assert [b.label for b in at.button if b.proto.type == "primary"] == ["Run all 3 passes (fisher, factors, type probe)"]
    click(at, "Run all 3 passes (fisher, factors, type probe)")
    assert figure(at, "fig_keep")["data"][0]["name"] == "nested" and studio.fisher is not None
    page(at, "compress")
    assert at.checkbox(key="k_c_refine").value and not at.checkbox(key="k_c_tune").value
    click(at, "Build compressed model")
    assert studio.job.thread.ident is not None  # refine is a pass of its own: a background job
    refined = studio.result.info["refine"]
    assert studio.result.settings.allocation == "nested" and refined["compensate"] == "outputs"  # auto at 0.1
    assert any("refined" in c.value for c in at.caption)


def test_compress_evaluate_sweep_and_speed():
    at = factored(loaded())
    at.slider(key="k_s_ratio").set_value(0.2)
    settle(at)
    studio = at.session_state["studio"]
    before = studio.lm.fingerprint
    page(at, "compress")
    click(at, "Build compressed model")
    sizes = [m.value for m in at.markdown if "Realized ratio (targeted)" in m.value]
    assert len(sizes) == 1, [m.value for m in at.markdown]
    realized = float(re.search(r"\*\*([0-9.]+)\*\* \(target: ratio 0.2 removed", sizes[0]).group(1))
    assert abs(realized - 0.2) < 0.005
    assert studio.job.title == "Building the compressed model" and studio.job.thread.ident is None  # in the page's run
    report = studio.params
    assert report["targeted_after"] < report["targeted_before"] and report["total_after"] < report["total_before"]
    for n in ("targeted_after", "targeted_before", "total_after", "total_before"):
        assert ui.fmt_params(report[n]) in sizes[0], n
    click(at, "Evaluate original and compressed")
    table = at.table[0].value
    assert list(table["dataset"]) == ["news", os.environ["DIPSVD_STUDIO_CALIB"]]
    assert all(0 < v < float("inf") for v in list(table["original"]) + list(table["compressed"]))
    # the verdict beside the table: the worst set's ratio, in its band's box
    worst = max(c / o for o, c in zip(table["original"], table["compressed"]))
    verdicts = [m.value for m in at.markdown if "The compressed model is" in m.value]
    color = "green" if worst <= 1.2 else "orange" if worst <= 2 else "red"
    assert len(verdicts) == 1 and f"{worst:.2f}x)" in verdicts[0] and verdicts[0].startswith(f":{color}[")
    click(at, "Run sweep")
    sweep = figure(at, "fig_sweep")["data"]  # the default ratios include the one built (0.2)
    assert [t["name"] for t in sweep] == ["svd-llm", "dipsvd"] and all(t["x"] == [0.05, 0.1, 0.15, 0.2] for t in sweep)
    click(at, "Measure prefill and decode speed")
    assert metric(at, "Prefill, original").endswith("tok/s")
    at.number_input(key="k_lm_limit").set_value(20)
    settle(at)
    click(at, "Score with lm-eval")
    scored = next(df.value for df in at.dataframe if "accuracy" in df.value.columns)
    assert list(scored["model"]) == ["original", "compressed"] and list(scored["documents"]) == [20, 20]
    assert all(0 <= a <= 1 for a in scored["accuracy"]) and not errors(at)
    page(at, "side_by_side")  # the speeds measured on Compress, beside the generations
    o = studio.speed["original"]
    assert any(f"prefill {o['prefill_tok_s']:.0f} → " in c.value for c in at.caption)
    page(at, "compress")
    # The original model is never touched: same weights, still plain Linears.
    from dipsvd_core.model.models import fingerprint

    assert fingerprint(studio.lm.model) == before
    assert all(type(studio.lm.model.get_submodule(t.name)).__name__ == "Linear" for t in studio.lm.targets)


# --- Side by side -------------------------------------------------------------------------------

def test_side_by_side_generations():
    at = prepared(loaded())  # at the defaults
    page(at, "compress")
    click(at, "Build compressed model")
    page(at, "side_by_side")
    assert at.toggle(key="k_sbs_chat").value  # the bundled tokenizer has a chat template
    at.text_area(key="k_sbs_own").input("Tell me about rivers.")
    at.multiselect(key="k_sbs_ratios").set_value([0.2])
    settle(at)
    click(at, "Generate")
    labels = [m.value for m in at.markdown if m.value.startswith("**")]
    # each column names method, allocation, ratio removed and kept, and whether refined
    assert labels[:3] == ["**Original**",
                          "**Compressed · dipsvd + nested · ratio 0.1 removed, 90% kept · refined (sequential)**",
                          "**Compressed · dipsvd + nested · ratio 0.2 removed, 80% kept · refined (sequential)**"]
    from dipsvd_core.engine.evaluate import DEFAULT_PROMPTS

    # all three default prompts preselected, then the user's own
    assert [m.value for m in at.markdown if m.value.startswith("#####")] == [
        f"##### {p}" for p in DEFAULT_PROMPTS] + ["##### Tell me about rivers."]
    gens = at.session_state["studio"].generations["columns"]
    assert all(len(rows) == 4 and rows[0]["new_tokens"] <= 8 for rows in gens.values())
    assert sum("tok/s" in c.value for c in at.caption) == 12
    texts = [ui.verbatim(r["text"].strip()) for rows in gens.values() for r in rows]
    assert all(t in [m.value for m in at.markdown] for t in texts if t)
    from dipsvd_core.engine.evaluate import repetition

    row = gens["Original"][0]
    shown = f"distinct 3-grams {repetition(row['text'])['distinct_3']:.2f} · longest repeat"
    assert sum(shown in c.value for c in at.caption) >= 1


def test_generations_keep_their_line_breaks_and_show_no_markup():
    poem = "The sea is wide,\nthe sea is deep.\n# not a heading, $5 not math"
    shown = ui.verbatim(poem)
    assert shown.split("  \n") == ["The sea is wide,", "the sea is deep\\.", "\\# not a heading, \\$5 not math"]


# --- Export -------------------------------------------------------------------------------------

def test_export_saves_and_asks_before_replacing(tmp_path):
    from dipsvd_core.io.compressed import load_compressed
    from dipsvd_core.lowrank.surgery import module_ranks

    at = factored(loaded())
    page(at, "compress")
    click(at, "Build compressed model")
    page(at, "export")
    assert [d.label for d in at.get("download_button")] == ["Download report (JSON)", "Download allocation (CSV)",
                                                            "Download report (HTML)"]
    assert not at.exception
    out = tmp_path / "saved"
    at.text_input(key="k_ex_folder").input(str(out))
    settle(at)
    click(at, "Save")
    assert at.success[0].value == f"Saved to `{out}`."
    studio = at.session_state["studio"]
    again = load_compressed(out)
    assert module_ranks(again.model) == {n: k for n, k in studio.result.allocation.ranks.items() if k is not None}
    card = (out / "README.md").read_text()  # the model card, from the page's report
    assert card.startswith("---\nlibrary_name: transformers\n") and studio.result.settings.method in card
    click(at, "Save")  # the folder is not empty now
    assert "already exists and is not empty" in errors(at)[0]
    at.checkbox(key="k_ex_force").check()
    settle(at)
    assert [b for b in at.button if b.label == "Save"][0].disabled  # not before the explicit confirmation
    at.checkbox(key="k_ex_confirm").check()
    settle(at)
    click(at, "Save")
    assert not errors(at) and at.success


def test_report_and_allocation_csv_content():
    from dipsvd_core.io.report import compression_report
    from dipsvd_core.outputs.inspection import allocation_rows, to_csv

    at = factored(loaded())
    page(at, "compress")
    click(at, "Build compressed model")
    s = at.session_state["studio"]
    rep = json.loads(json.dumps(compression_report(s.lm, s.bench, s.result, s.params), default=str))
    assert rep["ratio_words"] == "ratio 0.1 removed, 90% kept" and rep["calibration"]["windows"] == 4
    csv = to_csv(allocation_rows(s.lm, s.result.allocation)).splitlines()
    assert csv[0] == "name,block,linear,out,in,p_block,rank,params_before,params_after" and len(csv) == 15


# --- Behaviour ----------------------------------------------------------------------------------

def test_work_survives_page_switches():
    at = factored(loaded())
    at.slider(key="k_s_ratio").set_value(0.25)
    at.radio(key="k_s_dipsvd_whitening").set_value("paper")
    settle(at)
    page(at, "compress")
    assert "ratio 0.25 removed, 75% kept" in at.markdown[0].value
    page(at, "importance")
    page(at, "allocation")
    assert at.slider(key="k_s_ratio").value == 0.25 and at.radio(key="k_s_dipsvd_whitening").value == "paper"
    page(at, "model_data")
    assert metric(at, "Decoder blocks") == "2"  # the loaded model is still there


def test_a_run_that_does_not_fit_is_refused_before_loading(tiny_model_dir, monkeypatch):
    """The load job checks the plan before it loads anything; one message names the option that fits."""
    from dipsvd_core.plan import plan

    monkeypatch.setattr(plan, "free_host_bytes", lambda: 1)
    at = AppTest.from_file(APP, default_timeout=60).run()
    _load_with(at, spec=tiny_model_dir)
    [msg] = errors(at)
    assert msg.startswith("this run does not fit: predicted peak host memory") and "--ignore-plan" in msg
    assert at.session_state["studio"].lm is None


def test_refine_on_the_compress_page_and_refined_sweep_rows():
    """Refine is a build step on the Compress page; the sweep can put refined curves next to plain ones."""
    at = factored(loaded())
    page(at, "compress")
    at.checkbox(key="k_c_refine").check()
    settle(at)
    studio = at.session_state["studio"]
    assert studio.settings.refine == "sequential"
    click(at, "Build compressed model")
    assert not errors(at)
    assert studio.result.settings.refine == "sequential" and studio.result.info["refine"]["seconds"] > 0
    assert studio.result_is_current
    # the held-out check's report, a line per block, under the build's caption
    assert any(e.label == "Refine, block by block" for e in at.expander)
    shown = next(d for d in at.dataframe if "block gain" in d.value.columns)
    assert list(shown.value["block"]) == list(range(len(studio.result.info["refine"]["blocks"])))
    assert any("of 2 blocks" in c.value and "windows held out" in c.value for c in at.caption)
    at.checkbox(key="k_c_tune").check()
    settle(at)
    assert studio.settings.refine == "block"
    at.checkbox(key="k_c_tune").uncheck()
    settle(at)
    assert studio.settings.refine == "sequential"
    at.multiselect(key="k_sw_methods").set_value(["svd-llm"])
    at.multiselect(key="k_sw_ratios").set_value([0.1, 0.3])
    at.checkbox(key="k_sw_refine").check()
    settle(at)
    click(at, "Run sweep")
    names = [t["name"] for t in figure(at, "fig_sweep")["data"]]
    assert names == ["svd-llm", "svd-llm + refine"]
    # dense compensation and the tuning's epochs, read by refined builds; "auto" says what it picks at this ratio
    ratio = studio.settings.ratio
    assert at.selectbox(key="k_c_compensate").options[0] == f"auto ({'outputs' if ratio <= 0.3 else 'none'} at " \
                                                           f"ratio {ratio:g})"
    at.selectbox(key="k_c_compensate").set_value("outputs")
    at.checkbox(key="k_c_tune").check()
    settle(at)
    at.number_input(key="k_c_tune_epochs").set_value(2)
    settle(at)
    assert (studio.settings.refine, studio.settings.compensate, studio.settings.tune.epochs) == ("block", "outputs", 2)
    click(at, "Build compressed model")
    assert not errors(at) and studio.result.settings.compensate == "outputs"
    assert studio.result.info["refine"]["compensate"] == "outputs"


def test_nested_without_refine_says_it_is_meant_to_be_refined():
    from dataclasses import replace

    at = factored(loaded())
    studio = at.session_state["studio"]
    studio.settings = replace(studio.settings, allocation="nested")
    page(at, "compress")
    settle(at)
    assert any("meant to be refined" in i.value for i in at.info)
    # unrefined: nothing about the calibration; refined at 4 x 64 tokens, the page says it is small and what the
    # advised 32 x 512 would cost (64x the tokens, from the passes measured in this run)
    assert not any("small for a refined build" in w.value for w in at.warning)
    at.checkbox(key="k_c_refine").check()
    settle(at)
    assert not any("meant to be refined" in i.value for i in at.info)
    small = [w.value for w in at.warning if "small for a refined build" in w.value]
    assert len(small) == 1 and "(4 x 64 = 256 tokens)" in small[0] and "fits on 3 windows" in small[0]
    # the tiny model's passes take under half a second: too small to scale from, and said so
    assert "by about 64" in small[0] and ("by about 64: about" in small[0] or "too small to time" in small[0])
    page(at, "allocation")  # the nested allocation is meant to be refined: the Allocation page says it too
    assert any("small for a refined build" in w.value for w in at.warning)


def test_refine_on_then_dobi_chosen_is_not_an_error():
    """Refine checked on the Compress page, then Dobi-SVD chosen on the Allocation page: Dobi-SVD cannot be refined,
    so refine is off for it (not a red error that blocks its training), and the Compress page's box says so."""
    at = factored(loaded())
    page(at, "compress")
    at.checkbox(key="k_c_refine").check()
    settle(at)
    studio = at.session_state["studio"]
    page(at, "allocation")
    at.selectbox(key="k_s_method").set_value("dobi")
    settle(at)
    assert not errors(at) and studio.settings.refine == "none"
    assert any(b.label == "Train truncation positions" for b in at.button)
    at.selectbox(key="k_s_method").set_value("dipsvd")  # back: dipsvd's own allocation and refine
    settle(at)
    assert (studio.settings.allocation, studio.settings.refine) == ("nested", "sequential")
    page(at, "compress")
    settle(at)
    assert studio.settings.refine == "sequential" and at.checkbox(key="k_c_refine").value


def test_settle_heap_collects_garbage_and_freezes_the_living():
    """The app freezes the objects alive after start-up and after a model load (studio.jobs.settle_heap): a
    full collection must free a garbage cycle first, and the living must leave the generations a collection
    walks."""
    import gc
    import weakref

    from studio.jobs import settle_heap

    class Node:
        pass

    garbage, alive = Node(), Node()
    garbage.me = garbage  # a reference cycle: only the collector frees it
    gone = weakref.ref(garbage)
    del garbage
    try:
        settle_heap()
        assert gone() is None
        assert gc.get_freeze_count() > 1000
        assert not any(o is alive for o in gc.get_objects())  # frozen: outside every generation
    finally:
        gc.unfreeze()


# --- Offload ------------------------------------------------------------------------------------

def test_an_offloaded_model_builds_evaluates_and_generates_side_by_side(tiny_model_dir, monkeypatch):
    """A host budget that holds no block beside the working set puts every block on disk (the CPU's offload).
    The app then builds the compressed copy (sharing the original's offloaded weights), evaluates both and
    generates side by side, with the figures of the same model in memory."""
    from dipsvd_core.engine.evaluate import perplexity
    from dipsvd_core import plan as P
    from dipsvd_core.run.loading import load_model
    from dipsvd_core.run.pipeline import Workbench

    monkeypatch.setattr("dipsvd_core.plan.plan.runtime_bytes", lambda: 10 ** 9)  # the same runtime in the test's plan and the page's
    run = {"method": "dipsvd", "calib_windows": 4, "seqlen": 64, "dtype": "auto", "eval_tokens": 256, "eval_sets": 2,
           "offload": True, "inplace": False}  # the Load page's run at these defaults
    everything_on_disk = P.make_plan(tiny_model_dir, "cpu", P.run_of(**run), bench=False, budgets={"host": 10 ** 12})
    streamed = P.memory(everything_on_disk.shape, everything_on_disk.run.replace(disk_blocks=2), False,
                        everything_on_disk.runtime_bytes)
    budget = max(p.host_bytes for p in streamed.values() if p.needed) + everything_on_disk.shape.block_params * 2
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.checkbox(key="k_load_offload").check()
    at.run()
    at.text_input(key="k_load_host_memory").input(f"{budget}B")
    at.run()
    at = click(at, "Load model and collect statistics")
    studio = at.session_state["studio"]
    assert not errors(at) and studio.lm.offloaded
    assert studio.lm.model.hf_device_map["model.layers.0"] == "disk" == studio.lm.model.hf_device_map["model.layers.1"]
    assert any("Offloaded: 0 blocks in memory, 2 on disk" in c.value for c in at.caption)
    page(factored(at), "compress")
    click(at, "Build compressed model")
    click(at, "Evaluate original and compressed")
    table = at.table[0].value
    ref = load_model(tiny_model_dir, "cpu", "float32")
    bench = Workbench(ref, os.environ["DIPSVD_STUDIO_CALIB"], 4, 64)
    built = bench.build(studio.settings)  # the page's settings (uniform, unrefined: factored's) on the model in memory
    news = bench.eval_windows("news", 256)
    assert table["original"][0] == pytest.approx(perplexity(ref.model, news), rel=1e-6)
    assert table["compressed"][0] == pytest.approx(perplexity(built.model, news), rel=1e-5)
    page(at, "side_by_side")
    click(at, "Generate")
    gens = at.session_state["studio"].generations["columns"]
    assert len(gens) == 2 and all(rows[0]["new_tokens"] >= 1 for rows in gens.values()) and not errors(at)
    assert studio.lm.model.model.layers[1].mlp.down_proj.weight.device.type == "meta"  # still offloaded


def test_offload_budgets_that_are_not_sizes_or_hold_no_block_are_one_message():
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.checkbox(key="k_load_offload").check()
    at.run()
    at.text_input(key="k_load_host_memory").input("lots")
    at.run()
    at = click(at, "Load model and collect statistics")
    assert errors(at) == ["Host memory budget: expected a memory size like 24GiB, 22GB or 512MiB, got 'lots'"]
    at.text_input(key="k_load_host_memory").input("1KiB")
    at.run()
    at = click(at, "Load model and collect statistics")
    [msg] = errors(at)
    assert msg.startswith("--host-memory 1.0 KiB cannot hold one decoder block of this model (")
    assert msg.endswith("beside the runtime); give at least that")
    assert at.session_state["studio"].lm is None
