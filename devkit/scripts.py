"""Running a bench script the way a person does (`python bench/<name>.py ...` from the repository root), for the
tests that check a maintained script end to end."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_bench_script(name: str, *args: str, timeout: float = 900, **kwargs) -> subprocess.CompletedProcess:
    """bench/<name>.py with these arguments, from the repository root, its output captured as text."""
    return subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, **kwargs)
