"""Page 2: what DipSVD protects. Channel importance inside layers, and which blocks matter most."""
import streamlit as st

from dipsvd_core.allocation.importance import HANDFUL, RANKS_OF, effective_ranks, energy_shares, rank_spectra
from dipsvd_core.outputs import figures
from dipsvd_core.outputs.inspection import (alpha_matrix, comparison_specs, input_groups, n_protected, rank_words,
                                            spectra)
from studio import ui

s = ui.need_model()
bench, busy, cur = s.bench, ui.busy(), s.settings
ui.header("Importance", "Local importance: which input channels of a layer carry the most energy (those get "
          "weight a in the whitening). Global importance: which decoder blocks are most sensitive (those keep more).")

# A key and a tracked state keep the open tab through the reruns a long step makes (its start, its end), so that
# a step started on a tab returns to it
tab_local, tab_global, tab_spectra = st.tabs(["Channel importance α", "Block importance S, R, Q",
                                              "Singular value spectra"], key="k_imp_tab", on_change="rerun")

with tab_local:
    groups = input_groups(s.lm, bench.stats())
    c1, c2 = st.columns([2, 1])
    group = c1.selectbox("Input group", list(groups), key="k_imp_group", persist_state="session",
                         help="Linears that read the same input share one Gram and one α")
    alpha = alpha_matrix(bench.stats(), groups[group])
    st.plotly_chart(figures.alpha_heatmap(alpha, group), key="fig_alpha_heat")
    st.caption("α_j = ‖G[:, j]‖₂, the L2 norm of column j of the input Gram (paper Eq. 1), per block and input "
               "channel, log colour scale. A few bright channels per block are the outliers DipSVD protects.")
    block = c2.number_input("Block", 0, alpha.shape[0] - 1, key="k_imp_block", persist_state="session")
    n_top = n_protected(alpha.shape[1], cur.dipsvd.bar)
    st.plotly_chart(figures.sorted_alpha(alpha[block], n_top, block, group), key="fig_alpha_sorted")
    st.caption(f"The same α for block {block}, sorted. The top bar = {cur.dipsvd.bar:g} fraction ({n_top} of "
               f"{alpha.shape[1]} channels, left of the dashed line) is scaled by a = {cur.dipsvd.weight:g} in the "
               "whitening. Change bar and a on the Allocation page.")

with tab_global, ui.guard("Block importance"):
    imp = bench.importance(cur) if s.fisher is not None else None  # S, R and Q from one call
    R = imp["R"] if imp is not None else effective_ranks(rank_spectra(bench.stats(), cur.rank_of), cur.tau, cur.energy)
    st.plotly_chart(figures.per_block(R, f"Effective rank R_l (τ = {cur.tau:g}, {cur.energy} energy, of the "
                                         f"{cur.rank_of} spectrum)", "R_l", color=figures.GREEN), key="fig_rank")
    st.caption("R_l: the fewest singular directions of block l's output holding a τ share of its energy. A "
               f"higher effective rank means the block's output is richer. Taken {RANKS_OF[cur.rank_of][0]} "
               "(the setting 'Effective rank of' on the Allocation page).")
    shares = energy_shares(bench.stats().block_energy, HANDFUL)
    st.plotly_chart(figures.energy_shares(shares["top1"], shares["topk"], HANDFUL, cur.tau), key="fig_energy")
    st.caption(f"Where each block output's energy goes: the share of Σ‖h‖² in its largest hidden dimension and in "
               f"its {HANDFUL} largest (the diagonal of H^T H). Where the {HANDFUL} largest hold τ, R_l is at most "
               f"{HANDFUL}, whatever the rest of the output holds.")
    if words := rank_words(effective_ranks(rank_spectra(bench.stats()), cur.tau, cur.energy), shares, cur.tau):  # the paper's R_l
        st.warning(words + " 'Effective rank of: trimmed' on the Allocation page takes R_l with the massive "
                   "dimensions set aside (the paper's R_l stays the default).", icon=":material/warning:")
    if imp is None:
        st.info("Fisher sensitivity S_l needs one backward pass per calibration window.")

        def fisher(job):
            s.fisher = bench.fisher(job.progress)

        if st.button("Compute Fisher sensitivity", type="primary", disabled=busy):
            ui.start("Computing Fisher sensitivity", fisher)
    else:
        st.plotly_chart(figures.per_block(imp["S"], "Fisher sensitivity S_l", "S_l"), key="fig_fisher")
        st.caption("S_l: the sum over the block's matrices of ‖∇W‖_F / ‖W‖_F for the next-token loss on the "
                   "calibration windows. Higher means the loss reacts more to changing this block.")
        st.plotly_chart(figures.importance_q(imp["S_norm"], imp["R_norm"], imp["Q"], cur.beta), key="fig_q")
        st.caption(f"Q_l = S̃^β · R̃^(1-β) with β = {cur.beta:g} (as in the paper's Figure 2). The heuristic "
                   "allocation keeps more of blocks with higher Q. The paper's Alg. 4 'return S⁻¹' contradicts "
                   "its text; we follow the text.")

with tab_spectra:
    names = [t.name for t in bench.targets]
    name = st.selectbox("Matrix", names, key="k_imp_matrix", persist_state="session")
    specs = comparison_specs(cur)
    sig = spectra(bench, name, specs)
    missing = [label for label in specs if label not in sig]
    if sig:
        st.plotly_chart(figures.spectra(sig, name), key="fig_spectra")
        st.caption("Singular values of W (plain SVD), of W S with SVD-LLM whitening, and with DipSVD's channel-"
                   "weighted whitening. The faster a curve falls, the less a low rank loses; truncation at "
                   "rank k drops everything right of k.")
    if missing:
        st.info("Not factored yet: " + ", ".join(missing) + ". Each needs one SVD per matrix of the model.")

        def factor_missing(job):
            for i, label in enumerate(missing):
                bench.factors(specs[label], lambda f, m: job.progress((i + f) / len(missing), f"{label}: {m}"))

        if st.button("Factor " + ", ".join(label.split(" ")[0] for label in missing), disabled=busy):
            ui.start("Factoring for the spectra", factor_missing)
