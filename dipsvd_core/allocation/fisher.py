"""Fisher sensitivity S_l, the first of the global importance signals (importance.py), from one backward pass of the
next-token loss per calibration window, taken one decoder block at a time (`fisher_info`), so that it fits where the
model fits (offload too). For a targeted weight theta, s = ||grad||_F / (||theta||_F + eps) where grad is the
gradient of the MEAN calibration loss (the mean over windows of each window's mean token NLL), and S_l = sum of s
over the block's targeted weights. The same pass keeps, per weight, the row-wise Fisher f_j = sum over windows of
sum_i grad_w[i, j]^2 (one value per input channel j), which FWSVD needs, and the Fisher trace sum_j f_j / n_windows;
and at each targeted Linear's OUTPUT y: the mean over tokens of ||dL_w/dy_t||^2 and of ||y_t||^2, the two numbers
the coupled allocator weighs a matrix's error with. Cached on disk under the statistics key (`cached_fisher`).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ..common.cache import load_tensors, make_key, save_tensors
from ..common.errors import DipSVDError
from ..engine.stream import release_host_memory, stood_in
from ..model.blocks import Target
from ..model.offload import block_on_device, weights_of

if TYPE_CHECKING:
    from ..engine.stream import BlockInputs

FISHER_VERSION = "fisher-v3"  # v2: block-by-block backward; v3: output-gradient and output energies
GRAD_EPS = 1e-8  # in ||grad|| / (||theta|| + eps)
FISHER_KEEP_BYTES = 2 << 30  # Fisher keeps every block's inputs up to this, else checkpoints (checkpoint_every)


@dataclass
class FisherInfo:
    """Per-block and per-matrix Fisher signals from one set of backward passes."""

    per_block: np.ndarray  # (n_blocks,) S_l
    per_matrix: dict[str, float]  # name -> ||grad||_F / (||theta||_F + eps)
    rows: dict[str, torch.Tensor]  # name -> (in,) float64 row-wise Fisher f_j (for fwsvd)
    trace: dict[str, float]  # name -> mean over windows of ||grad_w||_F^2
    out_grad2: dict[str, float]  # name -> mean over tokens of ||dL_w/dy_t||^2 at the Linear's output (coupled)
    out_energy: dict[str, float]  # name -> mean over tokens of ||y_t||^2 (coupled)
    n_windows: int
    loss: float  # mean calibration loss
    key: str = ""  # cache key, part of the fwsvd factor key
    seconds: float = 0.0


def checkpoint_every(n_blocks: int, saved_bytes: int) -> int:
    """Every how many blocks Fisher's forward keeps the inputs for the backward: every block when all of them
    (`saved_bytes`) fit in FISHER_KEEP_BYTES, else every ceil(sqrt(n_blocks))-th, and the backward recomputes
    the others one segment at a time (at most sqrt(L) + sqrt(L) sets held instead of L, for one more forward).
    Llama-3-8B at 256 x 2048 in bf16: 137 GB of inputs for every block, 47 GB at every 6th."""
    if saved_bytes <= FISHER_KEEP_BYTES:
        return 1
    return max(1, math.ceil(math.sqrt(n_blocks)))


@dataclass
class _SavedInputs:
    """Part (a) of `fisher_info`, the result of its no-grad pass: what the blocks received, kept for the backward.

    In memory, with n windows of seqlen tokens and width hidden, all in the model's dtype:
    - saved[b][i]: block b's input for window i, (1, seqlen, hidden), kept for every `every`-th block (the
      checkpoints; every block where they fit, `checkpoint_every`) and recomputed from the checkpoint below for
      the others (`ensure`); on the host when the model runs on a GPU, else on the model's device. `release(b)`
      drops block b's once done.
    - inputs: the stream.BlockInputs after the last block: inputs.hidden[i] is the LAST block's output for
      window i, (1, seqlen, hidden) on the model's device, and inputs.kwargs[i] the keyword arguments (position
      embeddings, masks) the model passes every block for window i. Its hidden states are dropped once part
      (b) has read them.
    - as_tuple: whether a block returns a tuple (the stand-ins of part (b) answer the same way).
    - most: the most input sets held at once so far (a set: one block's inputs for every window)."""

    saved: list[list[torch.Tensor] | None]
    inputs: BlockInputs
    as_tuple: bool
    device: torch.device  # where the blocks run the backward: the device of the last block's output
    every: int = 1
    most: int = 0

    def held(self) -> int:
        return sum(s is not None for s in self.saved)

    def ensure(self, b: int, blocks: nn.ModuleList) -> None:
        """Block b's inputs present: where they were not kept, the blocks from the checkpoint c below b up to
        b - 1 run again over every window (no grad), keeping each one's input, as the first forward did."""
        if self.saved[b] is not None:
            return
        from ..engine.stream import BlockInputs, forward_block

        c = b - b % self.every
        to_host = self.device.type == "cuda"
        with torch.no_grad():
            segment = BlockInputs([h.to(self.device) for h in self.saved[c]], self.inputs.kwargs)
            for j in range(c, b):
                forward_block(blocks[j], segment)
                self.saved[j + 1] = [h.to("cpu") for h in segment.hidden] if to_host else list(segment.hidden)
                self.most = max(self.most, self.held())

    def block_input(self, b: int, i: int) -> torch.Tensor:
        """Block b's input for window i on `device`, a leaf that requires grad: (1, seqlen, hidden)."""
        return self.saved[b][i].to(self.device).detach().requires_grad_(True)

    def release(self, b: int) -> None:
        self.saved[b] = None


def _forward_inputs(model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor, progress=None) -> _SavedInputs:
    """Part (a): one no-grad streaming pass over `windows` (n, seqlen) that keeps the checkpoint blocks' inputs
    (every block's where they fit) for every window (see _SavedInputs for what it holds). Progress runs from 0 to 0.5 over the blocks."""
    from ..engine.stream import capture_inputs, forward_block

    n_blocks = len(blocks)
    with torch.no_grad():
        inputs = capture_inputs(model, blocks, windows)
        # on a GPU the kept inputs wait in host memory and come back a block at a time
        h0 = inputs.hidden[0]
        every = checkpoint_every(n_blocks, n_blocks * len(windows) * h0.numel() * h0.element_size())
        saved = []
        to_host = h0.device.type == "cuda"
        for b, block in enumerate(blocks):
            keep = b % every == 0
            saved.append(([h.to("cpu") for h in inputs.hidden] if to_host else list(inputs.hidden)) if keep else None)
            forward_block(block, inputs, progress=lambda i, m, b=b: progress and progress(
                0.5 * (b + i / m) / n_blocks, f"fisher: forward, block {b + 1}/{n_blocks}"))
    fwd = _SavedInputs(saved, inputs, inputs.as_tuple, h0.device, every)
    fwd.most = fwd.held()
    return fwd


def _top_gradients(model: nn.Module, blocks: nn.ModuleList, fwd: _SavedInputs,
                   windows: torch.Tensor) -> tuple[list[torch.Tensor], float]:
    """Part (b): per window, the top of the model (final norm, lm_head, next-token loss) run on the last block's
    output with every block stood in for (stream.stood_in), and back-propagated to that output.

    Returns (grads, loss_sum): grads[i] = dL_i/dh at the last block's output for window i, (1, seqlen, hidden)
    in the model's dtype on its device (n of them are held), and loss_sum the sum over windows, in order, of each
    window's mean token NLL. Beyond those, one window's float32 logits (1, seqlen, vocab) and their graph live at a
    time. `blocks` is restored before returning, also on an error."""
    from ..engine.stream import window_ids

    grads, loss_sum = [], 0.0
    with stood_in(blocks, fwd.as_tuple) as stand_in:
        for i, ids in window_ids(model, windows):
            stand_in.value = top = fwd.inputs.hidden[i].detach().requires_grad_(True)
            with torch.enable_grad():
                logits = model(ids, use_cache=False).logits.float()
                loss = nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])  # mean next-token NLL
                if not torch.isfinite(loss):
                    raise DipSVDError(f"the loss is not finite on calibration window {i}; load the model in "
                                      "float32 (--dtype float32)")
                loss.backward()
            loss_sum += loss.item()
            grads.append(top.grad.to("cpu") if top.grad.device.type == "cuda" else top.grad)  # on a GPU: host
            del logits, loss, top
        stand_in.value = None
    return grads, loss_sum


class _Reductions:
    """Part (c)'s accumulators: the few figures the backward passes keep per targeted Linear y = x W^T, W (out, in).

    - grad_sum[name]: (out, in) float32, the sum over windows of grad_w, the weight gradient of window w's loss;
    - rows[name]: (in,) float64, the row-wise Fisher f_j = sum over windows of sum_i grad_w[i, j]^2;
    - out_grad2[name], out_energy[name]: floats, the sums over tokens of ||dL_w/dy_t||^2 and of ||y_t||^2.
    grad_sum and rows are made by `start` (on the device of the gradients) as the backward reaches a block, and
    `finish` reduces grad_sum to per_matrix[name] = ||mean grad||_F / (||W||_F + eps) and drops it when the block's
    backward ends, so that one block's sums are held, not the model's (Llama-3-8B: 28 GB of them); rows move to
    the host there. out_* exist for every target from the start. A hook holds its window's input x (1, seqlen, in)
    and then one (out, in) gw until that window's gradient at y has arrived."""

    def __init__(self, names: list[str]):
        self.grad_sum: dict[str, torch.Tensor] = {}
        self.rows: dict[str, torch.Tensor] = {}
        self.per_matrix: dict[str, float] = {}
        self.out_grad2 = {name: 0.0 for name in names}
        self.out_energy = {name: 0.0 for name in names}

    def start(self, name: str, shape: torch.Size, device: torch.device) -> None:
        self.grad_sum[name] = torch.zeros(shape, dtype=torch.float32, device=device)
        self.rows[name] = torch.zeros(shape[1], dtype=torch.float64, device=device)

    def finish(self, name: str, module: nn.Module, n: int) -> None:
        """The mean gradient's figure of `name` over n windows (float64), its sum dropped; rows to the host."""
        g = self.grad_sum.pop(name).double() / n  # gradient of the mean loss over windows
        with weights_of(module):
            norm_w = torch.linalg.norm(module.weight.detach().double()).to(g.device)
        self.per_matrix[name] = (torch.linalg.norm(g) / (norm_w + GRAD_EPS)).item()
        self.rows[name] = self.rows[name].cpu()

    def hook(self, name: str):
        """A forward hook for the Linear `name`: it adds ||y||^2 and registers, on y, the reduction of y's gradient
        g to ||g||^2, gw = g^T x (no requires_grad on any weight) and gw's column sums of squares."""
        def forward_hook(module, args, y):
            x = args[0].detach()
            self.out_energy[name] += float(y.detach().double().pow(2).sum())

            def on_grad(g):
                self.out_grad2[name] += float(g.double().pow(2).sum())
                gw = g.reshape(-1, g.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()  # (out, in)
                self.grad_sum[name] += gw.to(self.grad_sum[name].device)
                self.rows[name] += (gw.double() ** 2).sum(0).to(self.rows[name].device)  # one value per input channel
            y.register_hook(on_grad)
        return forward_hook


def _backward_block(b: int, blocks: nn.ModuleList, names: list[str], mods: dict[str, nn.Module], fwd: _SavedInputs,
                    grads: list[torch.Tensor], red: _Reductions, progress=None) -> None:
    """Part (c): block b run again on its saved inputs (fwd; recomputed from the checkpoint below where they were
    not kept) and back-propagated, window by window, from grads[i] (dL_i/dh at its output, (1, seqlen, hidden));
    `red` reduces the weight gradients of its targeted Linears `names`, and finishes them at the end. grads[i]
    becomes dL_i/dh at the block's input, for block b - 1 (where grads[i] was, on the host when the model runs on
    a GPU), and fwd.release(b) frees the saved inputs. Held meanwhile: one window's activations and graph of this
    block, and `red`'s figures of these Linears."""
    n, n_blocks, block = len(grads), len(fwd.saved), blocks[b]
    with block_on_device(block):  # sent once for every window's backward and the figures
        fwd.ensure(b, blocks)
        for name in names:
            red.start(name, mods[name].weight.shape, fwd.device)
        handles = [mods[nm].register_forward_hook(red.hook(nm)) for nm in names]
        try:
            for i in range(n):
                x = fwd.block_input(b, i)
                with torch.enable_grad():
                    out = block(x, **fwd.inputs.kwargs[i])
                    h = out[0] if isinstance(out, tuple) else out
                    h.backward(grads[i].to(h.device))
                grads[i] = x.grad.to(grads[i].device)
                if progress:
                    progress(0.5 + 0.5 * (n_blocks - b - 1 + (i + 1) / n) / n_blocks,
                             f"fisher: backward, block {b + 1}/{n_blocks}, window {i + 1}/{n}")
        finally:
            for h_ in handles:
                h_.remove()
        for name in names:
            red.finish(name, mods[name], n)
    fwd.release(b)


def _assemble(targets: list[Target], red: _Reductions, n: int, tokens: int,
              loss_sum: float, t0: float) -> FisherInfo:
    """Part (d): FisherInfo from the reductions of n windows (tokens in all): per matrix s = ||mean grad||_F /
    (||W||_F + eps) in float64, S_l = the sum of s over block l's targets, the trace sum_j f_j / n, the output
    figures per token. Nothing but those figures is held."""
    per_matrix, trace = {}, {}
    per_block = np.zeros(1 + max(t.block for t in targets))
    for t in targets:
        per_matrix[t.name] = s = red.per_matrix[t.name]
        trace[t.name] = red.rows[t.name].sum().item() / n
        per_block[t.block] += s
    return FisherInfo(per_block, per_matrix, dict(red.rows), trace,
                      {k: v / tokens for k, v in red.out_grad2.items()},
                      {k: v / tokens for k, v in red.out_energy.items()},
                      n, loss_sum / n, seconds=time.perf_counter() - t0)


@contextlib.contextmanager
def _frozen(model: nn.Module):
    """Every parameter's requires_grad off within, restored exactly after (also on an error)."""
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved_flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved_flags:
            p.requires_grad_(flag)


def fisher_info(model: nn.Module, targets: list[Target], windows: torch.Tensor, progress=None) -> FisherInfo:
    """Backward passes over `windows` (n, seqlen), one decoder block at a time (stream.py), so that memory
    holds one block's gradients, not the whole model's:

    1. a no-grad streaming pass keeps every block's input for every window (`_forward_inputs`), or, where those
       would exceed FISHER_KEEP_BYTES, every sqrt(L)-th block's, the others recomputed in step 3 a segment at a
       time (`checkpoint_every`; same figures, one more forward);
    2. per window, the top of the model (final norm, lm_head, loss) runs on the last block's output
       with the blocks stood in for, giving dL_w/dh at that output (`_top_gradients`);
    3. from the last block down, each block is run again on its saved inputs and back-propagated from
       dL_w/dh; for every targeted Linear y = x W^T its weight gradient is grad_y^T x (hooks, no
       requires_grad on any weight, so accelerate-offloaded weights work), reduced at once to the figures
       FisherInfo keeps (`_backward_block`, `_Reductions`; a block's gradient sums live only until its backward
       ends), and the gradient at the block's input is passed down (on a GPU it waits on the host);
    4. FisherInfo is assembled from those figures (`_assemble`).
    The weights' requires_grad flags and .grad are left exactly as they were."""
    from ..model.blocks import find_blocks

    t0 = time.perf_counter()
    _, blocks = find_blocks(model)
    mods = dict(model.named_modules())
    names_of: dict[int, list[str]] = {}
    for t in targets:
        names_of.setdefault(t.block, []).append(t.name)
    red = _Reductions([t.name for t in targets])
    with _frozen(model):
        fwd = _forward_inputs(model, blocks, windows, progress)  # 1.
        grads, loss_sum = _top_gradients(model, blocks, fwd, windows)  # 2.
        fwd.inputs.hidden = []  # the last block's outputs, not needed from here
        for b in reversed(range(len(blocks))):  # 3. block by block, from the top
            _backward_block(b, blocks, names_of.get(b, []), mods, fwd, grads, red, progress)
            release_host_memory()  # the block's gradient sums and autograd, freed, back to the system
    return _assemble(targets, red, len(windows), windows.numel(), loss_sum, t0)  # 4.


def cached_fisher(lm, windows: torch.Tensor, stats_key: str, progress=None) -> FisherInfo:
    """Fisher signals for these windows, from the cache when present (keyed by the statistics key)."""
    key = make_key(FISHER_VERSION, stats_key)
    hit = load_tensors("fisher", key)
    names = [t.name for t in lm.targets]
    if hit is not None and hit[1].get("names") == names:
        t, meta = hit
        return FisherInfo(np.asarray(meta["per_block"]), meta["per_matrix"], {n: t[f"rows/{n}"] for n in names},
                          meta["trace"], meta["out_grad2"], meta["out_energy"], meta["n_windows"], meta["loss"], key,
                          0.0)
    info = fisher_info(lm.model, lm.targets, windows, progress)
    info.key = key
    save_tensors("fisher", key, {f"rows/{n}": r for n, r in info.rows.items()},
                 {"names": names, "per_block": info.per_block.tolist(), "per_matrix": info.per_matrix,
                  "trace": info.trace, "out_grad2": info.out_grad2, "out_energy": info.out_energy, "n_windows": info.n_windows, "loss": info.loss, "seconds": info.seconds})
    return info
