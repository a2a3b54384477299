"""Shared fixtures: a tiny random Llama saved as a local folder, and the real bundled model.

The tiny model uses the bundled SmolLM2 tokenizer (read from the GGUF, no weights dequantized)
so that it runs on the same real text as the product, offline.
"""
from __future__ import annotations

import os

import pytest

from devkit.models import make_tiny_llama


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """The suite never reads or writes the user's statistics, factors or training caches: a stale
    entry from older code could hide a change. Only the dequantized bundled model (keyed by its
    GGUF file, 15 s to rebuild) and the GPU machine's transformers wheels (devkit/device_versions.py, downloaded once)
    are shared with the user cache."""
    from dipsvd_core.common.cache import cache_dir

    old = os.environ.get("DIPSVD_STUDIO_CACHE")
    root = tmp_path_factory.mktemp("cache")
    for shared in ("models", "device-versions"):
        user = cache_dir() / shared
        user.mkdir(parents=True, exist_ok=True)
        (root / shared).symlink_to(user, target_is_directory=True)
    os.environ["DIPSVD_STUDIO_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("DIPSVD_STUDIO_CACHE", None)
    else:
        os.environ["DIPSVD_STUDIO_CACHE"] = old


@pytest.fixture(scope="session", autouse=True)
def one_job_per_worker():
    """Under pytest-xdist (`make test` runs two workers), each worker counts as one running compute job
    (common/cores.py) for its whole session: two workers then take one thread each instead of oversubscribing the
    cores, and the last one running takes them all back at its next phase."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    from dipsvd_core.common import cores

    with cores.job():
        yield


def pytest_collection_modifyitems(config, items):
    """The end-to-end tests on the bundled model (marked slow, the longest) first, the others in their order
    after them: with two workers the long ones start at once and the short ones fill in around them."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir):
    from dipsvd_core.run.loading import load_model

    return load_model(tiny_model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def smollm():
    from dipsvd_core.run.loading import load_model

    return load_model("smollm2-135m", device="cpu", dtype="float32")


class _Machine:
    """The compute jobs of a machine with `full` cores, kept in a folder of the test's own (common/cores.py)."""

    def __init__(self, jobs, monkeypatch):
        self.jobs, self.monkeypatch, self.others = jobs, monkeypatch, []

    def with_cores(self, full: int) -> "_Machine":
        from dipsvd_core.common import cores

        self.monkeypatch.setattr(cores, "_FULL", full)
        return self

    def other_job(self):
        """A live process of its own registered as another compute job; its job file (unlink it to end the job)."""
        import subprocess
        import sys

        from dipsvd_core.common import cores

        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        self.others.append(other)
        cores._folder()
        job = self.jobs / f"{other.pid}-1-0.job"
        job.write_text("")
        return job


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """The cores' bookkeeping isolated: its own jobs folder, no thread count fixed by the environment; afterwards the
    other jobs' processes end and torch's thread count is restored."""
    import torch

    from dipsvd_core.common import cores

    monkeypatch.setenv("DIPSVD_STUDIO_JOBS", str(tmp_path / "jobs"))
    monkeypatch.delenv("DIPSVD_STUDIO_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before, state = torch.get_num_threads(), _Machine(tmp_path / "jobs", monkeypatch)
    try:
        yield state
    finally:
        for other in state.others:
            other.kill()
            other.wait()
        torch.set_num_threads(before)
        cores._blas_threads.clear()
