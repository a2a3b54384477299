"""Page 4: build the compressed model for the current settings and measure it."""
from dataclasses import replace

import pandas as pd
import streamlit as st

from dipsvd_core.allocation.budget import describe_ratio, param_report
from dipsvd_core.allocation.strategies import strategy
from dipsvd_core.common.errors import DipSVDError
from dipsvd_core.common.knobs import help_of
from dipsvd_core.engine.data import EVAL_SOURCES as SOURCES
from dipsvd_core.engine.evaluate import perplexity, speed
from dipsvd_core.methods.handlers import grid_names, handler, refines, resolve
from dipsvd_core.methods.settings import Settings
from dipsvd_core.outputs import figures
from dipsvd_core.outputs.inspection import LARGE_MODEL_PARAMS, ppl_rows, quality_verdict, sweep_curves
from dipsvd_core.outputs.lm_tasks import LOCAL_TASK, lm_eval_accuracy
from dipsvd_core.outputs.sweep import REFINED, run_sweep
from dipsvd_core.plan import binary_size
from dipsvd_core.refine.choices import AUTO, COMPENSATIONS, REFINE_CHOICES, compensation_for, refine_choice
from dipsvd_core.refine.distill import distilled_summary
from dipsvd_core.refine.sequential import calibration_advice, refine_table, summary
from studio import ui
from studio.state import defaults

s = ui.need_model()
lm, bench, busy, cur, d = s.lm, s.bench, ui.busy(), s.settings, defaults()
ui.header("Compress and evaluate", "Build the compressed copy for the current settings (the original is never "
          "modified), then compare perplexity, size and speed.")

st.markdown(f"Current settings: **{cur.method}**{handler(cur.method).describe(cur)} · **{cur.allocation}** allocation · "
            f"**{describe_ratio(cur.ratio)}** (change them on the Allocation page)")


def build(job):
    allocation = s.bo_allocation(cur)
    if not strategy(cur.allocation).reproducible and allocation is None:
        raise DipSVDError(f"run the {cur.allocation} search on the Allocation page first, or choose another allocation")
    s.forget_result()
    result = bench.build(cur, allocation, progress=job.progress)
    s.result = result
    s.params = param_report(lm.model, result.model, lm.targets, result.allocation.ranks)


def auto_label(name: str, ratio: float) -> str:
    """"auto" says what it picks at the current ratio: "auto (outputs at ratio 0.2)"."""
    return f"{name} ({compensation_for(name, ratio)} at ratio {ratio:g})" if name == AUTO else name


refinable = handler(cur.method).refinable
c_refine, c_comp, c_tune = st.columns(3)
ui.seed("k_c_refine", refines(cur.refine))  # a starting value once, never beside a session-state value
ui.seed("k_c_tune", refine_choice(cur.refine).tunes)
ui.seed("k_c_compensate", cur.compensate)
ui.seed("k_lm_limit", 100)
refine = c_refine.checkbox("Refine (sequential compensation)", key="k_c_refine",
                           persist_state="session", disabled=busy or not refinable,
                           help="One more block-by-block pass: each block's factored matrices are refitted, in closed "
                                "form, to give the original outputs on the inputs that the already-compressed blocks "
                                "before it produce. The refit is checked on held-out calibration windows, and a block "
                                "keeps its unrefined factors where it does not help there. Same ranks, same size; a "
                                "build step, not a slider step.")
compensate = c_comp.selectbox("Compensate dense matrices", list(COMPENSATIONS), key="k_c_compensate",
                              persist_state="session", format_func=lambda name: auto_label(name, cur.ratio),
                              disabled=busy or not refinable or not refine,
                              help=help_of(Settings, "compensate") + ". A dense matrix keeps its size: no parameter "
                                   "is added.")
tune = c_tune.checkbox("Also tune each block (AdamW)", key="k_c_tune", persist_state="session",
                       disabled=busy or not refinable or not refine,
                       help="Block-level training (AA-SVD's second stage): after the refit, AdamW with a warm-up and "
                            "cosine decay on every parameter of the block (factors, dense matrices, norms) towards the "
                            "original block's outputs, kept only where it lowers the held-out error. Each epoch costs "
                            "about three block passes per window: on a CPU, a few epochs; AA-SVD trains 25.")
with st.expander("Tuning options"):  # block tuning's own options (refine/choices.TuneConfig), from their knobs
    tuning = ui.options_box("tune", cur.tune, "k_c_", disabled=busy or not refinable or not (refine and tune),
                            columns=3)
with st.expander("Distillation after the build"):  # end-to-end distillation's options (refine/choices.DistillConfig)
    st.caption("The built model trained (what \"Trains\" picks: its low-rank factors and norms by default), end to "
               "end, to give the original's next-token distribution on the calibration windows, and on windows of "
               "text the original writes itself if you ask for some (written once, then cached); the epoch with the "
               "lowest KL on held-out calibration windows is kept (0: the build itself). Each epoch costs about four "
               "model passes a window, with the whole model on one device. 0 epochs: off."
               + (" This model is offloaded, so it cannot be distilled here." if lm.offloaded else ""))
    distilling = ui.options_box("distill", cur.distill, "k_c_", disabled=busy or lm.offloaded, columns=3)
if cur.distill != distilling:
    s.settings = cur = replace(cur, distill=distilling)
if refinable and (cur.compensate, cur.tune) != (compensate, tuning):  # both read by refined builds only
    s.settings = cur = replace(cur, compensate=compensate, tune=tuning)
wanted = next(c.name for c in REFINE_CHOICES.values() if c.refits == refine and c.tunes == (refine and tune))
if refinable and cur.refine != wanted:
    s.settings = cur = replace(cur, refine=wanted)
if strategy(cur.allocation).unrefined_note and not refines(cur.refine):
    st.info(strategy(cur.allocation).unrefined_note, icon=":material/info:")
if refines(cur.refine) and (advice := calibration_advice(bench.n_windows, bench.seqlen, bench.timings_s)):
    st.warning(advice, icon=":material/data_thresholding:")
if s.result is not None and not s.result_is_current:
    st.warning("The compressed model below was built for other settings; build again to use the current ones.",
               icon=":material/sync_problem:")
if st.button("Build compressed model", type="primary", disabled=busy):
    if bench.quick_build(cur):  # only a slice and a surgery: in this run, the result shows below at once
        ui.run_here("Building the compressed model", build)
    else:
        ui.start("Building the compressed model", build)

if s.result is not None and s.params is not None:
    p, a = s.params, s.result.allocation
    # One markdown table, not four st.metric elements: in the browser those took 35-50 ms more to appear after
    # a 0.3 s build (issue 9, bench/RESULTS.md "App against CLI").
    st.markdown("| Realized ratio (targeted) | Targeted parameters | Whole model | Whole-model reduction |\n"
                "|---|---|---|---|\n"
                f"| **{a.ratio_realized:.4f}** (target: {describe_ratio(a.ratio_target)}) "
                f"| **{ui.fmt_params(p['targeted_after'])}** from {ui.fmt_params(p['targeted_before'])} "
                f"| **{ui.fmt_params(p['total_after'])}** from {ui.fmt_params(p['total_before'])} "
                f"| **{100 * p['whole_model_reduction']:.1f}%** (embeddings and lm_head are kept) |")
    if "storage" in s.result.info:  # Dobi-SVD: the budget is in bytes against the 16-bit dense weights
        st_ = s.result.info["storage"]
        st.caption(f"Storage of the targeted matrices: {binary_size(st_['targeted_bytes_after'])} from "
                   f"{binary_size(st_['targeted_bytes_before_16bit'])} at 16 bits"
                   + (" (8-bit factors with per-vector scales)" if st_["remap"] else "")
                   + f"; the trained gammas alone reached ratio {s.result.info['ratio_trained']:.4f}.")
        if s.result.info.get("note"):
            st.warning(s.result.info["note"], icon=":material/info:")
    refined = s.result.info.get("refine")
    st.caption(f"Built with {s.result.settings.method} + {s.result.settings.allocation} at "
               f"{describe_ratio(s.result.settings.ratio)}"
               + (f", {summary(refined)}" if refined else "")
               + (f", {distilled_summary(s.result.info['distill'])}" if "distill" in s.result.info else "")
               + f"; surgery {s.result.timings_s.get('surgery', 0):.2f} s.")
    if refined and refined.get("blocks"):
        with st.expander("Refine, block by block"):
            n_held = len(refined["held_windows"])
            st.caption(f"Each block's factored matrices were refitted on the calibration windows but {n_held} of "
                       f"{n_held + refined['fit_windows']} held out (every fourth), and kept only where that brought "
                       "the block's output closer to the original's on the held-out windows; elsewhere the block keeps its "
                       "unrefined factors. Gain: how much lower the held-out error of the block (or the matrix) "
                       "is than unrefined. Damping: the ridge towards the unrefined factors chosen for the matrix.")
            st.dataframe(refine_table(refined), hide_index=True)

st.subheader("Perplexity")
c1, c2, c3 = st.columns([2, 2, 1])
ui.seed("k_ev_sets", [x for x in d["eval"] if x in SOURCES])
ui.seed("k_ev_path", next((x for x in d["eval"] if x not in SOURCES), ""))
ui.seed("k_ev_tokens", d["eval_tokens"])
sets = c1.multiselect("Datasets", list(SOURCES), key="k_ev_sets", persist_state="session", disabled=busy,
                      help="wiki: the held-out half of the Wikipedia extract; news: out of domain")
extra = c2.text_input("Also a local .txt or .jsonl file", key="k_ev_path",
                      persist_state="session", disabled=busy).strip()
tokens = c3.number_input("Tokens per dataset", 64, 1_000_000, step=1024, key="k_ev_tokens",
                         persist_state="session", disabled=busy)
datasets = sets + ([extra] if extra else [])


def evaluate(job):
    config = (int(tokens), bench.seqlen)
    if s.ppl.get("config") != config:
        s.ppl = {"config": config}
    todo = [(kind, model) for kind, model in (("original", lm.model), ("compressed", s.result and s.result.model))
            if model is not None]
    for i, name in enumerate(datasets):
        windows = bench.eval_windows(name, int(tokens))
        for j, (kind, model) in enumerate(todo):
            if name in s.ppl.get(kind, {}) and kind == "original":
                continue
            step = (i * len(todo) + j) / (len(datasets) * len(todo))
            s.ppl.setdefault(kind, {})[name] = perplexity(
                model, windows, progress=lambda f, m: job.progress(step + f / (len(datasets) * len(todo)),
                                                                   f"{kind} on {name}: {m}"))


label = "Evaluate original and compressed" if s.result is not None else "Evaluate the original"
if st.button(label, disabled=busy or not datasets):
    ui.start("Evaluating perplexity", evaluate)
rows = ppl_rows(s.ppl)
if rows:
    st.table(pd.DataFrame(rows).style.format({"original": "{:,.2f}", "compressed": "{:,.2f}",
                                              "compressed / original": "{:.3f}×"}, na_rep="–"),
             border="horizontal", hide_index=True)
    st.caption(f"exp(mean next-token NLL) over the first {s.ppl['config'][0]:,} tokens of each set, in "
               f"non-overlapping windows of {s.ppl['config'][1]} tokens.")
    built = s.result.settings if s.result is not None else cur
    if verdict := quality_verdict(s.ppl, built, bench.n_windows * bench.seqlen, lm.offloaded):
        helps = "".join(f"\n- {h}" for h in verdict["help"])
        with st.container(border=True, key="verdict"):
            st.markdown(f":{verdict['color']}[:material/speed: **{verdict['words']}**]"
                        + (f" What would most likely help:{helps}" if helps else ""))

st.subheader("Perplexity against ratio")
large = sum(t.params for t in lm.targets) >= LARGE_MODEL_PARAMS
grid = [0.1, 0.2, 0.3, 0.4, 0.5] if large else [0.05, 0.1, 0.15, 0.2, 0.3]
c1, c2, c3 = st.columns([2, 2, 1])
ui.seed("k_sw_methods", [m for m in ("svd-llm", "dipsvd") if m in grid_names()])
built_ratio = s.result.settings.ratio if s.result is not None else cur.ratio
ui.follow_default("k_sw_ratios", sorted(set(grid[:3]) | {built_ratio}))  # the ratio built, until the user picks
methods = c1.multiselect("Methods", list(grid_names()), key="k_sw_methods", persist_state="session", disabled=busy,
                         help="dobi and dobi-remap (8-bit factors) train once per ratio: minutes each on a CPU")
ratios = c2.multiselect("Ratios removed", sorted(set(grid + [cur.ratio, built_ratio])), key="k_sw_ratios",
                        persist_state="session",
                        disabled=busy)
sweep_set = c3.selectbox("Dataset", datasets or ["wiki"], key="k_sw_set", persist_state="session", disabled=busy)
with_refined = st.checkbox("Also refined rows (sequential compensation, one more pass per point)", key="k_sw_refine",
                           persist_state="session",
                           disabled=busy)
# A search (BO) per point is too slow and a method's own allocation (Dobi-SVD's) is not shared: the rows then use
# the fallback (uniform). remap belongs to the dobi-remap rows only; refine to the "+refine" rows.
base = replace(cur, allocation=strategy(cur.allocation).shared(), dobi=replace(cur.dobi, remap=False), refine="none")


def row_allocation(method: str) -> str:
    own = handler(resolve(method)[0])
    return own.default_allocation if own.trains_ranks else base.allocation


def sweep(job):
    class Cancelled(Exception):
        pass

    def on_row(report):
        if job.cancel.is_set():
            raise Cancelled
        s.sweep = {"dataset": sweep_set, "report": report, "allocation": base.allocation}

    sets = {sweep_set: bench.eval_windows(sweep_set, int(tokens))}
    factored = [m for m in methods if not handler(resolve(m)[0]).trains_ranks]
    in_memory = [spec for spec in (replace(base, method=m).spec for m in factored) if bench.factor_cache.has(spec)]
    try:
        grid = [(m, row_allocation(m)) for m in methods]
        if with_refined:
            grid += [(m, row_allocation(m) + REFINED) for m in methods if handler(resolve(m)[0]).refinable]
        run_sweep(bench, base, grid, sorted(ratios), sets, job.progress, on_row)
    except Cancelled:
        pass
    finally:
        for spec in in_memory:  # the sweep frees each method's factors; reload what the other pages had (disk cache)
            bench.factors(spec)


if st.button("Run sweep", disabled=busy or not methods or not ratios,
             help="Each method is factored once; every ratio then only slices its factors and evaluates."):
    ui.start("Sweeping ratios", sweep, cancellable=True)
if s.sweep:
    st.plotly_chart(figures.ppl_vs_ratio(sweep_curves(s.sweep["report"], s.sweep["dataset"]),
                                         s.sweep["report"]["original_ppl"][s.sweep["dataset"]], s.sweep["dataset"]),
                    key="fig_sweep")
    st.caption(f"Each point is a model built from cached factors with the {s.sweep['allocation']} allocation "
               "(Dobi-SVD: its trained ranks; with remap the ratio is counted in bytes against 16-bit weights) "
               "and evaluated on the same windows; the dotted line is the original model.")

st.subheader("Speed")
if st.button("Measure prefill and decode speed", disabled=busy or s.result is None):
    def measure(job):
        job.progress(0.0, "original")
        original = speed(lm.model)
        job.progress(0.5, "compressed")
        s.speed = {"original": original, "compressed": speed(s.result.model)}

    ui.start("Measuring speed", measure)
if s.result is None:
    st.caption("Build the compressed model to compare speeds.")
if s.speed:
    m = st.columns(4)
    o, c = s.speed["original"], s.speed["compressed"]
    m[0].metric("Prefill, original", f"{o['prefill_tok_s']:.0f} tok/s")
    m[1].metric("Prefill, compressed", f"{c['prefill_tok_s']:.0f} tok/s")
    m[2].metric("Decode, original", f"{o['decode_tok_s']:.1f} tok/s")
    m[3].metric("Decode, compressed", f"{c['decode_tok_s']:.1f} tok/s")
    st.caption("Prefill: one 256-token forward pass; decode: 32 single-token steps with a KV cache; best of two.")

st.subheader("Zero-shot accuracy (lm-evaluation-harness)")
task_limit = st.number_input("Documents", 20, 200, step=20, key="k_lm_limit", persist_state="session", disabled=busy,
                             help=f"of the local task {LOCAL_TASK}: after 24 words of a held-out wiki sentence, "
                                  "pick its true next six words among four; scored by log-likelihood")
if st.button("Score with lm-eval", disabled=busy or s.result is None):
    def score(job):
        job.progress(0.0, "original")
        original = lm_eval_accuracy(lm.model, lm.tokenizer, [LOCAL_TASK], int(task_limit))
        job.progress(0.5, "compressed")
        s.lm_eval = {"original": original, "compressed": lm_eval_accuracy(s.result.model, lm.tokenizer,
                                                                         [LOCAL_TASK], int(task_limit))}

    ui.start("Scoring with lm-eval", score)
if s.lm_eval:
    st.dataframe([{"model": side, "task": task, "accuracy": round(r["acc"], 4), "± standard error":
                   round(r["acc_stderr"], 4), "documents": r["n"]}
                  for side, tasks in s.lm_eval.items() for task, r in tasks.items()], hide_index=True)
    st.caption("Chance is 0.25. Online, `python -m dipsvd_core evaluate --tasks arc_easy,hellaswag` scores hub tasks.")
