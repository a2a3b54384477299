"""Page 6: save the compressed model, download the report and the allocation."""
import json

import streamlit as st

from dipsvd_core.io.report import build_words, compression_report
from dipsvd_core.methods.settings import settings_dict
from dipsvd_core.outputs.html_report import report_figures, report_html
from dipsvd_core.outputs.inspection import allocation_rows, to_csv
from dipsvd_core.run.session import save_run
from studio import ui

s = ui.need_model()
lm, bench, busy = s.lm, s.bench, ui.busy()
ui.header("Export", "Save the compressed model as safetensors (it reloads with `python -m dipsvd_core evaluate "
          "--model FOLDER`, and in plain transformers with trust_remote_code=True), and download the report (JSON, "
          "or one HTML file to send) and the per-matrix allocation.")

if s.result is None:
    st.info("Build a compressed model on Compress and evaluate first.")
    st.page_link("pages/compress.py", label="Go to Compress and evaluate", icon=":material/arrow_forward:")
    st.stop()

res = s.result
st.markdown(f"Compressed model: **{build_words(settings_dict(res.settings))}** (realized ratio "
            f"{res.allocation.ratio_realized:.4f}).")
if not s.result_is_current:
    st.warning("The settings changed since this model was built; the export is of the model as built.", icon=":material/sync_problem:")

rep = compression_report(lm, bench, res, s.params, {k: v for k, v in s.ppl.items() if k in ("original", "compressed")}, s.speed,
             s.generations["columns"] if s.generations else None)
if s.lm_eval:
    rep["lm_eval"] = s.lm_eval
c1, c2, c3 = st.columns(3)
c1.download_button("Download report (JSON)", json.dumps(rep, indent=2, default=str), "dipsvd-report.json",
                   "application/json", width="stretch", key="dl_report")
c2.download_button("Download allocation (CSV)", to_csv(allocation_rows(lm, res.allocation)), "dipsvd-allocation.csv",
                   "text/csv", width="stretch", key="dl_alloc")
c3.download_button("Download report (HTML)", lambda: report_html(rep, report_figures(bench, res)), "dipsvd-report.html",
                   "text/html", width="stretch", key="dl_html",
                   help="One file that opens offline: the settings, the plots, perplexity, speed and the generations")

st.subheader("Save the compressed model")
folder = st.text_input("Folder", key="k_ex_folder", persist_state="session", placeholder="e.g. out/smollm2-dipsvd-0.1",
                       disabled=busy).strip()
force = st.checkbox("Replace the folder if it exists and is not empty", key="k_ex_force",
                    persist_state="session", disabled=busy)
confirmed = True
if force:
    confirmed = st.checkbox(f"Yes, delete what is in {folder or 'that folder'} and write the model there",
                            key="k_ex_confirm", persist_state="session", disabled=busy)


def save(job):
    job.progress(0.1, f"writing {folder}")
    s.saved_to = save_run(res.model, folder, lm.tokenizer, rep, force=force)["saved_to"]


if st.button("Save", type="primary", disabled=busy or not folder or not confirmed):
    ui.start("Saving the compressed model", save)
if force and not confirmed:
    st.caption("Tick the confirmation to replace an existing folder.")
if s.saved_to:
    st.success(f"Saved to `{s.saved_to}`.", icon=":material/check_circle:")
