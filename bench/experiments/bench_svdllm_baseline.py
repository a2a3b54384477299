"""Issue 23, item 5: the cold compress's statistics and factors against a plain SVD-LLM, as the papers' code does it.

    .venv/bin/python bench/experiments/bench_svdllm_baseline.py [--rounds 2] [--windows 32] [--seqlen 512] [--write]

The baseline (`baseline`) is SVD-LLM's recipe written the plain way: a forward hook on every targeted Linear adds
X^T X of each window to that Linear's float32 covariance (one per Linear, all held at once, the whole model run
per window), then per matrix the Cholesky factor S of the covariance (float64, the diagonal lifted until it
factors), the SVD of W S in float32, and the rank that removes --ratio of the matrix's parameters kept as
(U sqrt(Sigma), sqrt(Sigma) V^T S^-1). Ours is `Workbench.prefactor` of svd-llm on an empty cache: one
block-streaming pass that collects each input group's float64 Gram and factors the block while its Grams exist,
every matrix at full rank, written to the cache (statistics plus factors of a cold `compress`). The two run
alternately, --rounds times each, in one process on the bundled SmolLM2-135M; the medians are compared. The
target: ours at most 0.75x the baseline. --write replaces the "## Cold statistics and factors against plain
SVD-LLM (issue 23)" section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent  # bench/experiments/: this script's results sit beside it
sys.path.insert(0, str(HERE.parent))  # bench/: common.py and the maintained scripts

from common import RESULTS, load_bundled, machine, replace_section, utc_date

SECTION = "## Cold statistics and factors against plain SVD-LLM (issue 23)"


@torch.no_grad()
def baseline(lm, windows: torch.Tensor, ratio: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """SVD-LLM the plain way (module docstring): name -> (u, v) at the uniform rank of `ratio`."""
    mods = dict(lm.model.named_modules())
    covs = {t.name: torch.zeros(t.in_features, t.in_features) for t in lm.targets}

    def hook(name):
        def fn(module, args, out):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            covs[name] += x.T @ x
        return fn

    handles = [mods[n].register_forward_hook(hook(n)) for n in covs]
    try:
        for i in range(len(windows)):
            lm.model(windows[i: i + 1])
    finally:
        for h in handles:
            h.remove()
    out = {}
    for t in lm.targets:
        cov = covs.pop(t.name).double()
        lift = 0.0
        while True:  # SVD-LLM lifts the diagonal until the covariance is positive definite
            S, info = torch.linalg.cholesky_ex(cov + lift * torch.eye(len(cov), dtype=cov.dtype))
            if int(info) == 0:
                break
            lift = max(2 * lift, 1e-6 * float(cov.diagonal().mean()))
        W = mods[t.name].weight.float()
        U, s, Vh = torch.linalg.svd(W @ S.float(), full_matrices=False)
        k = max(1, int((1 - ratio) * t.out_features * t.in_features / (t.out_features + t.in_features)))
        root = s[:k].sqrt()
        S_inv = torch.linalg.inv(S).float()
        out[t.name] = (U[:, :k] * root, (root[:, None] * Vh[:k]) @ S_inv)
    return out


def ours(lm, n_windows: int, seqlen: int) -> float:
    """Seconds of svd-llm's statistics plus factors on an empty cache (what a cold compress runs)."""
    from dipsvd_core.lowrank.factors import FactorSpec
    from dipsvd_core.run.pipeline import Workbench

    with tempfile.TemporaryDirectory() as cache:
        old = os.environ.get("DIPSVD_STUDIO_CACHE")
        os.environ["DIPSVD_STUDIO_CACHE"] = cache
        try:
            bench = Workbench(lm, "wiki", n_windows, seqlen)
            bench.windows()
            t0 = time.perf_counter()
            bench.factor_cache.prefactor([FactorSpec("svd-llm")])
            return time.perf_counter() - t0
        finally:
            os.environ.pop("DIPSVD_STUDIO_CACHE") if old is None else os.environ.update(DIPSVD_STUDIO_CACHE=old)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    from dipsvd_core.engine.data import calibration_windows

    lm = load_bundled("cpu", "float32")
    windows = calibration_windows(lm.tokenizer, "wiki", args.windows, args.seqlen)
    times = {"ours": [], "baseline": []}
    for r in range(args.rounds):
        times["ours"].append(ours(lm, args.windows, args.seqlen))
        t0 = time.perf_counter()
        baseline(lm, windows, args.ratio)
        times["baseline"].append(time.perf_counter() - t0)
        print(f"round {r + 1}: ours {times['ours'][-1]:.1f} s, baseline {times['baseline'][-1]:.1f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["ours"] / med["baseline"]
    print(f"median: ours {med['ours']:.1f} s, baseline {med['baseline']:.1f} s, ours / baseline {ratio:.2f}")
    if args.write:
        rows = "\n".join(f"| {k} | {', '.join(f'{t:.1f}' for t in v)} | {med[k]:.1f} |" for k, v in times.items())
        body = (f"{SECTION}\n\nMachine: {machine()}. Date: {utc_date()}. Command: `.venv/bin/python "
                f"bench/experiments/bench_svdllm_baseline.py --rounds {args.rounds} --windows {args.windows} --seqlen "
                f"{args.seqlen} --write`. The bundled SmolLM2-135M in float32, {args.windows} x {args.seqlen} tokens "
                "of wiki, alternating in one process (bench_svdllm_baseline.py's docstring says what each side "
                "does).\n\n| side | seconds per round | median |\n|---|---|---|\n" + rows +
                f"\n\nOurs / baseline: **{ratio:.2f}x** (target: at most 0.75x).\n")
        replace_section(RESULTS, SECTION, body, keep_from="### ")  # the hand-written analysis stays


if __name__ == "__main__":
    main()
