"""Step 7 of the flow: save and load compressed models as safetensors, with no pickle.

A saved folder is an ordinary Hugging Face folder (config.json, model.safetensors, tokenizer)
whose config.json carries a `dipsvd_compression` entry: the method, the settings and every
module's rank. `load_compressed` rebuilds the architecture from the config, swaps in
LowRankLinear modules of those ranks and loads the tensors; `trust_remote_code` is never used.
What a method stores beyond floating-point tensors comes from its handler (methods.py): a remapped Dobi-SVD
model (entry "remap": true) stores each low-rank u and v as int8 with a float32 `<name>_scale` per rank
vector, and is dequantized on load.
Saving writes to a temporary sibling folder and renames it into place, and refuses to replace a
non-empty folder unless `force` is given.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .errors import DipSVDError
from .methods import handler
from .models import LoadedModel, find_targets, fingerprint, resolve_device
from .surgery import LowRankLinear, module_ranks, set_module

ENTRY = "dipsvd_compression"


def is_compressed_folder(path: Path) -> bool:
    try:
        return ENTRY in json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False


def save_compressed(model: nn.Module, out_dir, tokenizer=None, info: dict | None = None,
                    force: bool = False) -> Path:
    """Write `model` (with its LowRankLinear ranks) to out_dir atomically."""
    out = Path(os.path.expanduser(str(out_dir)))
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise DipSVDError(f"{out} already exists and is not empty; choose another folder or pass --force "
                          "to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{int(time.time())}")
    entry = dict(info or {})
    entry["ranks"] = module_ranks(model)
    cfg = model.config
    had = getattr(cfg, ENTRY, None)
    setattr(cfg, ENTRY, entry)
    state = handler(entry["method"]).saved_state(model, entry) if "method" in entry else None  # e.g. int8 factors
    try:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        setattr(cfg, ENTRY, had) if had is not None else delattr(cfg, ENTRY)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def load_compressed(path, device: str | None = None, dtype: torch.dtype | None = None):
    """Rebuild a saved compressed model; returns a LoadedModel."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    path = Path(os.path.expanduser(str(path)))
    if not is_compressed_folder(path):
        raise DipSVDError(f"{path} is not a compressed model folder (no '{ENTRY}' in config.json)")
    config = AutoConfig.from_pretrained(path)
    entry = getattr(config, ENTRY)
    dt = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dt, str):
        dt = getattr(torch, dt)
    model = AutoModelForCausalLM.from_config(config, dtype=dt)
    mods = dict(model.named_modules())
    for name, rank in entry["ranks"].items():
        old = mods.get(name)
        if not isinstance(old, nn.Linear):
            raise DipSVDError(f"{path}: module {name} in the rank list is not a Linear of this architecture")
        set_module(model, name, LowRankLinear(old.in_features, old.out_features, int(rank),
                                              old.bias is not None, dtype=dt))
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    if not state:
        raise DipSVDError(f"{path} holds no .safetensors weights")
    if "method" in entry:  # what the method stored beyond floating-point tensors (Dobi-SVD's int8 factors)
        state = handler(entry["method"]).loaded_state(state, entry, dt)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = _tied_keys(model)
    bad = [k for k in missing if k not in tied]
    if bad or unexpected:
        raise DipSVDError(f"{path}: weights do not match the architecture (missing {bad[:3]}, "
                          f"unexpected {unexpected[:3]})")
    model.tie_weights()
    model.to(resolve_device(device)).eval()
    tok = AutoTokenizer.from_pretrained(path)
    lm = LoadedModel(model=model, tokenizer=tok, spec=str(path), source=str(path.resolve()))
    lm.targets = find_targets(model)
    lm.fingerprint = fingerprint(model)
    lm.load_seconds = time.perf_counter() - t0
    return lm


def _tied_keys(model: nn.Module) -> set[str]:
    """Parameter names that alias another parameter (e.g. lm_head.weight tied to the embeddings)."""
    seen, tied = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.setdefault(id(p), name)
    return tied
