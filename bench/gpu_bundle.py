"""`make gpu-bundle`: the folder .gpu/ that the GPU check (bench/gpu_check.py) needs on a bare GPU machine that
reaches no package registry, carried there with the working tree (`carry: [".gpu"]`, at most 60 MiB):

- wheels/: the project's needs that the machine's own Python 3.12 lacks, for CPython 3.12 manylinux x86_64
  (`pip download --only-binary=:all:`); the machine has torch 2.11 (CUDA), transformers 5.17, accelerate 1.15,
  safetensors 0.8, numpy, scipy, scikit-learn, pandas, peft and pytest, and the check reads no GGUF, no gensim
  text and no hub data set, so WHEELS is empty unless a package is added there;
- tokenizer/: the bundled SmolLM2 tokenizer saved as a folder (here it is read from the GGUF wheel, which needs gguf);
- calib.jsonl and eval.jsonl: the two halves of the wiki text (the calibration and the evaluation articles), cut
  to what the largest case reads;
- run.sh: installs the wheels with `pip install --no-index --no-deps --target` into a temporary folder on
  PYTHONPATH and runs the check, its JSON and markdown summary under $OUT. Without CUDA it says so in one line and
  exits non-zero.

    .venv/bin/python bench/gpu_bundle.py [--folder .gpu]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import ROOT

WHEELS: list[str] = []  # pinned requirements the GPU machine lacks and the check imports (none today)
TEXT_CHARS = 2_000_000  # per half: far more than the largest case reads (32 x 512 calibration, twice that evaluated)
LIMIT = 60 * 2**20

RUN_SH = r"""#!/usr/bin/env bash
# The GPU check on the device machine (written by `make gpu-bundle`); run from the repository root:
#   bash .gpu/run.sh [gpu_check.py options, e.g. --cases rates,tiny,tiny\ cuda]
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
PY="${PYTHON:-python3}"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  echo "gpu-check: no CUDA device visible to $PY's torch here; run .gpu/run.sh on the GPU machine" >&2
  exit 3
fi
OUT="${OUT:-$HERE/out}"
mkdir -p "$OUT"
SITE="$(mktemp -d)"
shopt -s nullglob
wheels=("$HERE"/wheels/*.whl)
if ((${#wheels[@]})); then
  "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" "${wheels[@]}" || exit 4
fi
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export DIPSVD_STUDIO_CACHE="${DIPSVD_STUDIO_CACHE:-$(mktemp -d)}"
cd "$ROOT"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
timeout "${GPU_CHECK_SECONDS:-500}" "$PY" bench/gpu_check.py --tokenizer "$HERE/tokenizer" \
  --text "$HERE/calib.jsonl" "$HERE/eval.jsonl" --out "$OUT/gpu_check.json" --md "$OUT/gpu_check.md" "$@" \
  2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
"""


def texts(folder: Path) -> None:
    """The wiki articles' two halves (data.load_documents' calibration and evaluation splits) as JSON lines."""
    from dipsvd_core.engine.data import wiki_articles

    docs = wiki_articles()
    half = len(docs) // 2
    for name, part in (("calib", docs[:half]), ("eval", docs[half:])):
        rows, size = [], 0
        for doc in part:
            if size >= TEXT_CHARS:
                break
            rows.append(json.dumps({"text": doc}))
            size += len(doc)
        (folder / f"{name}.jsonl").write_text("\n".join(rows) + "\n")


def wheels(folder: Path) -> None:
    out = folder / "wheels"
    out.mkdir(exist_ok=True)
    if WHEELS:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--platform", "manylinux2014_x86_64", "-d", str(out), *WHEELS],
                       check=True)


def size_of(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--folder", default=str(ROOT / ".gpu"))
    folder = Path(p.parse_args().folder)
    folder.mkdir(exist_ok=True)
    from gpu_check import tokenizer

    tokenizer(None).save_pretrained(folder / "tokenizer")
    texts(folder)
    wheels(folder)
    (folder / "run.sh").write_text(RUN_SH)
    (folder / "run.sh").chmod(0o755)
    size = size_of(folder)
    print(f"{folder}: {size / 2**20:.1f} MiB (limit {LIMIT / 2**20:.0f} MiB)")
    if size > LIMIT:
        raise SystemExit(f"{folder} is {size / 2**20:.1f} MiB, over the {LIMIT / 2**20:.0f} MiB a device call carries")


if __name__ == "__main__":
    main()
