"""The block loop every data pass runs on: one decoder block at a time, as GPTQ and llm-compressor do.

`capture_inputs` runs the model up to its first decoder block once per calibration window and keeps
what that block receives: the hidden states (windows x seqlen x hidden, in the model's dtype, on
the model's device) and the keyword arguments the model passes every block (position embeddings,
masks). `forward_block` then runs one block over every window and replaces each window's hidden
states by the block's output, which is the next block's input. A pass over the model is

    inputs = capture_inputs(model, windows)
    for index, block in enumerate(blocks):
        <hooks on this block's Linears>
        forward_block(block, inputs)
        <consume and free this block's statistics>

so its peak memory is the model, one block's statistics and the activations between blocks, and
does not grow with depth. Blocks placed by accelerate (`device_map`, CPU or disk offload) bring their
own weights to the execution device through accelerate's hooks when they are called, and
`models.input_device` follows the device map (tests/test_offload.py runs a model with blocks on CPU and disk).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
from dataclasses import dataclass

import torch
from torch import nn

from .errors import DipSVDError
from .models import input_device


class _Captured(Exception):
    """Raised by the first block's pre-hook once its inputs are recorded: the rest of the model is not run."""


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_host_memory() -> None:
    """Give the host memory freed by a finished block back to the system. Without it glibc keeps the
    freed blocks' Grams and factors as heap fragments, and the pass's resident memory grows with depth
    (measured: about 35 MB a block at SmolLM2-360M's widths, 280 MB of 350 returned at 8 blocks)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@dataclass
class BlockInputs:
    hidden: list[torch.Tensor]  # one (1, seqlen, hidden) tensor per window
    kwargs: list[dict]  # what the model passes each block for that window

    @property
    def n_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


def window_ids(model: nn.Module, windows: torch.Tensor, batch_size: int = 1):
    """(start, ids) for each batch of `batch_size` windows of token ids (n, seqlen), the ids on the device the
    model reads its inputs on (models.input_device, which follows a device map). Every pass that runs the
    whole model over windows goes through here: capturing the first block's inputs, perplexity, Fisher's
    backward passes, the BO objective and Dobi-SVD's weight update."""
    device = input_device(model)
    for i in range(0, len(windows), batch_size):
        yield i, windows[i: i + batch_size].to(device)


@torch.no_grad()
def capture_inputs(model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor) -> BlockInputs:
    """The first block's inputs for every window (n, seqlen) of token ids."""
    hidden, kwargs = [], []

    def hook(module, args, kw):
        x = args[0] if args else kw.pop("hidden_states")
        hidden.append(x)
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for _, ids in window_ids(model, windows):
            try:
                model(ids, use_cache=False)
            except _Captured:
                continue
            raise DipSVDError("the model never called its first decoder block; this architecture is not supported")
    finally:
        handle.remove()
    return BlockInputs(hidden, kwargs)


@torch.no_grad()
def forward_block(block: nn.Module, inputs: BlockInputs, on_output=None, progress=None) -> None:
    """Run `block` over every window, in place: each window's hidden states become the block's output.
    `on_output(h)` sees each output (1, seqlen, hidden) before it replaces the input."""
    for i, (x, kw) in enumerate(zip(inputs.hidden, inputs.kwargs)):
        out = block(x, **kw)
        h = out[0] if isinstance(out, tuple) else out
        if on_output is not None:
            on_output(h)
        inputs.hidden[i] = h
        if progress:
            progress(i + 1, len(inputs.hidden))
