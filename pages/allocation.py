"""Page 3: settings of the compression and a live preview of the per-block allocation."""
import time
from dataclasses import replace

import streamlit as st

from dipsvd_core.allocation import allocators
from dipsvd_core.allocation.budget import describe_ratio
from dipsvd_core.allocation.importance import RANKS_OF
from dipsvd_core.allocation.probes import probe_of
from dipsvd_core.allocation.strategies import names_for, strategy
from dipsvd_core.common.errors import DipSVDError
from dipsvd_core.common.knobs import help_of
from dipsvd_core.common.options import option_group
from dipsvd_core.engine import passes as P
from dipsvd_core.methods.handlers import handler, method_names, refines
from dipsvd_core.methods.settings import Settings, flat_settings, settings_dict
from dipsvd_core.outputs import figures
from dipsvd_core.outputs.inspection import budget, dobi_preview, q_ties
from dipsvd_core.refine.sequential import calibration_advice
from dipsvd_core.run import steps
from studio import ui

METHOD_HELP = "; ".join(f"{m}: {handler(m).help}" for m in method_names())

s = ui.need_model()
bench, busy = s.bench, ui.busy()
ui.header("Allocation", "How much each block keeps. Ratio, β, τ and the allocation only re-slice factors "
          "already in memory; the method and its own options (DipSVD's channel weight a, bar and whitening form) "
          "need a new factorization.")

cur = s.settings
for name, value in flat_settings(cur).items():
    ui.seed(f"k_s_{name}", value)

controls, view = st.columns([1, 2], gap="large")
with controls:
    ratio = st.slider("Target ratio removed", 0.0, 1.0, step=0.01, key="k_s_ratio",
                      persist_state="session", disabled=busy,
                      help="Fraction of the targeted parameters removed. Models under ~1B parameters start at "
                           "0.1: their spectra are flat, so 0.05 to 0.2 is the useful range.")
    st.markdown(f"**{describe_ratio(ratio)}**")
    # A method with its own allocation (Dobi-SVD) has exactly that one; the factor-based methods all the others.
    chosen_method = st.session_state.get("k_s_method", cur.method)
    names = names_for(chosen_method)
    if st.session_state.get("k_s_allocation") not in names:  # to or from Dobi-SVD: the method's own allocation
        own_allocation = handler(chosen_method).default_allocation
        st.session_state["k_s_allocation"] = own_allocation if own_allocation in names else names[0]
    allocation = st.radio("Allocation", names, key="k_s_allocation",
                          persist_state="session", horizontal=True, disabled=busy)
    st.caption(strategy(allocation).help)
    with st.container(border=True):
        st.markdown("**Local importance** · changes refactor")
        method = st.selectbox("Method", list(method_names()), key="k_s_method", persist_state="session", disabled=busy,
                              help=METHOD_HELP)
    own = handler(method).options_name  # the method's own options (common/options.py), drawn from their knobs
    if own is not None:
        with st.container(border=True):
            st.markdown(f"**{own}'s options** · {option_group(own).redoes}")
            own_options = ui.options_box(own, getattr(cur, own), "k_s_", busy)
    with st.container(border=True):
        st.markdown("**Global importance** · instant")
        beta = st.slider("β (Fisher vs effective rank)", 0.0, 1.0, step=0.05, key="k_s_beta",
                         persist_state="session", disabled=busy)
        tau = st.slider("τ (effective-rank energy)", 0.5, 0.999, step=0.005, key="k_s_tau",
                        persist_state="session", format="%.3f",
                        disabled=busy)
        energy = st.radio("Energy", ["sigma2", "sigma"], key="k_s_energy",
                          persist_state="session", horizontal=True, disabled=busy,
                          help=help_of(Settings, "energy"))
        rank_of = st.radio("Effective rank of", list(RANKS_OF), key="k_s_rank_of",
                           persist_state="session", horizontal=True, disabled=busy,
                           help=help_of(Settings, "rank_of"))
    with st.expander("Bounds and Bayesian optimization"):
        p_min = st.number_input("p_min (lowest keep ratio of a block)", 0.01, 1.0, step=0.01, key="k_s_p_min",
                                persist_state="session",
                                disabled=busy)
        p_max = st.number_input("p_max (highest; 1 lets a block stay dense)", 0.01, 1.0, step=0.01,
                                key="k_s_p_max", persist_state="session", disabled=busy)
        bo_calls = st.number_input("BO calls", 5, 500, step=5, key="k_s_bo_calls",
                                   persist_state="session", disabled=busy)
        bo_objective = st.radio("BO objective", ["ppl", "cosine"], key="k_s_bo_objective",
                                persist_state="session", horizontal=True,
                                disabled=busy, help=help_of(Settings, "bo_objective"))
        bo_windows = st.number_input("BO held-out windows", 1, 64, step=1, key="k_s_bo_windows",
                                     persist_state="session", disabled=busy)

new = replace(cur, method=method, allocation=allocation, ratio=float(ratio), p_min=float(p_min), p_max=float(p_max),
              beta=float(beta), tau=float(tau), energy=energy, rank_of=rank_of, bo_calls=int(bo_calls),
              bo_objective=bo_objective, bo_windows=int(bo_windows), **({own: own_options} if own else {}),
              # Refine (the Compress page's box) is off for a method it cannot refit; the box puts it back, and
              # coming back from such a method, refine is the new method's own
              refine=(cur.refine if handler(cur.method).refinable else handler(method).default_refine)
              if handler(method).refinable else "none")
s.settings = new
if not handler(method).refinable:
    st.session_state.pop("k_c_refine", None)  # the Compress page's box, kept across pages, follows: seeded off

with view:
    try:
        new.check()
    except DipSVDError as e:
        st.error(str(e), icon=":material/error:")
        st.stop()
    if busy:
        st.info("The preview resumes when the running step finishes.")
        st.stop()

    if P.TRAINING in handler(new.method).needs(new):
        if not steps.done(bench, P.TRAINING, new):
            st.info(f"Dobi-SVD trains one truncation position per matrix: {new.dobi.epochs} epoch(s) over "
                    f"{new.dobi.windows} calibration window(s), each step an SVD of every layer's activations "
                    "(about 12 s a step for the bundled model on 2 CPU cores). It can be cancelled.")

            def train(job):
                def callback(step, record):
                    job.records.append(record)

                trained = steps.run(bench, P.TRAINING, new, job.progress, callback, job.cancel)
                if trained.cancelled:
                    raise DipSVDError("Dobi-SVD training was cancelled; nothing was kept. Train again to use dobi")

            if st.button("Train truncation positions", type="primary"):
                ui.start("Dobi-SVD training", train, cancellable=True)
            st.stop()
        with ui.guard("The Dobi-SVD preview"):
            pre = dobi_preview(bench, new)
            m = st.columns(3)
            m[0].metric("Target ratio removed", f"{new.ratio:g}", f"{100 * (1 - new.ratio):.0f}% kept",
                        delta_color="off", delta_arrow="off")
            m[1].metric("Ratio the gammas reached", f"{pre['ratio_trained']:.4f}",
                        f"{pre['ratio_trained'] - new.ratio:+.4f} vs target", delta_color="off", delta_arrow="off")
            m[2].metric("Realized after the budget fix", f"{pre['allocation'].ratio_realized:.4f}",
                        "bytes vs 16-bit" if new.dobi.remap else "parameters", delta_color="off", delta_arrow="off")
            st.plotly_chart(figures.keep_ratios(pre["allocation"].p_blocks, pre["uniform"], "trained"), key="fig_keep")
            st.caption("Bars: the share of each block's 16-bit bytes kept by the trained ranks; dashed: uniform at "
                       "the same budget." + (" With remap a rank costs half, so ranks are about twice as high."
                                             if new.dobi.remap else ""))
            st.plotly_chart(figures.dobi_training(pre["history"]), key="fig_dobi")
            st.caption("Training: next-token loss with every layer's activations truncated at its gamma, and the "
                       "total loss with λ·|ratio − target|.")
        st.stop()

    have_factors = bench.factor_cache.has(new.spec)
    chosen_strategy = strategy(new.allocation)
    # every pass these settings still need (the declared needs), each with its button; the ones the allocation
    # itself reads stop the preview until they have run
    todo = [p for p in steps.missing(bench, new) if p in P.ASK]

    def run_pass(step, progress):
        steps.run(bench, step, new, progress)
        if step == P.FISHER:
            s.fisher = bench.fisher()

    if len(todo) > 1:  # one click for them all (the default nested allocation needs three), each still on its own

        def run_all(job, todo=tuple(todo)):
            for i, step in enumerate(todo):
                part = P.ASK[step][2]
                run_pass(step, lambda f, msg="", i=i, part=part: job.progress(
                    (i + f) / len(todo), f"{i + 1}/{len(todo)} {part}" + (f": {msg}" if msg else "")))

        if st.button(f"Run all {len(todo)} passes ({', '.join(todo)})", type="primary"):
            ui.start(f"The {len(todo)} passes of the {new.allocation} allocation", run_all)
    for i, step in enumerate(todo):
        what, button, title = P.ASK[step]
        if step == P.FACTORS:
            st.warning(f"No factors yet for method {new.method}{handler(new.method).describe(new)}: {P.COST[step]}.",
                       icon=":material/calculate:")
        else:
            st.warning(f"The {new.allocation} allocation needs {what}: {P.COST[step]}"
                       + (f" (truncated to {100 * allocators.PROBE_KEEP:.0f}% of its parameters, {new.bo_windows} "
                          "held-out windows); after that, every ratio is instant." if probe_of(step) else "."),
                       icon=":material/calculate:")

        def run(job, step=step):
            run_pass(step, job.progress)

        if st.button(button, type="primary" if i == 0 and len(todo) == 1 else "secondary"):
            ui.start(title, run)
    # a path meant to be refined (refine on, or an allocation that is meant to be): say when the calibration is small
    if (refines(new.refine) or chosen_strategy.unrefined_note) and \
            (advice := calibration_advice(bench.n_windows, bench.seqlen, bench.timings_s)):
        st.warning(advice, icon=":material/data_thresholding:")
    if any(p in chosen_strategy.needs for p in todo):
        st.stop()

    with ui.guard("The allocation preview"):
        t0 = time.perf_counter()
        uniform = bench.allocate(replace(new, allocation="uniform"))
        searched = not chosen_strategy.reproducible  # a search (bayes): run on request, its result kept
        if searched:
            chosen = s.bo_allocation(new)
            refining = chosen_strategy.search_refines  # refined-kl: a refine pass per candidate, scored by KL
            calls = refining or new.bo_calls
            title = f"The {new.allocation} search" if refining else "Bayesian optimization"
            if chosen is None:
                st.info((f"The {new.allocation} search refines each of its {calls} candidate allocations once (a "
                         f"refine pass each) and keeps the one whose refined model is closest to the original by "
                         f"KL on {new.bo_windows} held-out windows. " if refining else
                         f"Bayesian optimization runs {new.bo_calls} evaluations of the {new.bo_objective} "
                         "objective, each on a model sliced from the cached factors. ")
                        + "It can be cancelled; the best allocation so far is kept.")

                def run_bo(job):
                    def callback(i, value, best):
                        job.values.append(float(value))
                        job.best.append(float(best))
                        job.progress(i / calls, f"call {i}/{calls}, best {best:.4g}")

                    result = bench.allocate(new, progress=job.progress, callback=callback, cancel=job.cancel)
                    s.bo = {"settings": settings_dict(new), "allocation": result, "cancelled": job.cancelled}

                if st.button(f"Run {title[0].lower() + title[1:]}" if refining else "Run Bayesian optimization",
                             type="primary"):
                    ui.start(title, run_bo, cancellable=True)
                chosen = uniform
        else:
            chosen = bench.allocate(new)
        loss = loss_u = None
        if have_factors:
            loss, loss_u = bench.probes.predicted_loss(new, chosen), bench.probes.predicted_loss(new, uniform)
        elapsed = time.perf_counter() - t0

        b = budget(bench.targets, chosen)
        m = st.columns(4)
        m[0].metric("Target ratio removed", f"{b['ratio_target']:g}", f"{100 * (1 - b['ratio_target']):.0f}% kept",
                    delta_color="off", delta_arrow="off")
        m[1].metric("Realized ratio", f"{b['ratio_realized']:.4f}",
                    f"{b['ratio_realized'] - b['ratio_target']:+.4f} vs target", delta_color="off", delta_arrow="off")
        m[2].metric("Targeted parameters", ui.fmt_params(b["targeted_after"]),
                    f"from {ui.fmt_params(b['targeted_before'])}", delta_color="off", delta_arrow="off")
        m[3].metric("Dense matrices", b["dense_matrices"], f"of {len(bench.targets)}", delta_color="off", delta_arrow="off")
        label = chosen.method if not searched or s.bo_allocation(new) is not None else "uniform"
        imp = bench.importance(new) if chosen_strategy.follows_q else None  # its Fisher has run: the preview needs it
        ties = q_ties(imp["R"], imp["S_norm"], imp["Q"], new.beta) if imp is not None else None
        st.plotly_chart(figures.keep_ratios(chosen.p_blocks, uniform.p_blocks, label, ties and ties["blocks"]),
                        key="fig_keep")
        st.caption("Bars: the fraction of each block's targeted parameters kept; dashed: the uniform allocation "
                   "at the same budget. Higher Q (or lower predicted loss gain) keeps more."
                   + (" Hatched: the blocks whose Q ties (below)." if ties else ""))
        if ties:
            st.info("**When Q ties.** " + ties["words"], icon=":material/balance:")
        if loss is not None:
            st.plotly_chart(figures.predicted_loss(loss, loss_u, label), key="fig_loss")
            st.caption("Predicted whitened loss per block: Σ over its matrices of L_m(k_m)², the energy of the "
                       "dropped singular values. Lower is better; it is exact in the whitened space.")
        if searched and s.bo is not None and s.bo_allocation(new) is not None:
            st.plotly_chart(figures.convergence(chosen.values, chosen.history, "KL" if refining else new.bo_objective,
                                                title, "candidate" if refining else "call"), key="fig_bo")
            st.caption(("KL of each candidate's refined model (uniform, heuristic, nested) and the best so far"
                        if refining else "Objective of each BO call and the best so far") +
                       (" (cancelled early)." if s.bo["cancelled"] else "."))
        st.caption(f"Preview computed in {elapsed * 1000:.0f} ms "
                   + ("from cached factors." if have_factors else
                      "from the allocation alone: the predicted loss appears once the matrices are factored."))
