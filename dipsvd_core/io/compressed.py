"""Step 7 of the flow: save and load compressed models as safetensors, with no pickle.

A saved folder is an ordinary Hugging Face folder (config.json, safetensors shards, tokenizer)
whose config.json carries a `dipsvd_compression` entry: the method, the settings and every
module's rank. Its model type is ours (`dipsvd_llama`), and it carries configuration_dipsvd.py, modeling_dipsvd.py
and an `auto_map` (portable.py), so that plain transformers loads it with trust_remote_code=True, without this
project, and refuses without the flag instead of taking it for a dense model. With a report, it also carries a
model card, README.md (model_card.py). `load_compressed` rebuilds the base architecture from the config (the
base's model type is kept in the entry; folders saved before our model type still read) on the meta device, swaps
in LowRankLinear modules of those ranks and assigns the tensors shard by shard; `trust_remote_code` is never used.
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

from ..common.errors import DipSVDError
from ..lowrank.surgery import (LowRankLinear, densify, fuse_model, fuse_siblings, lay_out_pairs, module_ranks,
                               set_module, unfuse_siblings)
from ..methods.handlers import handler
from ..model.blocks import find_targets
from ..model.models import LoadedModel, fingerprint, resolve_device
from .portable import ENTRY, MODELING_FILE, base_config_dict, portable_reason, saved_config_dict, write_code_files


def is_compressed_folder(path: Path) -> bool:
    try:
        return ENTRY in json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False


def save_compressed(model: nn.Module, out_dir, tokenizer=None, info: dict | None = None,
                    force: bool = False, max_shard_size: str | int = "5GB", report: dict | None = None) -> Path:
    """Write `model` (with its LowRankLinear ranks) to out_dir atomically, in safetensors shards of at most
    `max_shard_size`, under our model type with the code files that let plain transformers load it (portable.py),
    and with a model card of `report` (report.py's dict) where one is given."""
    entry = dict(info or {})
    entry["ranks"] = module_ranks(model)
    groups = unfuse_siblings(model)  # each v its own tensor while saving (shared storage would be copied at once)
    lay_out_pairs(model, inference=False)  # each u row-major, one at a time (transformers would copy a shard's)
    if groups:
        entry["siblings"] = groups  # the pairs that read one input, fused again on load (here and in plain transformers)
    reason = portable_reason(model, entry)
    entry["portable"] = reason or True  # True: plain transformers loads it (trust_remote_code); else why not
    cfg = model.config
    had = getattr(cfg, ENTRY, None)
    setattr(cfg, ENTRY, entry)
    state = handler(entry["method"]).saved_state(model, entry) if "method" in entry else None  # e.g. int8 factors

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state, max_shard_size=max_shard_size)
        write_code_files(tmp, model, reason)
        _retype_config(tmp / "config.json", with_code=(tmp / MODELING_FILE).exists())
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            from .model_card import model_card

            (tmp / "README.md").write_text(model_card(report, str(out_dir), entry))

    try:
        return _write_folder(out_dir, force, write)
    finally:
        fuse_siblings(model, groups)
        lay_out_pairs(model)
        if had is not None:  # the model's config as it was
            setattr(cfg, ENTRY, had)
        else:
            delattr(cfg, ENTRY)


def _retype_config(path: Path, with_code: bool) -> None:
    """config.json under our model type (portable.saved_config_dict), rewritten in place."""
    raw = json.loads(path.read_text())
    path.write_text(json.dumps(saved_config_dict(raw, with_code), indent=2, sort_keys=True) + "\n")


def save_dense(model: nn.Module, out_dir, tokenizer=None, force: bool = False, max_shard_size: str | int = "5GB"):
    """Write `model` with every low-rank pair multiplied back into an ordinary Linear (surgery.densify, in place):
    a plain folder of the base architecture that any tool loads without custom code, as large as the original."""
    densify(model)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return _write_folder(out_dir, force, write)


def _write_folder(out_dir, force: bool, write) -> Path:
    """Run `write(tmp)` into a temporary sibling of out_dir and rename it into place; a non-empty out_dir is
    replaced only with `force`, and a failed write leaves it as it was."""
    out = Path(os.path.expanduser(str(out_dir)))
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise DipSVDError(f"{out} already exists and is not empty; choose another folder or pass --force "
                          "to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{int(time.time())}")
    try:
        write(tmp)
        _modes_of_umask(tmp)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def _modes_of_umask(folder: Path) -> None:
    """Give the folder and everything in it the modes of any file the user writes (0666 and 0777 less the umask):
    some writers (model.safetensors, through a private temporary file) leave 0600, which a teammate cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~umask)


def load_compressed(path, device: str | None = None, dtype: torch.dtype | None = None):
    """Rebuild a saved compressed model with its tokenizer; returns a LoadedModel."""
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    path = Path(os.path.expanduser(str(path)))
    model = compressed_model(path, device, dtype)
    tok = AutoTokenizer.from_pretrained(path, config=model.config)  # not config.json's: that names custom code
    lm = LoadedModel(model=model, tokenizer=tok, spec=str(path), source=str(path.resolve()))
    lm.targets = find_targets(model)
    lm.fingerprint = fingerprint(model)
    lm.load_seconds = time.perf_counter() - t0
    return lm


def compressed_model(path, device: str | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """The saved compressed model of `path`, in eval mode on `device`.

    The architecture is built with its parameters on the meta device (no dense weights, no random
    initialisation), its compressed Linears swapped for LowRankLinear modules of the saved ranks, and the
    tensors are read one shard at a time straight onto `device` and assigned in place: the peak is the saved
    size plus one tensor's dtype conversion, not the two or three copies of building a dense model first. The
    pairs that read one input are then fused (surgery.fuse_siblings)."""
    path = Path(os.path.expanduser(str(path)))
    if not is_compressed_folder(path):
        raise DipSVDError(f"{path} is not a compressed model folder (no '{ENTRY}' in config.json)")
    config = base_config(path)
    entry = getattr(config, ENTRY)
    dt = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dt, str):
        dt = getattr(torch, dt)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise DipSVDError(f"{path} holds no .safetensors weights")
    dev = resolve_device(device)
    model = _empty_model(config, entry["ranks"], dt, path)
    _assign_shards(model, files, entry, dt, dev, path)
    model = model.to(dev).eval()  # the buffers (rotary frequencies) were built on the host
    fuse_model(model, entry.get("siblings"))  # a folder saved without the list: found by one forward
    return model


def base_config(path: Path):
    """The base architecture's transformers config of a saved folder (its config.json names our model type; the
    base's is in the entry, or config.json's own in a folder saved before our model type)."""
    from transformers import CONFIG_MAPPING

    raw = base_config_dict(json.loads((Path(path) / "config.json").read_text()))
    if raw.get("model_type") not in CONFIG_MAPPING:
        raise DipSVDError(f"{path}: model type {raw.get('model_type')!r} is not one this transformers knows; "
                          "upgrade transformers")
    return CONFIG_MAPPING[raw["model_type"]].from_dict(raw)


def _empty_model(config, ranks: dict, dtype: torch.dtype, path: Path) -> nn.Module:
    """The architecture of `config` with parameters on the meta device (buffers real) and LowRankLinear modules
    of `ranks` in place of the compressed Linears."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        mods = dict(model.named_modules())
        for name, rank in ranks.items():
            old = mods.get(name)
            if not isinstance(old, nn.Linear):
                raise DipSVDError(f"{path}: module {name} in the rank list is not a Linear of this architecture")
            set_module(model, name, LowRankLinear(old.in_features, old.out_features, int(rank),
                                                  old.bias is not None, dtype=dtype))
    return model


def _assign_shards(model: nn.Module, files: list[Path], entry: dict, dtype: torch.dtype, device, path: Path) -> None:
    """Read each shard onto `device` and assign its tensors to `model`'s meta parameters; what the method stored
    beyond floating-point tensors is turned back by its handler, shard by shard (a tensor whose companion lies in
    a later shard waits in `held`). Every parameter must end up loaded, except those tied to another."""
    method = handler(entry["method"]) if "method" in entry else None
    expected, loaded, held = set(model.state_dict()), set(), {}
    for f in files:
        shard = load_file(f, device=str(device))
        if method is not None:
            shard = method.loaded_state(shard, entry, dtype, held)
        for k in shard:
            if shard[k].is_floating_point() and shard[k].dtype != dtype:
                shard[k] = shard[k].to(dtype)
        unexpected = [k for k in shard if k not in expected]
        if unexpected:
            raise DipSVDError(f"{path}: weights do not match the architecture (unexpected {unexpected[:3]})")
        model.load_state_dict(shard, strict=False, assign=True)
        loaded.update(shard)
        del shard
    model.tie_weights()
    tied = _tied_keys(model)
    missing = sorted(k for k in expected - loaded - tied)
    if held or missing:
        raise DipSVDError(f"{path}: weights do not match the architecture (missing {(missing or sorted(held))[:3]})")


def _tied_keys(model: nn.Module) -> set[str]:
    """Parameter names that alias another parameter (e.g. lm_head.weight tied to the embeddings)."""
    seen, tied = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.setdefault(id(p), name)
    return tied
