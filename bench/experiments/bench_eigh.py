"""Benchmark of the factors by eigh: the code form's whitening from eig((G D)(G D)^T) instead of the SVD of
G D, and each matrix's factors from eig(A A^T) or eig(A^T A), A = W S, instead of the SVD of A.

    .venv/bin/python bench/experiments/bench_eigh.py [--write] [--base COMMIT] [--runs N]

1. Time of the two routes for one Gram at the bundled model's widths (576, 1536) and a Llama width
   (4096), float64 and float32, and for one matrix of each of the bundled model's shapes (best of 3).
2. Accuracy on the bundled model's real Grams (32 x 512 wiki windows, dipsvd weight 30, bar 0.03), every
   block and input group: for each matrix and a kept rank of 10%, 30%, 50% and 90% of its maximum, the
   data error ||(W - W') D X||_F = sqrt(tr(E D G D E^T)) of the eigh routes (whitening and factors)
   against the SVD routes', in float64 (the routes taken) and in float32 (why float32 keeps the SVD).
3. The cold compress of the bundled model (statistics plus factors, dipsvd defaults, empty caches),
   COMMIT's engine and this tree alternated, N runs each.
--write replaces the "## Factors by eigh (issue 10)" section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path
from statistics import median

import torch
import sys

HERE = Path(__file__).resolve().parent  # bench/experiments/: this script's results sit beside it
sys.path.insert(0, str(HERE.parent))  # bench/: common.py and the maintained scripts

from bench_stream import compress
from common import RESULTS, ROOT, load_bundled, machine, repeat_times, replace_section, utc_date, write_json

from dipsvd_core.engine.stats import channel_importance
from dipsvd_core.lowrank.factors import Factor, _factor_by_eigh
from dipsvd_core.lowrank.scalings import EIG_FLOOR, _floor, channel_scale, left_singular_by_eigh

SECTION = "## Factors by eigh (issue 10)"
BASE = "3872557"  # the SVD route
FRACTIONS = (0.1, 0.3, 0.5, 0.9)


def by_svd(G, d, compute):
    G, d = G.to(compute), d.to(compute)
    U, sig, _ = torch.linalg.svd(G * d[None, :])
    sig, n = _floor(sig, "weighted Gram", EIG_FLOOR[compute])
    return U * sig.sqrt(), U.T / sig.sqrt()[:, None], n


def factor_by_svd(W, S, S_inv):
    """The factors as computed before: the SVD of W S."""
    U, sigma, Vt = torch.linalg.svd(W @ S, full_matrices=False)
    return Factor(U * sigma.sqrt(), sigma, sigma.sqrt()[:, None] * (Vt @ S_inv))


def factor_by_eigh(W, S, S_inv, compute):
    W, S, S_inv = W.to(compute), S.to(compute), S_inv.to(compute)
    us, sigma, vs = _factor_by_eigh(W, W @ S, S_inv)
    return Factor(us.double(), sigma.double(), vs.double())


def by_eigh(G, d, compute):
    G, d = G.to(compute), d.to(compute)
    U, sig = left_singular_by_eigh(G * d[None, :])
    sig, n = _floor(sig, "weighted Gram", EIG_FLOOR[compute])
    return U * sig.sqrt(), U.T / sig.sqrt()[:, None], n


def best(f, runs=3):
    return min(repeat_times(f, runs))


def timings() -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for n in (576, 1536, 4096):
        X = torch.randn(n, 2 * n, generator=g, dtype=torch.float64) * torch.logspace(0, -3, n, dtype=torch.float64)[:, None]
        G = X @ X.T
        d = torch.ones(n, dtype=torch.float64)
        d[: round(0.03 * n)] = 30
        for compute in (torch.float64, torch.float32):
            if n == 4096 and compute == torch.float32:
                continue
            rows.append({"what": f"whitening, width {n}", "compute": str(compute).split(".")[1],
                         "svd_s": best(lambda: by_svd(G, d, compute), 1 if n == 4096 else 3),
                         "eigh_s": best(lambda: by_eigh(G, d, compute), 1 if n == 4096 else 3)})
            print(rows[-1], flush=True)
    for out, inn in ((576, 576), (192, 576), (1536, 576), (576, 1536)):
        W = torch.randn(out, inn, generator=g, dtype=torch.float64)
        X = torch.randn(inn, 2 * inn, generator=g, dtype=torch.float64)
        S, S_inv, _ = by_eigh(X @ X.T, torch.ones(inn, dtype=torch.float64), torch.float64)
        rows.append({"what": f"factors of a {out} x {inn} matrix", "compute": "float64",
                     "svd_s": best(lambda: factor_by_svd(W, S, S_inv)),
                     "eigh_s": best(lambda: factor_by_eigh(W, S, S_inv, torch.float64))})
        print(rows[-1], flush=True)
    return rows


def accuracy() -> dict:
    from dipsvd_core.engine.data import calibration_windows
    from dipsvd_core.engine.stats import stream_stats
    from dipsvd_core.model.blocks import find_targets

    lm = load_bundled(device="cpu", dtype="float32")
    windows = calibration_windows(lm.tokenizer, "wiki", 32, 512)
    names = [t.name for t in find_targets(lm.model)]
    weights = {n: m.weight.detach().double() for n, m in lm.model.named_modules() if n in set(names)}
    ratios = {"float64": [], "float32": []}
    floored = {"svd": 0, "eigh": 0}

    def on_block(b, st):
        for g, acc in st.accs.items():
            G = acc.gram.double()
            d = channel_scale(channel_importance(G), 30.0, 0.03)
            DGD = d[:, None] * G * d[None, :]
            ref = by_svd(G, d, torch.float64)
            for compute, key in ((torch.float64, "float64"), (torch.float32, "float32")):
                new = by_eigh(G, d, compute)
                if compute == torch.float64:
                    floored["svd"] += ref[2]
                    floored["eigh"] += new[2]
                for name, group in st.group_of.items():
                    if group != g:
                        continue
                    W = weights[name]
                    fr, fn = factor_by_svd(W, *ref[:2]), factor_by_eigh(W, *new[:2], compute)
                    for frac in FRACTIONS:
                        k = max(1, round(frac * fr.max_rank))
                        e = []
                        for f in (fr, fn):
                            E = W - f.weight(k).double()
                            e.append(((E @ DGD) * E).sum().sqrt().item())
                        ratios[key].append((frac, e[1] / e[0] - 1))
        print(f"block {b}", flush=True)

    stream_stats(lm.model, names, windows, on_block=on_block)
    out = {"floored_svd": floored["svd"], "floored_eigh": floored["eigh"]}
    for key, rs in ratios.items():
        for frac in FRACTIONS:
            vals = [r for f, r in rs if f == frac]
            out[f"{key}_{frac}"] = {"n": len(vals), "max_abs": max(abs(v) for v in vals), "max": max(vals),
                                    "median": median(vals)}
    return out


def cold(base: str, runs: int) -> dict:
    args = ("--eval", "wiki", "--eval-tokens", "512", "--no-eval-original")
    out = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(tree), base], cwd=ROOT, check=True)
        try:
            for _ in range(runs):
                for engine, where in (("before", tree), ("after", ROOT)):
                    r = compress(where, *args)
                    out[engine].append({"statistics": r["timings_s"]["statistics"], "factors": r["timings_s"]["factors"],
                                        "wiki": r["ppl"]["compressed"]["wiki"]})
                    print(engine, out[engine][-1], flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT)
    return out


def markdown(res: dict) -> str:
    lines = [SECTION, "", f"Machine: {res['machine']}. Date: {res['date']}. Command: "
             f"`.venv/bin/python bench/experiments/bench_eigh.py --write --runs {res['runs']}` (\"before\" is commit "
             f"{res['base']}, the SVD route).", "",
             "The code form's U and Sig (S = U Sig^{1/2}, S S^T = (G D^2 G)^{1/2}) from the SVD of G D, or from the "
             "eigendecomposition of (G D)(G D)^T; a matrix's factors (us, sigma, vs) from the SVD of A = W S, or from "
             "the eigendecomposition of the smaller of A A^T and A^T A. Best of 3 (one run at 4096):", "",
             "| step | compute | by SVD s | by eigh s | speed-up |", "|---|---|---|---|---|"]
    for r in res["timings"]:
        lines.append(f"| {r['what']} | {r['compute']} | {r['svd_s']:.3f} | {r['eigh_s']:.3f} | "
                     f"{r['svd_s'] / r['eigh_s']:.1f}x |")
    acc = res["accuracy"]
    lines += ["", "Accuracy on the bundled model's Grams (32 x 512 wiki tokens; dipsvd weight 30, bar 0.03; all 30 "
              "blocks, 210 matrices): the data error ||(W - W') D X||_F with whitening and factors by eigh, divided by "
              "the error with both by SVD (float64), minus 1, at a kept rank of a fraction of each matrix's maximum:",
              "", "| eigh routes in | kept rank | median | largest increase | largest change |", "|---|---|---|---|---|"]
    for key in ("float64", "float32"):
        for frac in FRACTIONS:
            a = acc[f"{key}_{frac}"]
            lines.append(f"| {key} | {frac:.0%} | {a['median']:+.1e} | {a['max']:+.1e} | {a['max_abs']:.1e} |")
    lines.append(f"\nEigenvalues floored (float64, all groups): {acc['floored_svd']} by the SVD route, "
                 f"{acc['floored_eigh']} by the eigh route.")
    c = res["cold"]
    lines += ["", f"Cold compress of the bundled model (statistics plus factors, dipsvd defaults, an empty cache each, "
              f"before and after alternated, {res['runs']} runs each; median, each run in brackets):", "",
              "| engine | statistics s | factors s | statistics + factors s | wiki ppl |", "|---|---|---|---|---|"]
    for engine in ("before", "after"):
        rs = c[engine]
        tot = [r["statistics"] + r["factors"] for r in rs]
        each = ", ".join(f"{t:.1f}" for t in tot)
        lines.append(f"| {engine} | {median(r['statistics'] for r in rs):.1f} | {median(r['factors'] for r in rs):.1f} "
                     f"| {median(tot):.1f} ({each}) | {rs[0]['wiki']:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--base", default=BASE)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    res = {"machine": machine(), "date": utc_date(), "base": args.base, "runs": args.runs}
    res["timings"] = timings()
    res["accuracy"] = accuracy()
    res["cold"] = cold(args.base, args.runs)
    write_json(HERE / "eigh.json", res)
    text = markdown(res)
    print(text)
    if args.write:
        replace_section(RESULTS, SECTION, text, keep_from="What the figures say")


if __name__ == "__main__":
    main()
