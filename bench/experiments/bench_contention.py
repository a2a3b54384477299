"""Issue 26: two compresses at once on the same cores, against one alone.

    .venv/bin/python bench/experiments/bench_contention.py [--runs 1] [--write]

The work: `compress --method svd-llm --ratio 0.2 --calib wiki --calib-windows 8 --seqlen 256 --eval wiki
--eval-tokens 2048 --no-eval-original` on the bundled SmolLM2-135M, each process on a cache of its own that holds
only the dequantized model and the extracted text (hard links to a warm cache), so statistics and factors are cold.
Three ways: one alone; two at once as shipped (cores.py: each job takes its share of the cores); two at once with
each fixed at torch's default thread count (DIPSVD_STUDIO_THREADS = the cores, as before cores.py). The time of a
pair is until both have finished. --write replaces the "## Two jobs on the same cores (issue 26)" section.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent  # bench/experiments/: this script's results sit beside it
sys.path.insert(0, str(HERE.parent))  # bench/: common.py and the maintained scripts

from common import RESULTS, ROOT, machine, replace_section, utc_date, write_json

SECTION = "## Two jobs on the same cores (issue 26)"
WORK = ["compress", "--method", "svd-llm", "--ratio", "0.2", "--calib", "wiki", "--calib-windows", "8", "--seqlen",
        "256", "--eval", "wiki", "--eval-tokens", "2048", "--no-eval-original", "--quiet"]


def warm_cache(root: Path) -> Path:
    """A cache with the dequantized model and the text, from one small run."""
    base = root / "base"
    env = dict(os.environ, DIPSVD_STUDIO_CACHE=str(base))
    subprocess.run([sys.executable, "-m", "dipsvd_core", "evaluate", "--eval", "wiki", "--eval-tokens", "256",
                    "--seqlen", "256", "--quiet"], cwd=ROOT, env=env, check=True, capture_output=True)
    return base


def fresh(root: Path, base: Path, name: str) -> Path:
    """A cache of its own: hard links to the warm cache's model and text, nothing else."""
    cache = root / name
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir()
    for sub in ("models", "text"):
        if (base / sub).exists():
            shutil.copytree(base / sub, cache / sub, copy_function=os.link)
    return cache


def start(cache: Path, threads: int | None) -> subprocess.Popen:
    env = dict(os.environ, DIPSVD_STUDIO_CACHE=str(cache))
    env.pop("OMP_NUM_THREADS", None)
    env.pop("DIPSVD_STUDIO_THREADS", None)
    if threads:
        env["DIPSVD_STUDIO_THREADS"] = str(threads)
    return subprocess.Popen([sys.executable, "-m", "dipsvd_core", *WORK], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def timed(root: Path, base: Path, n: int, threads: int | None) -> float:
    """Seconds until all of n processes started together have finished."""
    procs = [start(fresh(root, base, f"run{i}"), threads) for i in range(n)]
    t0 = time.perf_counter()
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"compress failed: {err[-2000:]}")
    return time.perf_counter() - t0


def main() -> None:
    import torch

    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    cores = torch.get_num_threads()
    ways = {"one alone": (1, None), "two at once, cores shared": (2, None),
            f"two at once, {cores} threads each": (2, cores)}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        root = Path(tmp)
        base = warm_cache(root)
        times = {w: [] for w in ways}
        for _ in range(args.runs):
            for way, (n, threads) in ways.items():
                times[way].append(timed(root, base, n, threads))
                print(way, f"{times[way][-1]:.1f} s", flush=True)
    med = {w: statistics.median(t) for w, t in times.items()}
    alone = med["one alone"]
    write_json(HERE / "contention.json", {"machine": machine(), "date": utc_date(), "work": WORK, "seconds": times})
    rows = ["| how | seconds | against one alone |", "|---|---|---|"]
    rows += [f"| {w} | {', '.join(f'{t:.1f}' for t in times[w])} | {med[w] / alone:.2f}x |" for w in ways]
    body = (f"{SECTION}\n\nMachine: {machine()}. Date: {utc_date()}. Command: `.venv/bin/python "
            f"bench/experiments/bench_contention.py --runs {args.runs} --write` (bench/experiments/contention.json). The work: `python -m "
            f"dipsvd_core {' '.join(WORK)}`, each process on a cold cache of its own; a pair's time is until both "
            "have finished. Target: two at once in at most 2.6x one alone.\n\n" + "\n".join(rows))
    print(body)
    if args.write:
        replace_section(RESULTS, SECTION, body, keep_from="### ")


if __name__ == "__main__":
    main()
