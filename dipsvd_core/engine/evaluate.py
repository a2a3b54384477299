"""Step 6 of the flow: perplexity and generation for any model (speed: speed.py).

Perplexity (docs/DESIGN.md section 5): windows are (n, seqlen) token ids cut without padding;
PPL = exp(mean next-token NLL over every predicted token of every window). A non-finite loss
is an error, never skipped.
"""
from __future__ import annotations

import math
import re
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..common.errors import DipSVDError
from ..model.blocks import find_blocks
from ..model.models import input_device
from ..model.offload import is_offloaded
from .speed import speed, sync  # noqa: F401  (speed: evaluate.speed, as callers import it)
from .stream import streamed_logits, window_ids

DEFAULT_PROMPTS = [
    "What is the universe? Explain this concept.",
    "The history of the Roman Empire begins",
    "Write a short poem about the sea.",
]


def window_logits(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, progress=None):
    """(start, ids, logits) for each batch of windows (n, seqlen). An offloaded model runs one block at a time
    over every window (stream.streamed_logits, batches of 1), so that each block is sent to the device once, not
    once per window; `progress` then runs over the blocks."""
    if is_offloaded(model):
        yield from streamed_logits(model, find_blocks(model)[1], windows, progress)
        return
    for i, batch in window_ids(model, windows, batch_size):
        yield i, batch, model(batch).logits


def token_kl(reference: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(reference || softmax(logits)) at each token, in float32: `reference` the next-token log-probabilities
    (..., vocab) of the model compared against (any dtype), `logits` the other model's, of the same tokens. Returns
    (tokens,); differentiable in `logits`."""
    q = F.log_softmax(logits.float(), dim=-1).reshape(-1, logits.shape[-1])
    p = reference.to(q.device, torch.float32).reshape(-1, reference.shape[-1])
    return (p.exp() * (p - q)).sum(-1)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, progress=None) -> float:
    total_nll, total_tokens = 0.0, 0
    if is_offloaded(model):  # progress over the blocks, from window_logits
        batches, batch_size, progress = window_logits(model, windows, 1, progress), 1, None
    else:
        batches = window_logits(model, windows, batch_size)
    for i, batch, logits in batches:
        logits = logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                              reduction="sum")
        if not torch.isfinite(nll):
            raise DipSVDError(f"the loss is not finite on evaluation window {i}; the model is broken at this "
                              "setting (try a lower ratio, or float32)")
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
        if progress:
            progress(min(1.0, (i + batch_size) / len(windows)), f"perplexity: window {i + 1}/{len(windows)}")
    return math.exp(total_nll / total_tokens)


def _prompt_ids(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def _compiled_kwargs(model: nn.Module, tokenizer, prompts: list[str], chat: bool, max_new_tokens: int):
    """generate()'s arguments for compiled decoding: a static cache of one length for every prompt (so that the
    decode step compiles once, not once per prompt length) and torch.compile on any device."""
    from transformers import CompileConfig, StaticCache

    config = CompileConfig(mode="reduce-overhead" if input_device(model).type == "cuda" else "default")
    config._compile_all_devices = True  # transformers compiles only on accelerators unless told
    longest = max(_prompt_ids(tokenizer, p, chat).shape[1] for p in prompts) + max_new_tokens
    return lambda: {"past_key_values": StaticCache(config=model.config, max_cache_len=longest),
                    "compile_config": config}


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 48,
             chat: bool = False, greedy: bool = True, compiled: bool = False) -> list[dict]:
    """One completion per prompt, with tokens per second of the new tokens. `compiled`: a static cache and
    torch.compile (speed.py); the first prompt is generated once before the timed ones, and that first call,
    which compiles, is reported apart (`compile_s`)."""
    device = input_device(model)
    extra = _compiled_kwargs(model, tokenizer, prompts, chat, max_new_tokens) if compiled else dict
    pad = tokenizer.pad_token_id or tokenizer.eos_token_id

    def run(ids):
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                              do_sample=not greedy, pad_token_id=pad, **extra())

    first = None
    if compiled:
        sync(device)
        t0 = time.perf_counter()
        run(_prompt_ids(tokenizer, prompts[0], chat).to(device))
        sync(device)
        first = time.perf_counter() - t0
    out = []
    for prompt in prompts:
        ids = _prompt_ids(tokenizer, prompt, chat).to(device)
        sync(device)
        t0 = time.perf_counter()
        gen = run(ids)
        sync(device)
        secs = time.perf_counter() - t0
        new = gen[0, ids.shape[1]:]
        text = tokenizer.decode(new, skip_special_tokens=True)
        out.append({"prompt": prompt, "text": text, "new_tokens": int(new.numel()),
                    "tokens_per_s": new.numel() / max(secs, 1e-9), "mode": "compiled" if compiled else "eager",
                    "compile_s": first, **repetition(text)})
    return out


WORD = re.compile(r"\w+|[^\w\s]")


def repetition(text: str, n: int = 3) -> dict:
    """How much a generation repeats itself, over its words (a word: a run of letters and digits, or one
    punctuation mark; case ignored): `distinct_3`, the share of its n-grams (n = 3) that are distinct (1.0 where
    nothing repeats, or where it has fewer than n words), and `longest_repeat`, the length in words of the longest
    span that occurs at least twice (the two may overlap: "a a a" repeats "a a")."""
    words = [w.lower() for w in WORD.findall(text)]
    grams = [tuple(words[i: i + n]) for i in range(len(words) - n + 1)]
    distinct = len(set(grams)) / len(grams) if grams else 1.0
    longest, prev = 0, [0] * (len(words) + 1)
    for i in range(1, len(words)):  # longest common substring of the words with themselves, shifted
        cur = [0] * (len(words) + 1)
        for j in range(i + 1, len(words) + 1):
            if words[i - 1] == words[j - 1]:
                cur[j] = prev[j - 1] + 1
                longest = max(longest, cur[j])
        prev = cur
    return {"distinct_3": distinct, "longest_repeat": longest}
