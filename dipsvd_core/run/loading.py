"""Step 1 of the flow: load a causal LM from the bundled default, a hub id, a local folder, a .gguf file or a
folder saved by this project (compressed.py). Finding the blocks and the targeted Linears, the GGUF and hub
helpers live in models.py; this module only dispatches, so that models.py never imports the save/load module."""
from __future__ import annotations

import os
import time
from pathlib import Path

from ..common.errors import DipSVDError
from ..io.compressed import is_compressed_folder, load_compressed
from ..model.blocks import find_targets
from ..model.models import (DEFAULT_MODEL, LoadedModel, bundled_gguf, fingerprint, first_line, hub_reachable,
                            load_folder, load_gguf, resolve_device, resolve_dtype)
from ..model.offload import block_device_map, link_blocks, offload_placement


def load_model(spec: str = DEFAULT_MODEL, device: str | None = None, dtype: str | None = None,
               trust_remote_code: bool = False, progress=None, offload: bool = False,
               device_map: dict | str | None = None, blocks=None) -> LoadedModel:
    """Load a causal LM from the bundled default, a hub id, a local folder or a .gguf file.

    With `offload` (or an explicit accelerate `device_map`), the model is placed by accelerate: blocks
    that do not fit the GPU stay in CPU memory or on disk, and every pass brings each to the GPU once
    (offload.block_on_device). `blocks` (a plan.Placement, from the memory budgets) says how many blocks stay on
    the GPU, in host memory and on disk; without it accelerate's device_map="auto" decides."""
    t0 = time.perf_counter()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    spec = (spec or DEFAULT_MODEL).strip()
    if offload and blocks is not None and not blocks.gpu and blocks.disk == 0:
        offload = False  # on the CPU with every block in memory there is nothing to place
    if offload and blocks is not None and device_map is None and blocks.device_map is not None:
        device_map = dict(blocks.device_map)  # the plan's, from the config it read
    elif offload and blocks is not None and device_map is None:
        from ..plan import load_config, meta_model

        config, _ = load_config(spec, trust_remote_code)
        device_map = block_device_map(meta_model(config, trust_remote_code), dev, blocks.device, blocks.host)
    placement = offload_placement(dev, dt, spec, device_map) if (offload or device_map is not None) else None
    from_gguf = False
    path = Path(os.path.expanduser(spec))
    if spec.lower() in (DEFAULT_MODEL, "default", "smollm2"):
        gguf = bundled_gguf()
        model, tok = load_gguf(gguf, dt, progress, placement)
        source, from_gguf = str(gguf), True
    elif spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise DipSVDError(f"GGUF file not found: {spec}; check the path")
        model, tok = load_gguf(path, dt, progress, placement)
        source, from_gguf = str(path), True
    elif path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise DipSVDError(f"{spec} is not a model folder (no config.json); give a folder saved by "
                              "save_pretrained, a .gguf file, or a hub id")
        if is_compressed_folder(path):
            return load_compressed(path, device=str(dev), dtype=dt)
        try:
            model, tok = load_folder(str(path), dt, trust_remote_code, placement=placement)
        except Exception as e:
            raise DipSVDError(f"could not load the model in {spec}: {first_line(e)}") from e
        source = str(path.resolve())
    elif spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise DipSVDError(f"model path not found: {spec}; check the path, or give a hub id like "
                          "HuggingFaceTB/SmolLM2-135M")
    else:
        offline = not hub_reachable()
        try:
            model, tok = load_folder(spec, dt, trust_remote_code, local_only=offline, placement=placement)
        except Exception as e:
            msg = first_line(e)
            if "trust_remote_code" in msg:
                raise DipSVDError(f"{spec} needs custom code; pass --trust-remote-code only if you trust it") from e
            where = "the hub is unreachable (offline) and it is not in the local hub cache" if offline else msg
            raise DipSVDError(
                f"could not load '{spec}' from the Hugging Face hub ({where}). If you are offline, use the "
                f"bundled model '{DEFAULT_MODEL}', a local folder, or a .gguf file; set HF_HUB_OFFLINE=1 to use "
                "only the local hub cache") from e
        source = spec
    if placement is None:
        model.to(dev)
    else:
        link_blocks(model)  # each pass over the blocks sends the next one's weights ahead (offload.block_on_device)
    model.eval()
    lm = LoadedModel(model=model, tokenizer=tok, spec=spec, source=source, from_gguf=from_gguf)
    lm.targets = find_targets(model)
    lm.fingerprint = fingerprint(model)
    lm.load_seconds = time.perf_counter() - t0
    return lm
