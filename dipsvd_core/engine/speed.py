"""Step 6 of the flow, speed: prefill and decode tokens/s of any model, eager or compiled, and what bounds them.

Eager runs the model as transformers does by default (a dynamic KV cache that grows by concatenation). Compiled
runs it with a static KV cache (preallocated, written in place) and `torch.compile` (on CUDA its "reduce-overhead"
mode, CUDA graphs, which removes the launch cost that dominates decode at batch 1 on a GPU); the first prefill and
first decode step, which compile, are timed apart from the steady state (`compile_s`). Every clock read follows a
device synchronisation. Every figure carries the settings it ran under and the bytes bound: the bytes of weights a
decode step reads (each matrix once; an input embedding that is not also the output layer reads one row per token,
so it is left out), which bound decode at batch 1 where memory bandwidth sets the pace; the KV cache, the same for
the original and the compressed model, is not counted.

Module layer: imports torch and transformers only (models.py for the input device).
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from ..model.models import input_device


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it times the work, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compile_default(device: torch.device) -> bool:
    """Compiled generation by default where it pays: CUDA (launch-bound decode). On a CPU the first compilation
    costs a minute and the steady state gains little, so it is off there."""
    return device.type == "cuda"


def decode_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every distinct parameter and buffer of a floating type once, less
    an input embedding that is not tied to the output layer (a step reads one of its rows)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point() and t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    total = sum(seen.values())
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is not None and (out is None or out.weight is not emb.weight):
        total -= emb.weight.numel() * emb.weight.element_size()
    return total


class Runner:
    """One model's prefill of a (batch, seqlen) prompt and `new_tokens` greedy decode steps on its KV cache, eager
    (dynamic cache) or compiled (static cache, torch.compile); `warm` runs once (the compilation), `run` times."""

    def __init__(self, model: nn.Module, seqlen: int = 256, new_tokens: int = 32, batch: int = 1,
                 compiled: bool = False, vocab: int = 1000):
        self.model, self.seqlen, self.new_tokens, self.batch, self.compiled = model, seqlen, new_tokens, batch, compiled
        self.device = input_device(model)
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (batch, seqlen), generator=gen).to(self.device)
        self.cache = None
        self.forward = model.forward
        if compiled:
            from transformers import StaticCache

            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)  # several models
            self.cache = StaticCache(config=model.config, max_cache_len=seqlen + max(new_tokens, 2))  # warm: 2 steps
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
            self.forward = torch.compile(model.forward, mode=mode, dynamic=False)

    def _prefill(self):
        if self.cache is not None:
            self.cache.reset()
        pos = torch.arange(self.seqlen, device=self.device).expand(self.batch, -1)
        return self.forward(input_ids=self.ids, position_ids=pos, past_key_values=self.cache, use_cache=True,
                            logits_to_keep=1)

    def _decode(self, out, steps: int):
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for i in range(steps):
            pos = torch.full((self.batch, 1), self.seqlen + i, device=self.device)
            out = self.forward(input_ids=tok, position_ids=pos, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return tok

    @torch.no_grad()
    def warm(self) -> float:
        """Seconds of a first prefill and two decode steps: the compilation when compiled (on CUDA the graphs are
        recorded at the second step), a warm-up otherwise."""
        if self.cache is not None:  # the static cache allocates its tensors at its first write: outside the graph
            self.model(input_ids=self.ids[:, :1], past_key_values=self.cache, use_cache=True)
        sync(self.device)
        t0 = time.perf_counter()
        self._decode(self._prefill(), 2)
        sync(self.device)
        return time.perf_counter() - t0

    @torch.no_grad()
    def run(self) -> tuple[float, float]:
        """(prefill seconds, decode seconds) of one prompt and its new tokens, each after a synchronisation."""
        sync(self.device)
        t0 = time.perf_counter()
        out = self._prefill()
        sync(self.device)
        t1 = time.perf_counter()
        self._decode(out, self.new_tokens)
        sync(self.device)
        return t1 - t0, time.perf_counter() - t1

    def settings(self) -> dict:
        return {"mode": "compiled" if self.compiled else "eager", "cache": "static" if self.compiled else "dynamic",
                "batch": self.batch, "prompt": self.seqlen, "new_tokens": self.new_tokens,
                "threads": torch.get_num_threads(), "device": str(self.device),
                "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch.")}


def speed(model: nn.Module, seqlen: int = 256, new_tokens: int = 32, vocab: int = 1000, repeats: int = 3,
          batch: int = 1, compiled: bool = False) -> dict:
    """Prefill tokens/s of a (batch, seqlen) prompt and decode tokens/s of its new tokens (every sequence of the
    batch counted), the median of `repeats` runs after a warm-up (timed apart: `compile_s`), with the settings and
    the bytes a decode step reads."""
    runner = Runner(model, seqlen, new_tokens, batch, compiled, vocab)
    first = runner.warm()
    runs = [runner.run() for _ in range(repeats)]
    prefill, decode = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    return {"prefill_tok_s": batch * seqlen / prefill, "decode_tok_s": batch * new_tokens / decode,
            "compile_s": first if compiled else None, "runs": repeats, "statistic": "median",
            "settings": runner.settings(), "decode_bytes": decode_bytes(model)}


def bytes_bound(original: dict, compressed: dict) -> float:
    """The decode speed-up that the bytes read allow: original decode bytes / compressed decode bytes."""
    return original["decode_bytes"] / compressed["decode_bytes"]


def forget_compiled() -> None:
    """Drop every compiled graph (torch._dynamo.reset): a model converted in place, or the next model, compiles
    afresh, and no graph keeps the old weights alive."""
    torch._dynamo.reset()


def speed_settings(speed: dict) -> str:
    """The settings a speed table ran under, in words (speed.py's `settings`), or 'settings not recorded'."""
    s = next((v.get("settings") for v in speed.values() if isinstance(v, dict) and v.get("settings")), None)
    if not s:
        return "settings not recorded"
    return (f"{s['mode']} ({s['cache']} KV cache), batch {s['batch']}, prompt {s['prompt']} tokens, "
            f"{s['new_tokens']} new tokens, {s['threads']} threads, {s['device']}, {s['dtype']}; median of the runs")
