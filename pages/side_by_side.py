"""Page 5: the same prompts through the original and the compressed model(s), side by side."""
from dataclasses import replace

import streamlit as st

from dipsvd_core.allocation.strategies import strategy
from dipsvd_core.engine.evaluate import DEFAULT_PROMPTS, generate
from dipsvd_core.io.report import build_words
from dipsvd_core.methods.handlers import handler, refines
from dipsvd_core.run.pipeline import settings_dict
from studio import ui
from studio.state import defaults

s = ui.need_model()
lm, bench, busy, cur = s.lm, s.bench, ui.busy(), s.settings
ui.header("Side by side", "Greedy generations from the original and the compressed model, with tokens per second.")

if s.result is None:
    st.info("Build a compressed model on Compress and evaluate first.")
    st.page_link("pages/compress.py", label="Go to Compress and evaluate", icon=":material/arrow_forward:")
    st.stop()

has_template = bool(getattr(lm.tokenizer, "chat_template", None))
ui.seed("k_sbs_prompts", list(DEFAULT_PROMPTS))
ui.seed("k_sbs_chat", has_template)
ui.seed("k_sbs_tokens", defaults()["new_tokens"])
c1, c2 = st.columns([3, 2], gap="large")
with c1:
    # pills, not a multiselect: every prompt stays visible in full, chosen or not
    chosen = st.pills("Prompts", DEFAULT_PROMPTS, selection_mode="multi", key="k_sbs_prompts",
                      persist_state="session", disabled=busy,
                      wrap=True) or []
    own = st.text_area("Your own prompts, one a line", key="k_sbs_own",
                       persist_state="session", disabled=busy, height=90)
with c2:
    new_tokens = st.slider("New tokens", 8, 256, step=8, key="k_sbs_tokens", persist_state="session", disabled=busy)
    chat = st.toggle("Use the chat template", key="k_sbs_chat",
                     persist_state="session", disabled=busy or not has_template,
                     help="For instruct models: wrap each prompt as a user turn" if has_template else
                     "This tokenizer has no chat template")
    extra = st.multiselect("Also at these ratios", [r for r in (0.05, 0.1, 0.15, 0.2, 0.3, 0.4)
                                                     if r != cur.ratio], key="k_sbs_ratios",
                           persist_state="session", disabled=busy,
                           help="Dobi-SVD trains its truncation positions once per ratio: minutes each on a CPU"
                           if handler(cur.method).trains_ranks else
                           "Extra compressed models from the same cached factors (a search's fallback allocation "
                           "when the current one is a search)"
                           + ("; each is refined as the built one is: a refine pass per ratio, minutes each on a "
                              "CPU at 32 x 512" if refines(s.result.settings.refine) else ""))
prompts = chosen + [line.strip() for line in own.splitlines() if line.strip()]


def run(job):
    current = s.result.settings
    alloc = strategy(current.allocation).rebuildable()  # a search (BO) is not rerun per ratio: its fallback
    more = {f"Compressed · {build_words(settings_dict(x))}": x
            for x in (replace(current, ratio=r, allocation=alloc) for r in extra)}
    runs = [("Original", lm.model), (f"Compressed · {build_words(settings_dict(current))}", s.result.model)]
    runs += [(label, None) for label in more]
    columns = {}
    for i, (label, model) in enumerate(runs):
        job.progress(i / len(runs), label)
        if model is None:  # an extra ratio: sliced from the cached factors
            model = bench.build(more[label]).model
        columns[label] = generate(model, lm.tokenizer, prompts, max_new_tokens=int(new_tokens), chat=chat)
    s.generations = {"prompts": prompts, "columns": columns, "settings": settings_dict(current), "chat": chat}


if st.button("Generate", type="primary", disabled=busy or not prompts):
    ui.start("Generating", run)
if not prompts:
    st.caption("Choose or write at least one prompt.")

g = s.generations
if g:
    labels = list(g["columns"])
    for i, prompt in enumerate(g["prompts"]):
        st.markdown(f"##### {prompt}")
        cols = st.columns(len(labels))
        for col, label in zip(cols, labels):
            row = g["columns"][label][i]
            with col.container(border=True):
                st.markdown(f"**{label}**")
                st.markdown(ui.verbatim(row["text"].strip())
                            or "*(no text: the model produced only whitespace or special tokens)*")
                st.caption(f"{row['new_tokens']} tokens · {row['tokens_per_s']:.1f} tok/s · "
                           f"distinct 3-grams {row['distinct_3']:.2f} · longest repeat {row['longest_repeat']} words",
                           help="How much the text repeats itself, over its words: the share of its 3-word sequences "
                                "that are distinct (1.00: none repeats), and the longest span that occurs twice.")
    st.caption("Greedy decoding" + (", chat template on." if g["chat"] else ", plain prompts."))
if s.speed:
    o, c = s.speed["original"], s.speed["compressed"]
    st.caption(f"Speed (measured on Compress and evaluate): prefill {o['prefill_tok_s']:.0f} → "
               f"{c['prefill_tok_s']:.0f} tok/s, decode {o['decode_tok_s']:.1f} → {c['decode_tok_s']:.1f} tok/s "
               "(original → compressed).")
