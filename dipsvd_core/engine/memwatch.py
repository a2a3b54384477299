"""Measured memory per phase: the peak host RSS and peak device memory while a phase ran, for the JSON report's
`memory.phases.<phase>` (host_peak_bytes, device_peak_bytes), set against the plan's prediction of each phase.

The host peak is the process's high-water mark (VmHWM), reset as a phase starts (after freed memory is returned to
the system) by writing 5 to /proc/self/clear_refs (Linux 4.0 and later); where that is not possible the lifetime
peak (ru_maxrss) stands in and the figure is marked `since_start`. The device peak is
torch.cuda.max_memory_allocated, reset likewise. Phases may nest (Fisher inside a factor pass that reads it): a
phase's peak includes those of the phases inside it, so before an inner phase resets the counters, what they held so
far is folded into every phase still open. A phase that runs more than once keeps its highest peak.

The reset lowers the kernel's own high-water mark, which ru_maxrss (this process's, or a parent's wait4 figure)
reads too; so the process's lifetime host peak is kept here (`lifetime_host_peak`, read by
pipeline.peak_memory_mb) and only that figure is the run's peak. The device counter is reset the same way, so its
lifetime peak is kept likewise (`lifetime_device_peak`: the report's memory.device_peak_bytes).

A device out-of-memory error (torch.OutOfMemoryError, raised by CUDA) inside a phase leaves it as a one-line
DipSVDError naming the phase and the plan's advice (errors.device_out_of_memory).
"""
from __future__ import annotations

import contextlib
import gc
import resource
import time
from pathlib import Path

import torch

from ..common import cores
from ..common.errors import device_out_of_memory
from .stream import release_host_memory

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")
_lifetime = [0]  # the highest host peak seen before any reset
_lifetime_device = [0]  # the highest device peak seen before any reset


def _host_peak() -> int:
    """The host high-water mark in bytes since the last reset (VmHWM), or the lifetime peak."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def lifetime_host_peak() -> int:
    """This process's host peak in bytes since it started, across the phases' resets."""
    _lifetime[0] = max(_lifetime[0], _host_peak())
    return _lifetime[0]


def _reset_host() -> bool:
    lifetime_host_peak()
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _device_peak() -> int:
    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else 0


def lifetime_device_peak() -> int:
    """This process's device peak in bytes since it started, across the phases' resets (0 without CUDA)."""
    _lifetime_device[0] = max(_lifetime_device[0], _device_peak())
    return _lifetime_device[0]


def _reset_device() -> None:
    if torch.cuda.is_available():
        lifetime_device_peak()
        torch.cuda.reset_peak_memory_stats()


class PhaseMemory:
    """The measured peaks and seconds of each phase of one run (`phases`: name -> figures)."""

    def __init__(self):
        self.phases: dict[str, dict] = {}
        self._open: list[dict] = []  # the open phases, outermost first: their peaks so far

    def _fold(self) -> None:
        """What the counters hold now, into every open phase (before a reset)."""
        host, device = _host_peak(), _device_peak()
        for rec in self._open:
            rec["host_peak_bytes"] = max(rec["host_peak_bytes"], host)
            rec["device_peak_bytes"] = max(rec["device_peak_bytes"], device)

    @contextlib.contextmanager
    def phase(self, name: str):
        """Measure the block inside as phase `name`. What earlier phases freed is first given back to the system
        (a garbage collection and malloc_trim), so the reset starts from what is alive, not from freed heap the
        allocator kept."""
        self._fold()
        cores.share()  # a phase takes its share of the cores as the machine's jobs are now
        gc.collect()
        release_host_memory()
        exact = _reset_host()
        _reset_device()
        rec = {"host_peak_bytes": 0, "device_peak_bytes": 0, "seconds": 0.0, "since_start": not exact}
        self._open.append(rec)
        t0 = time.perf_counter()
        try:
            yield rec
        except torch.OutOfMemoryError as e:
            raise device_out_of_memory(str(e), name) from None
        finally:
            rec["seconds"] = time.perf_counter() - t0
            self._fold()
            self._open.pop()
            old = self.phases.setdefault(name, rec)
            if old is not rec:
                for k in ("host_peak_bytes", "device_peak_bytes"):
                    old[k] = max(old[k], rec[k])
                old["seconds"] += rec["seconds"]
                old["since_start"] |= rec["since_start"]

    def report(self) -> dict:
        """memory.phases of the JSON report: per phase its peaks (bytes) and seconds."""
        return {n: {k: v for k, v in r.items() if k != "since_start" or v} for n, r in self.phases.items()}
