"""The CPU cores shared by the compute jobs running on one machine (the CLI's runs, the app's jobs).

torch runs one thread per core by default. Two such processes on the same cores oversubscribe them, and
torch's OpenMP threads spin while they wait for each other, so each job slows the other far more than the 2x
that sharing the cores costs (issue 26 measured 6-10x on this project's 2-core CPU). Here every compute job
registers itself while it runs (`job`: one file per job in a per-user folder of the machine, `_folder`), and
takes its share of the cores, at least one thread (`share`): at its start, at the start of every phase and of
every block pass, so a job that started alone gives up cores when another starts, and takes them back after.

Set DIPSVD_STUDIO_THREADS (or OMP_NUM_THREADS) to fix the thread count yourself; nothing is shared then.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
import threading
from pathlib import Path

import torch

_FULL = torch.get_num_threads()  # torch's own choice for this machine (one per physical core)
_ids = itertools.count()
_blas_threads: list[int] = []  # the last limit set on the BLAS pools beside torch's (scipy's, for skopt's GP)


def _fixed() -> int | None:
    """The thread count the user fixed, or None."""
    for var in ("DIPSVD_STUDIO_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def _folder() -> Path:
    """Where the running jobs are registered: one folder per user and machine, whatever cache each job uses
    ($DIPSVD_STUDIO_JOBS, else dipsvd-studio-jobs-<uid> in $XDG_RUNTIME_DIR or the temporary folder)."""
    env = os.environ.get("DIPSVD_STUDIO_JOBS")
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    folder = Path(env) if env else Path(base) / f"dipsvd-studio-jobs-{os.getuid()}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def running() -> int:
    """The compute jobs running on this machine now (files of processes that ended are removed)."""
    n = 0
    for f in _folder().glob("*.job"):
        try:
            pid = int(f.name.split("-")[0])
        except ValueError:
            continue
        if _alive(pid):
            n += 1
        else:
            f.unlink(missing_ok=True)
    return n


def share() -> int:
    """Set torch's threads (and the BLAS pool's) to this job's share of the cores: torch's default divided by
    the running jobs, at least 1. Returns the count. A no-op where the user fixed it (module docstring)."""
    threads = _fixed() or max(1, _FULL // max(1, running()))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if _blas_threads[-1:] != [threads]:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            pass
        else:
            threadpool_limits(threads, user_api="blas")
        _blas_threads[:] = [threads]
    return threads


@contextlib.contextmanager
def job():
    """Within, this process counts as one running compute job (nested uses in one thread count once per use:
    an app server running two sessions' jobs counts two)."""
    path = _folder() / f"{os.getpid()}-{threading.get_ident()}-{next(_ids)}.job"
    path.write_text("")
    try:
        share()
        yield
    finally:
        path.unlink(missing_ok=True)
        share()
