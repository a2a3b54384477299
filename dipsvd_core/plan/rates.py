"""The rates of the plan's time model that its few-second microbenchmark cannot measure at the real widths: the
float64 (or float32) eigendecompositions of the whitening and the factors, 4,096 and 14,336 wide on an 8B model.
They are measured once per device (`measure_factorings`: `plan --measure-rates`, or bench/gpu_check.py's rates case)
and stored in the cache folder under the device's name (`store`, `stored`); a plan then reads its eigh times from
them (`EighTimes`: log-log interpolation between the measured widths, width cubed beyond them) and says so.

No published figures stand in for them: a card's datasheet gives peak FLOP/s and memory bandwidth, which the
microbenchmark measures anyway (matmuls, copies), while a wide eigendecomposition is bound by its tridiagonal
reduction, half of it matrix-vector products, at a rate no datasheet gives. Where nothing is stored, the plan scales
the microbenchmark's own 512-wide eigh by width cubed and says that this is what it did.
"""
from __future__ import annotations

import json
import math
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..common.cache import cache_dir


def device_name(device: torch.device) -> str:
    """The name rates are stored under: the GPU's (torch.cuda.get_device_name) or the host CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()}"


def _path(name: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-").lower() or "device"
    return cache_dir() / "rates" / f"{slug}.json"


def stored(name: str) -> dict | None:
    """The rates stored for the device called `name`, or None."""
    try:
        return json.loads(_path(name).read_text())
    except (OSError, ValueError):
        return None


def store(name: str, eigh_s: dict[str, float], source: str) -> Path:
    """Keep `eigh_s` ("<where> <width> <dtype>" -> seconds, as measure_factorings gives them) for the device
    `name`, merged over what was stored before; `source` says what measured them."""
    old = stored(name) or {}
    merged = {**old.get("eigh_s", {}), **eigh_s}
    data = {"device": name, "date": time.strftime("%Y-%m-%d", time.gmtime()), "source": source, "eigh_s": merged}
    path = _path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def measure_factorings(device: torch.device, widths, dtypes=(torch.float32, torch.float64), cholesky: bool = False,
                       host_widths=None) -> dict[str, dict[str, float]]:
    """Seconds of eigh (and Cholesky) of SPD matrices of each width and dtype, on `device` and, for a GPU, on the
    host too (at `host_widths`, default the same): {"eigh_s": {"<where> <width> <dtype>": s}, "cholesky_s": {...}};
    on the CPU the device is the host."""
    from ..lowrank.scalings import best_seconds, spd_matrix

    out = {"eigh_s": {}, "cholesky_s": {}}
    places = [("host" if device.type == "cpu" else "device", device, widths)]
    if device.type != "cpu":
        places.append(("host", torch.device("cpu"), widths if host_widths is None else host_widths))
    for where, at, ns in places:
        for n in ns:
            for dtype in dtypes:
                g = spd_matrix(n, dtype, at)
                key = f"{where} {n} {str(dtype).removeprefix('torch.')}"
                out["eigh_s"][key] = best_seconds(lambda: torch.linalg.eigh(g), at)
                if cholesky:
                    out["cholesky_s"][key] = best_seconds(lambda: torch.linalg.cholesky(g), at)
    return out


@dataclass
class EighTimes:
    """Seconds of an eigendecomposition by width, from measured points (width -> seconds) in one dtype and place:
    log-log interpolation between two measured widths, width cubed beyond the widest (or below the narrowest).
    `sources` says where each point came from."""

    points: dict[int, float]
    sources: dict[int, str] = field(default_factory=dict)

    def __call__(self, width: int) -> float:
        ws = sorted(self.points)
        if width in self.points:
            return self.points[width]
        if width > ws[-1] or len(ws) == 1 or width < ws[0]:
            ref = ws[-1] if width > ws[-1] else ws[0]
            return self.points[ref] * (width / ref) ** 3
        hi = next(w for w in ws if w > width)
        lo = max(w for w in ws if w < width)
        slope = math.log(self.points[hi] / self.points[lo]) / math.log(hi / lo)
        return self.points[lo] * (width / lo) ** slope

    def words(self, widths) -> str:
        """How the eigh times at `widths` were had, for the plan's note."""
        parts = []
        for w in sorted(set(widths)):
            if w in self.points:
                parts.append(f"{w} wide {self.sources.get(w, 'measured')}")
            elif min(self.points) < w < max(self.points):
                parts.append(f"{w} wide interpolated between measured widths")
            else:
                ref = max(self.points) if w > max(self.points) else min(self.points)
                parts.append(f"{w} wide scaled by width cubed from {ref} wide ({self.sources.get(ref, 'measured')})")
        return "; ".join(parts)


def eigh_times(device: torch.device, dtype: str, measured_now: dict[int, float], where: str = "device") -> EighTimes:
    """The microbenchmark's own points (`measured_now`) with what is stored for this device in this dtype and place
    (on the CPU, the host's) laid over them."""
    name = device_name(device)
    times = EighTimes(dict(measured_now), {w: "measured now" for w in measured_now})
    data = stored(name) or {}
    place = "host" if device.type == "cpu" else where
    for key, seconds in data.get("eigh_s", {}).items():
        at, width, dt = key.split()
        if at == place and dt == dtype:
            times.points[int(width)] = seconds
            times.sources[int(width)] = f"stored {data.get('date')} ({data.get('source')})"
    return times
