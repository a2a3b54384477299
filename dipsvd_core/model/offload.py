"""Offload in one place: where an offloaded model keeps its blocks and how a pass reaches their weights.

Placement: `offload_placement` (accelerate's big-model arguments and the offload folder in the cache) and
`block_device_map` (the device map of a plan's placement: plan.place_blocks decides how many blocks go to the
device, host memory and disk). Reaching the weights: `is_offloaded`, `offload_hooks` (accelerate's hooks that
offload a module), `weights_of` (one module's weights real for the body) and `block_on_device` (one block's weights
on its execution device for a whole pass over the windows, then offloaded again). Every pass that streams blocks
(engine.stream, refine, Fisher, the probes, surgery) reaches offloaded weights through these.
"""
from __future__ import annotations

import contextlib
import hashlib
import threading
import weakref

import torch
from torch import nn

from ..common.cache import cache_dir
from ..common.errors import DipSVDError
from .blocks import find_blocks


def is_offloaded(model: nn.Module) -> bool:
    """Some weights live off the execution device (CPU or disk offload): accelerate brings them in per call."""
    device_map = getattr(model, "hf_device_map", None) or {}
    return any(d in ("cpu", "disk") for d in device_map.values()) and any(
        p.device.type == "meta" for p in model.parameters())


def offload_placement(device: torch.device, dtype: torch.dtype, source_key: str,
                      device_map: dict | str | None = None) -> dict:
    """from_pretrained arguments for accelerate's big-model inference: `device_map` (default "auto":
    the GPU first, then CPU memory, then disk) and an offload folder in the cache, one per model and dtype."""
    if device_map is None:
        if device.type != "cuda":
            raise DipSVDError("--offload keeps weights off a GPU that is too small; on the CPU there is nothing to "
                              "offload to. Drop --offload, or use --device cuda")
        device_map = "auto"
    folder = cache_dir() / "offload" / hashlib.sha256(f"{source_key}|{dtype}".encode()).hexdigest()[:16]
    return {"device_map": device_map, "offload_folder": str(folder), "offload_state_dict": True}


def block_device_map(model: nn.Module, device: torch.device, on_device: int, on_host: int) -> dict:
    """An accelerate device map for `model` (its meta module tree will do): everything outside the decoder blocks
    (embeddings, final norm, head, rotary tables) and the first `on_device` blocks on `device`, the next `on_host`
    blocks in host memory ("cpu"), the rest on disk (plan.place_blocks decides the counts)."""
    prefix, blocks = find_blocks(model)
    where = device.index if device.type == "cuda" and device.index is not None else (0 if device.type == "cuda"
                                                                                        else device.type)
    device_map, parts = {}, prefix.split(".") if prefix else []
    for depth, part in enumerate(parts):  # the siblings of every module on the path down to the blocks
        parent = ".".join(parts[:depth])
        for name, _ in model.get_submodule(parent).named_children():
            if name != part:
                device_map[f"{parent}.{name}" if parent else name] = where
    for b in range(len(blocks)):
        device_map[f"{prefix}.{b}"] = where if b < on_device else "cpu" if b < on_device + on_host else "disk"
    return device_map


def _align_hooks(module: nn.Module) -> list:
    """accelerate's AlignDevicesHooks on `module` (alone or inside a SequentialHook)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    from accelerate.hooks import AlignDevicesHook

    return [h for h in getattr(hook, "hooks", (hook,)) if isinstance(h, AlignDevicesHook)]


def offload_hooks(module: nn.Module) -> list:
    """accelerate's AlignDevicesHooks on `module` that offload its weights (alone or inside a SequentialHook)."""
    return [h for h in _align_hooks(module) if h.offload]


def offloads(module: nn.Module) -> bool:
    """Some module in `module` has its weights offloaded, also while block_on_device holds them on the device (an
    offloading hook keeps its weights map then; a hook that only moves inputs has none)."""
    return any(h.offload or getattr(h, "weights_map", None) is not None
               for m in module.modules() for h in _align_hooks(m))


def weights_of(module: nn.Module):
    """A context in which an offloaded module's weights are real tensors on its execution device
    (accelerate's align_module_device); a no-op for a module that holds its weights."""
    if getattr(module, "_hf_hook", None) is None:
        return contextlib.nullcontext()
    from accelerate.utils import align_module_device

    return align_module_device(module)


@contextlib.contextmanager
def block_on_device(block: nn.Module):
    """Within, an offloaded block's weights are on its execution device and stay there for every call: each of
    accelerate's offloading hooks in the block loads its module's weights once and stops offloading; after, the
    hooks offload again (the weights go back to meta, read from the host or disk on the next call). Nested uses
    and blocks that hold their weights are no-ops. Where the blocks are linked (link_blocks) and the device is one
    of PREFETCH_ON, the next block's weights are sent ahead while this one computes (Ahead), and this block takes
    the copies sent for it, if any."""
    held = [(m, h) for m in block.modules() for h in offload_hooks(m)]
    last = _LAST[0]()
    fresh = last is not block  # not a nested or repeated entry of the block entered last
    try:
        ready = _AHEAD.pop(block, None) if fresh else None
        if fresh:
            _AHEAD.clear()  # copies sent for a block this pass did not take: let go before this one loads
        for m, h in held:
            if ready is None or not ready.install(m, h):
                h.pre_forward(m)  # the weights from the hook's map to the execution device
            h.offload = False
        if fresh:
            _LAST[0] = weakref.ref(block)
            _send_ahead(block, last)
        yield
    finally:
        for m, h in held:
            if not h.offload:
                h.offload = True
                h.post_forward(m, None)  # back to meta


PREFETCH_ON = {"cuda"}  # execution devices whose next block is sent ahead (the tests add "cpu" to run the logic)
_NEXT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # block -> weakref of the block after it
_AHEAD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # block -> its Ahead (one at a time)
_LAST: list = [lambda: None]  # a weakref of the block entered last


def _send_ahead(block: nn.Module, last: nn.Module | None) -> None:
    """Start sending the block after `block` to its device, if it is offloaded there and the pass walks forward (a
    pass walking back, as Fisher's backward does, entered that block just before)."""
    nxt = _NEXT.get(block)
    nxt = nxt() if nxt is not None else None
    if nxt is None or nxt is last:
        return
    hooks = [h for m in nxt.modules() for h in offload_hooks(m)]
    if hooks and torch.device(hooks[0].execution_device).type in PREFETCH_ON:
        _AHEAD[nxt] = Ahead(nxt)


def link_blocks(model: nn.Module) -> int:
    """Tell block_on_device which block comes after which in `model` (an offloaded one), so that a pass over the
    blocks in order sends each next block's weights ahead; returns the number of links."""
    _, blocks = find_blocks(model)
    for a, b in zip(blocks, list(blocks)[1:]):
        _NEXT[a] = weakref.ref(b)
    return max(0, len(blocks) - 1)


def _loaded_names(m: nn.Module, h) -> list[str]:
    """The tensors accelerate's hook `h` loads for `m` on its pre_forward."""
    from accelerate.utils import named_module_tensors

    return [n for n, _ in named_module_tensors(m, include_buffers=h.offload_buffers, recurse=h.place_submodules,
                                               remove_non_persistent=True)]


class Ahead:
    """One block's offloaded weights sent to their execution device ahead of use, by a background thread: each
    tensor read from the hook's map (host memory, or the offload folder on disk), copied into pinned host memory
    and sent with a non-blocking copy on a side CUDA stream, so that the copies overlap the current block's compute
    (on the CPU, the disk reads do). Modules with tied or int8 weights are left to their hooks."""

    def __init__(self, block: nn.Module):
        self.held = [(m, h) for m in block.modules() for h in offload_hooks(m)
                     if not getattr(h, "tied_params_names", None)]
        self.device = torch.device(self.held[0][1].execution_device) if self.held else torch.device("cpu")
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.copies: dict[tuple[int, str], torch.Tensor] = {}
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._send, daemon=True)
        self.thread.start()

    def _send(self) -> None:
        try:
            self._copy()
        except Exception as e:  # out of memory, say: the hooks load what is missing, and raise there
            self.error = e

    def _copy(self) -> None:
        cuda = self.stream is not None
        with torch.cuda.stream(self.stream) if cuda else contextlib.nullcontext():
            for m, h in self.held:
                for name in _loaded_names(m, h):
                    value = h.weights_map[name]
                    if value is None or value.dtype == torch.int8:
                        break
                    if cuda:
                        src = value if value.is_pinned() else value.pin_memory()
                        self.copies[(id(m), name)] = src.to(self.device, non_blocking=True)
                    else:  # the CPU: read the offload folder's pages now, into memory
                        self.copies[(id(m), name)] = value.clone()

    def install(self, m: nn.Module, h) -> bool:
        """Give `m` the weights sent ahead for it, as its hook's pre_forward would; False when they are not all
        there (the hook then loads them itself)."""
        from accelerate.utils import set_module_tensor_to_device

        self.thread.join()
        names = _loaded_names(m, h)
        if not names or not all((id(m), n) in self.copies for n in names):
            return False
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)  # the copies are done before the block's kernels read them
        h.tied_pointers_to_remove = set()  # pre_forward's bookkeeping, which post_forward reads (no tied weights here)
        for n in names:
            t = self.copies.pop((id(m), n))
            if self.stream is not None:
                t.record_stream(current)  # not reused by the side stream while the current one reads it
            set_module_tensor_to_device(m, n, h.execution_device, value=t, clear_cache=False)
        return True
