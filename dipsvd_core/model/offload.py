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


def offload_hooks(module: nn.Module) -> list:
    """accelerate's AlignDevicesHooks on `module` that offload its weights (alone or inside a SequentialHook)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    from accelerate.hooks import AlignDevicesHook

    hooks = getattr(hook, "hooks", (hook,))
    return [h for h in hooks if isinstance(h, AlignDevicesHook) and h.offload]


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
    and blocks that hold their weights are no-ops."""
    held = [(m, h) for m in block.modules() for h in offload_hooks(m)]
    try:
        for m, h in held:
            h.pre_forward(m)  # the weights from the hook's map to the execution device
            h.offload = False
        yield
    finally:
        for m, h in held:
            if not h.offload:
                h.offload = True
                h.post_forward(m, None)  # back to meta
