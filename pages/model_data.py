"""Page 1: choose a model and calibration text, load it, collect statistics, see what is targeted."""
import dataclasses
import os

import pandas as pd
import streamlit as st
import torch

from dipsvd_core.common.errors import DipSVDError
from dipsvd_core.engine.data import CALIB_SOURCES as SOURCES
from dipsvd_core.model.models import DEFAULT_MODEL, DTYPES
from dipsvd_core.outputs.inspection import architecture, default_ratio, layer_rows
from dipsvd_core.plan import binary_size, memory_size, run_of
from dipsvd_core.run.pipeline import Settings, Workbench
from dipsvd_core.run.session import checked_plan
from studio import ui
from studio.jobs import settle_heap
from studio.state import defaults

KINDS = {"Bundled SmolLM2-135M": "bundled", "Hugging Face hub id": "hub", "Local folder": "folder",
         "GGUF file": "gguf"}
PATH = "a local .txt or .jsonl file"

s, busy, d = ui.studio(), ui.busy(), defaults()
ui.header("Model and data", "Pick the model to compress and the text it is calibrated on. Statistics "
          "(input Grams, channel importance, block outputs) are collected once and cached on disk.")

default_kind = ("Bundled SmolLM2-135M" if d["model"] == DEFAULT_MODEL else
                "GGUF file" if d["model"].endswith(".gguf") else
                "Local folder" if os.path.exists(d["model"]) else "Hugging Face hub id")
ui.seed("k_load_kind", default_kind)
ui.seed("k_load_spec", "" if d["model"] == DEFAULT_MODEL else d["model"])
ui.seed("k_load_calib", d["calib"] if d["calib"] in SOURCES else PATH)
ui.seed("k_load_calib_path", "" if d["calib"] in SOURCES else d["calib"])
ui.seed("k_load_windows", d["calib_windows"])
ui.seed("k_load_seqlen", d["seqlen"])

left, right = st.columns(2, gap="large")
with left:
    st.subheader("Model")
    kind = KINDS[st.radio("Source", list(KINDS), key="k_load_kind",
                          persist_state="session", horizontal=True, disabled=busy)]
    spec = DEFAULT_MODEL
    if kind != "bundled":
        hint = {"hub": "e.g. HuggingFaceTB/SmolLM2-135M (needs the hub or its local cache)",
                "folder": "a folder saved by save_pretrained (holds config.json)",
                "gguf": "path to a .gguf file"}[kind]
        spec = st.text_input("Model", key="k_load_spec",
                             persist_state="session", placeholder=hint, disabled=busy).strip()
    c1, c2 = st.columns(2)
    device = c1.selectbox("Device", ["auto", "cpu", "cuda"], key="k_load_device",
                          persist_state="session", disabled=busy)
    dtype = c2.selectbox("Dtype", ["auto", *DTYPES], key="k_load_dtype", persist_state="session", disabled=busy,
                         help="auto: float32 on CPU, bfloat16 on a GPU")
    has_gpu = torch.cuda.is_available() and device != "cpu"
    c3, c4 = st.columns(2)  # a row of their own: in four narrow columns the checkbox labels were cut off
    offload = c3.checkbox("Offload", key="k_load_offload", persist_state="session", disabled=busy,
                          help="For a model bigger than the memory budgets: as many blocks as the GPU budget leaves "
                               "room for beside the plan's working set stay on the GPU, as many of the others as the "
                               "host budget holds wait in host memory, the rest on disk; every pass brings each block "
                               "to the GPU once. On the CPU the blocks the host budget does not hold stay on disk.")
    trust = c4.checkbox("Trust remote code", key="k_load_trust", persist_state="session", disabled=busy,
                        help="Only for hub models that ship their own code, and only if you trust it")
    budgets, bad_budget = {}, None
    if offload:
        b1, b2 = st.columns(2)
        for col, what, label, example in ((b1, "device", "GPU memory budget", "22GiB"),
                                          (b2, "host", "Host memory budget", "64GiB")):
            text = col.text_input(label, key=f"k_load_{what}_memory",
                                  persist_state="session", placeholder=f"what is free now, e.g. {example}",
                                  disabled=busy or (what == "device" and not has_gpu))
            if text.strip():
                try:
                    budgets[what] = memory_size(text)
                except DipSVDError as e:
                    bad_budget = f"{label}: {e}"
    ui.device_panel(device)
with right:
    st.subheader("Calibration text")
    calib = st.selectbox("Source", [*SOURCES, PATH], key="k_load_calib", persist_state="session", disabled=busy,
                         help="mix (the default): wiki-chat, wiki and news's calibration half, 2 : 1 : 1 by windows; on text "
                              "none of them holds it compressed better than wiki-chat alone. wiki-chat: the first "
                              "half of gensim's Wikipedia extract, every other passage framed as a chat turn in the "
                              "model's chat template. wiki: the same text, plain (offline). news: gensim's news corpus. "
                              "wikitext2, ptb, c4 need the hub or a local datasets cache.")
    if calib == PATH:
        calib = st.text_input("Path", key="k_load_calib_path",
                              persist_state="session", placeholder="/path/to/text.txt", disabled=busy).strip()
    c1, c2, c3 = st.columns(3)
    n_windows = c1.number_input("Windows", min_value=1, max_value=4096, step=1, key="k_load_windows",
                                persist_state="session", disabled=busy)
    seqlen = c2.number_input("Tokens per window", min_value=8, max_value=8192, step=64, key="k_load_seqlen",
                             persist_state="session",
                             disabled=busy)
    seed = c3.number_input("Seed", min_value=0, step=1, key="k_load_seed", persist_state="session", disabled=busy)
    st.caption(f"{n_windows} × {seqlen} = {n_windows * seqlen:,} calibration tokens, cut without padding.")


# The plan for these choices: the default method (dipsvd) and the app's evaluation sizes, with the
# original kept beside the compressed copy. Shown on request (reading a GGUF's config takes seconds on a
# first start); the load job always checks it first and refuses a run that does not fit.
run = {"method": "dipsvd", "calib": calib, "calib_windows": int(n_windows), "seqlen": int(seqlen), "dtype": dtype,
       "eval_tokens": d["eval_tokens"], "eval_sets": max(1, len(d["eval"])), "offload": bool(offload),
       "inplace": False}
if st.toggle("Show the plan: predicted memory, disk and time of each phase", key="k_plan_show",
             persist_state="session", disabled=busy) \
        and (kind == "bundled" or spec):
    plan = ui.plan_of(spec or "", device, run, trust, budgets=budgets)
    if "error" in plan:
        st.caption(f"No plan: {plan['error']}")
    else:
        timed = ui.plan_of(spec or "", device, run, trust, True, budgets) if st.session_state.get("k_plan_timed") \
            else plan
        rows = [{"phase": n, "host": binary_size(p["host_bytes"]), "device": binary_size(p["device_bytes"]),
                 "disk": binary_size(p["disk_bytes"]),
                 "time": "" if timed["phases"][n]["seconds"] is None else f"{timed['phases'][n]['seconds']:.0f} s",
                 "needed": "yes" if p["needed"] else "no (not for these settings)"}
                for n, p in plan["phases"].items()]
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
        st.caption(f"Peak host {binary_size(plan['peak_host_bytes'])}, device "
                   f"{binary_size(plan['peak_device_bytes'])}, disk {binary_size(plan['disk_bytes'])}; "
                   "from the config alone, with the original kept beside the compressed copy. "
                   + " ".join(timed.get("notes", [])))
        st.checkbox("Predict the time (a few seconds' microbenchmark on this device)", key="k_plan_timed",
                    persist_state="session",
                    disabled=busy)


def load(job):
    job.progress(0.0, "planning: will it fit?")
    plan = checked_plan(spec or "", device, run_of(**run), trust, budgets, override="use the CLI's --ignore-plan",
                        unreadable_to_loader=True)
    blocks = None if plan is None or plan.placement is None else dataclasses.astuple(plan.placement)
    lm = ui.load_lm(spec or "", device, dtype, trust, bool(offload), blocks, _progress=job.progress)
    job.progress(0.05, "cutting calibration windows")
    bench = Workbench(lm, calib, int(n_windows), int(seqlen), int(seed))
    bench.windows()
    bench.stats(job.progress)
    s.forget_model()
    s.lm, s.bench = lm, bench
    s.settings = Settings(ratio=default_ratio(lm), seed=int(seed))
    s.settings_version += 1
    settle_heap()  # the model's objects are here to stay: later collections need not walk them


if st.button("Load model and collect statistics", type="primary", disabled=busy):
    if bad_budget:
        st.error(bad_budget, icon=":material/error:")
    elif kind != "bundled" and not spec:
        st.error("Enter a model: a hub id, a local folder or a .gguf path; or pick the bundled SmolLM2.", icon=":material/error:")
    elif not calib:
        st.error("Enter the path of a .txt or .jsonl calibration file, or pick a named source.", icon=":material/error:")
    else:
        ui.start("Loading the model and collecting statistics", load)

if s.lm is not None and s.bench is not None:
    lm, bench = s.lm, s.bench
    info = architecture(lm)
    st.divider()
    st.subheader(f"{info['architecture']} · {lm.spec}")
    if lm.from_gguf:
        st.info("These weights were dequantized from a quantized GGUF file (the bundled SmolLM2 is 4-bit): "
                "the 'original' model here is that dequantized copy.", icon=":material/info:")
    m = st.columns(5)
    m[0].metric("Decoder blocks", info["blocks"])
    m[1].metric("Targeted Linears", info["targeted_linears"])
    m[2].metric("Total parameters", ui.fmt_params(info["total_params"]))
    m[3].metric("Targeted parameters", ui.fmt_params(info["targeted_params"]),
                f"{100 * info['targeted_share']:.0f}% of the model", delta_color="off", delta_arrow="off")
    m[4].metric("Calibration tokens", f"{bench.n_windows * bench.seqlen:,}",
                f"statistics {bench.timings_s.get('statistics', 0):.1f} s", delta_color="off", delta_arrow="off")
    st.caption(f"Loaded from `{info['source']}` on {info['device']} in {info['dtype']} "
               f"({lm.load_seconds:.1f} s). Embeddings and lm_head are never compressed."
               + (f" Offloaded: {info['offload']}; each pass brings every block to the device once." if lm.offloaded
                  else ""))
    st.dataframe(layer_rows(lm), hide_index=True, width="stretch")
