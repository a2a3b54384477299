"""On-disk caches (statistics, factors, dequantized models) in a user cache folder.

Location: $DIPSVD_STUDIO_CACHE, else $XDG_CACHE_HOME/dipsvd-studio, else ~/.cache/dipsvd-studio.
Tensors are stored as safetensors with a JSON sidecar, never pickled.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def cache_dir() -> Path:
    env = os.environ.get("DIPSVD_STUDIO_CACHE")
    if env:
        root = Path(env)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "dipsvd-studio"
    root.mkdir(parents=True, exist_ok=True)
    return root


def make_key(*parts) -> str:
    """A short stable hash of JSON-serialisable parts."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def save_tensors(kind: str, key: str, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Atomically write tensors (and a JSON sidecar) under <cache>/<kind>/<key>."""
    folder = cache_dir() / kind
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.safetensors"
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)
    (folder / f"{key}.json").write_text(json.dumps(meta, indent=1))
    return path


def load_tensors(kind: str, key: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    folder = cache_dir() / kind
    path, meta = folder / f"{key}.safetensors", folder / f"{key}.json"
    if not (path.exists() and meta.exists()):
        return None
    try:
        return load_file(path), json.loads(meta.read_text())
    except Exception:  # a torn or stale file is recomputed, not trusted
        return None
