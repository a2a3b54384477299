"""The `self` text source: text the model writes itself, sampled from short prompts.

Self-generated calibration text follows the model's own distribution, which is what the compressed model must
reproduce; the calibration literature finds it as good as or better than a fixed corpus (arXiv 2410.17170). A
document is one prompt and the model's continuation of it, sampled (temperature 1, top-p TOP_P) for NEW_TOKENS
tokens or until the end-of-sequence token. The prompts alternate between two kinds, both from calibration halves
only: a question about a wiki article's subject in the model's chat template (as wiki-chat asks it; the opening
words of that article where the tokenizer has no template), and the opening PROMPT_WORDS words of a news story.

Documents are written BATCH at a time; group g is seeded by (seed, g) alone, so the stream of the first n groups is
the same whatever was asked for before, and a longer request extends the cached stream (cache folder `text/`)
instead of writing it anew. A stream has a purpose: the calibration's (the `self` source) or distillation's
(DISTILL_TEXT: more text to train on, refine/distill.py); each purpose's documents are sampled with their own seeds,
so the two never share a document. Windows of `self` are the stream's chunks in order (they are drawn independently
already): the calibration windows are the first ones, the held-out windows the next.
"""
from __future__ import annotations

import json

import torch

from ..common.cache import cache_dir, make_key
from .data import CHAT_ASK, article_subject, bos_id, load_documents

NEW_TOKENS = 256  # tokens the model writes per prompt
PROMPT_WORDS = 8  # a plain prompt: the opening words of a news story (or of an article, without a template)
PROMPT_TOKENS = 64  # what the plan counts for a prompt: a question about a subject or a story's first words
# prompts written together (a group): on the 2-core CPU, 32 write 141 tokens a second where 8 wrote 74 (64: 159);
# on a GPU a large model's decode step is bound by reading its weights, so the gain should be larger (not measured;
# bench/RESULTS.md, "Writing the model's text")
BATCH = 32
TOP_P = 0.95
CALIBRATION_TEXT = ""  # the `self` source's stream (its key and seeds predate purposes)
DISTILL_TEXT = "distill"


def _key(*parts, purpose: str) -> str:
    """make_key of the parts and the purpose; the calibration's purpose adds nothing, so its keys (the cache's file
    names and the groups' seeds) are those it had before there were purposes."""
    return make_key(*parts, *([purpose] if purpose else []))


def prompts(tokenizer, group: int) -> list[list[int]]:
    """The token ids of group `group`'s BATCH prompts."""
    wiki, news = load_documents("wiki", "calib"), load_documents("news", "calib")
    template = getattr(tokenizer, "chat_template", None)
    out = []
    for i in range(group * BATCH, (group + 1) * BATCH):
        k = i // 2
        if i % 2 == 0 and template:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": CHAT_ASK.format(subject=article_subject(wiki[k % len(wiki)]))}],
                tokenize=False, add_generation_prompt=True)
            out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
            continue
        docs = wiki if i % 2 == 0 else news
        out.append(opening(tokenizer, docs[k % len(docs)]))
    return out


def opening(tokenizer, doc: str) -> list[int]:
    """A plain prompt's token ids: the document's first PROMPT_WORDS words."""
    return tokenizer(" ".join(doc.split()[:PROMPT_WORDS]), add_special_tokens=False)["input_ids"]


@torch.no_grad()
def write_group(model, tokenizer, group: int, seed: int, purpose: str = CALIBRATION_TEXT) -> list[list[int]]:
    """Group `group`'s documents: each prompt followed by what the model wrote, up to and with its end token."""
    from ..model.models import input_device

    device = input_device(model)
    ids = prompts(tokenizer, group)
    bos, eos = bos_id(tokenizer), tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    lead = [bos] if bos is not None else []  # the model reads BOS first, as in training; the stream keeps it out
    width = max(len(lead) + len(p) for p in ids)
    batch = torch.tensor([[pad] * (width - len(lead) - len(p)) + lead + p for p in ids], device=device)  # left pad
    mask = (torch.arange(width) >= torch.tensor([[width - len(lead) - len(p)] for p in ids])).long().to(device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(_key("self-text", seed, group, purpose=purpose)[:8], 16))
        out = model.generate(batch, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=True, temperature=1.0,
                             top_p=TOP_P, top_k=0, pad_token_id=pad)
    docs = []
    for p, row in zip(ids, out[:, width:].tolist()):
        if eos in row:
            row = row[: row.index(eos) + 1]
        docs.append(p + row)
    return docs


def self_stream(model, tokenizer, fingerprint: str, n_tokens: int, seed: int = 0, progress=None,
                purpose: str = CALIBRATION_TEXT) -> torch.Tensor:
    """At least `n_tokens` tokens of the model's own documents, joined by the tokenizer's blank line (cached per
    model weights, seed and purpose; extended group by group, each written group reported to `progress`)."""
    key = _key("self-v1", fingerprint, seed, NEW_TOKENS, PROMPT_WORDS, BATCH, TOP_P, purpose=purpose)
    path = cache_dir() / "text" / f"self-{key}.json"
    groups: list[list[list[int]]] = json.loads(path.read_text()) if path.exists() else []
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    have = sum(len(d) + len(sep) for g in groups for d in g)
    while have < n_tokens:
        groups.append(write_group(model, tokenizer, len(groups), seed, purpose))
        have += sum(len(d) + len(sep) for d in groups[-1])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(groups))
        if progress:
            what = "text to distil on" if purpose == DISTILL_TEXT else "calibration text"
            progress(min(1.0, have / n_tokens), f"the model writes its {what}: {min(have, n_tokens):,} of "
                                                f"{n_tokens:,} tokens ({len(groups)} groups of {BATCH})")
    stream = [t for g in groups for d in g for t in d + sep]
    return torch.tensor(stream, dtype=torch.long)
