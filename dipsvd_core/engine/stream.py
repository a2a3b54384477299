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
own weights to the execution device through accelerate's hooks, and `models.input_device` follows the device
map (tests/model/test_offload.py runs a model with blocks on CPU and disk). Those hooks would send a block's weights
again for every window; every pass holds the block it works on with `block_on_device`, so that each block is
sent to the device once per pass (as llm-compressor's sequential pipeline onloads a subgraph once).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from dataclasses import dataclass

import torch
from torch import nn

from ..common import cores
from ..common.errors import DipSVDError
from ..model.models import input_device
from ..model.offload import block_on_device


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
    as_tuple: bool = False  # whether the blocks return a tuple (set by forward_block)

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
    `on_output(h)` sees each output (1, seqlen, hidden) before it replaces the input. An offloaded block is sent
    to the device once for all the windows (block_on_device). Each block pass takes its share of the cores as the
    machine's compute jobs are now (cores.share)."""
    cores.share()
    with block_on_device(block):
        for i, (x, kw) in enumerate(zip(inputs.hidden, inputs.kwargs)):
            out = block(x, **kw)
            inputs.as_tuple = isinstance(out, tuple)
            h = out[0] if inputs.as_tuple else out
            if on_output is not None:
                on_output(h)
            inputs.hidden[i] = h
            if progress:
                progress(i + 1, len(inputs.hidden))


class StandIn(nn.Module):
    """Stands in for a decoder block while only the model's top runs (final norm, lm_head): the last block's
    stand-in returns `value` (that block's output, computed beforehand), the others pass their input through."""

    def __init__(self, as_tuple: bool, value: torch.Tensor | None = None):
        super().__init__()
        self.value, self.as_tuple = value, as_tuple

    def forward(self, *args, **kwargs):
        h = self.value if self.value is not None else (args[0] if args else kwargs["hidden_states"])
        return (h,) if self.as_tuple else h


@contextlib.contextmanager
def stood_in(blocks: nn.ModuleList, as_tuple: bool):
    """Within, every decoder block is a StandIn, so a call of the model runs its embedding and its top only;
    yields the last block's stand-in, whose `value` the caller sets per window. The blocks are put back after,
    also on an error."""
    originals = list(blocks)
    last = StandIn(as_tuple)
    try:
        for b in range(len(blocks)):
            blocks[b] = last if b == len(blocks) - 1 else StandIn(as_tuple)
        yield last
    finally:
        for b, block in enumerate(originals):
            blocks[b] = block


@torch.no_grad()
def streamed_logits(model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor, progress=None):
    """(start, ids, logits) for each window (n, seqlen), the model run one block at a time over every window (each
    block sent to the device once, the windows' hidden states held between blocks), then its top per window. The
    logits equal the model's own (tests/model/test_offload.py); for offloaded models, whose hooks would otherwise
    send every block once per window."""
    inputs = capture_inputs(model, blocks, windows)
    for b, block in enumerate(blocks):
        forward_block(block, inputs)
        if progress:
            progress((b + 1) / (len(blocks) + 1), f"perplexity: block {b + 1}/{len(blocks)}")
    with stood_in(blocks, inputs.as_tuple) as top:
        for i, ids in window_ids(model, windows):
            top.value = inputs.hidden[i]
            yield i, ids, model(ids, use_cache=False).logits
            inputs.hidden[i] = None
