"""A saved folder is readable as any file the user writes: its modes follow the umask (issue 36), whatever mode the
writer left (safetensors' file was 0600)."""
from __future__ import annotations

import os
import stat

from dipsvd_core.io.compressed import _write_folder


def test_saved_files_take_the_umask_modes(tmp_path):
    def write(tmp):
        tmp.mkdir()
        (tmp / "sub").mkdir(mode=0o700)
        for name in ("model.safetensors", "sub/config.json"):
            fd = os.open(tmp / name, os.O_CREAT | os.O_WRONLY, 0o600)  # as a private temporary file is made
            os.close(fd)

    old = os.umask(0o022)
    try:
        out = _write_folder(tmp_path / "saved", False, write)
    finally:
        os.umask(old)
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")}
    assert modes == {"model.safetensors": 0o644, "sub": 0o755, "sub/config.json": 0o644}
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
