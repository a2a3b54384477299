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
