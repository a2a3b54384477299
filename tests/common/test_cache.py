"""Where caches live and how they are keyed (issue 9): by what a file is, not where it lies."""
from __future__ import annotations

import os
import shutil

from dipsvd_core.common.cache import cache_dir
from dipsvd_core.model.models import bundled_gguf, dequantized_cache, gguf_content_tag


def test_dequantized_model_is_keyed_by_content_not_path(tmp_path):
    src = bundled_gguf()
    a, b = tmp_path / "venv-a" / src.name, tmp_path / "venv-b" / src.name
    for dst in (a, b):
        dst.parent.mkdir()
        shutil.copyfile(src, dst)  # a new clone or venv: same bytes, another path and mtime
    os.utime(b, (0, 0))
    assert gguf_content_tag(a) == gguf_content_tag(b) == gguf_content_tag(src)
    assert dequantized_cache(a) == dequantized_cache(src)

    # Same name and size, other bytes in the header: another model, another cache entry.
    c = tmp_path / "other" / src.name
    c.parent.mkdir()
    shutil.copyfile(src, c)
    with open(c, "r+b") as f:
        f.seek(4096)
        byte = f.read(1)
        f.seek(4096)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert os.path.getsize(c) == os.path.getsize(src)
    assert gguf_content_tag(c) != gguf_content_tag(src)


def test_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DIPSVD_STUDIO_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "explicit" and cache_dir().is_dir()
    monkeypatch.delenv("DIPSVD_STUDIO_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "dipsvd-studio"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "dipsvd-studio"


def test_a_gguf_is_parsed_once_across_plan_and_dequantization(tmp_path):
    """transformers makes a GGUFReader for the config, the tokenizer and the weights; within gguf_parsed_once
    they are one reader, a changed file gets a new one, and gguf's own class is back afterwards."""
    import gguf

    from dipsvd_core.model.models import forget_gguf_readers, gguf_parsed_once

    src = tmp_path / "m.gguf"
    shutil.copyfile(bundled_gguf(), src)
    original = gguf.GGUFReader
    try:
        with gguf_parsed_once():
            first = gguf.GGUFReader(str(src))
            with gguf_parsed_once():  # nested (a plan inside a load): the same reader, still patched after
                assert gguf.GGUFReader(str(src)) is first
            assert gguf.GGUFReader(str(src)) is first
            assert first.fields["general.architecture"].contents() == "llama"
            os.utime(src, (1, 1))  # rewritten in place: parsed again
            assert gguf.GGUFReader(str(src)) is not first
        assert gguf.GGUFReader is original
    finally:
        forget_gguf_readers()
