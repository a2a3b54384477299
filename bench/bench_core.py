"""Core benchmark (issue 2): perplexity of svd / svd-llm / dipsvd (both whitening forms) at several
ratios on the bundled SmolLM2-135M, with wall time and peak memory of every step.

Run: .venv/bin/python bench/bench_core.py [--ratios 0.05,0.1,0.2,0.3] [--eval-tokens 16384]
With --cold, statistics and factors are computed cold: the run uses a fresh cache folder (the
dequantized model is linked in, so its one-time conversion is not counted); without it, the user
cache is used and the step times show cache hits. Results go to bench/results_core.json (or
--out); the "Core engine" section of bench/RESULTS.md is written from that file by hand.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from common import BENCH, PLAIN, eval_sets, load_bundled, workbench, write_json


def rss_mb() -> float:
    from dipsvd_core.engine.memwatch import lifetime_host_peak

    return lifetime_host_peak() / 2**20  # the Workbench's phases reset the kernel's high-water mark


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratios", default="0.05,0.1,0.2,0.3")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--cold", action="store_true", help="fresh cache for statistics and factors")
    ap.add_argument("--out", default=str(BENCH / "results_core.json"))
    args = ap.parse_args()

    if args.cold:  # a cold cache for statistics and factors, sharing only the dequantized model
        from dipsvd_core.common.cache import cache_dir

        user_models = cache_dir() / "models"
        cold = Path(tempfile.mkdtemp(prefix="dipsvd-bench-"))
        if user_models.exists():
            (cold / "models").symlink_to(user_models)
        os.environ["DIPSVD_STUDIO_CACHE"] = str(cold)

    from dipsvd_core.engine.evaluate import perplexity, speed
    from dipsvd_core.lowrank.scalings import ChannelOptions
    from dipsvd_core.run.pipeline import Settings

    steps, ppl = {}, {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        steps[name] = {"seconds": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(rss_mb())}
        print(f"{name}: {steps[name]}", flush=True)
        return out

    load_avg = os.getloadavg()
    lm = timed("load_model", lambda: load_bundled(device="cpu"))
    wb = workbench(lm, args.windows, args.seqlen)
    timed("calibration_text", wb.windows)
    timed("statistics", wb.stats)
    sets = eval_sets(wb, args.eval_tokens)
    ppl["original"] = timed("eval_original", lambda: {s: perplexity(lm.model, w) for s, w in sets.items()})
    variants = {"svd": Settings(method="svd", **PLAIN), "svd-llm": Settings(method="svd-llm", **PLAIN),
                "dipsvd-paper": Settings(method="dipsvd", dipsvd=ChannelOptions(whitening="paper"), **PLAIN),
                "dipsvd-code": Settings(method="dipsvd", dipsvd=ChannelOptions(whitening="code"), **PLAIN)}
    ratios = [float(r) for r in args.ratios.split(",")]
    slices = {}
    for label, s in variants.items():
        timed(f"factors[{label}]", lambda: wb.factors(s.spec))
        for r in ratios:
            s.ratio = r
            t0 = time.perf_counter()
            res = wb.build(s)
            slices[f"{label}@{r}"] = round(time.perf_counter() - t0, 3)
            ppl[f"{label}@{r}"] = {n: perplexity(res.model, w) for n, w in sets.items()}
            ppl[f"{label}@{r}"]["ratio_realized"] = res.allocation.ratio_realized
            print(label, r, ppl[f"{label}@{r}"], f"build {slices[f'{label}@{r}']}s", flush=True)
    res = wb.build(Settings(method="dipsvd", ratio=0.2, **PLAIN))
    spd = {"original": speed(lm.model), "dipsvd@0.2": speed(res.model)}
    compress_total = sum(steps[k]["seconds"] for k in ("load_model", "calibration_text", "statistics",
                                                      "factors[dipsvd-code]")) + slices["dipsvd-code@0.2"]
    result = {"date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()} CPU cores, "
              f"{platform.processor() or platform.machine()}, no GPU", "load_avg_at_start": load_avg,
              "command": "python bench/bench_core.py " + " ".join(sys.argv[1:]), "cold": args.cold, "windows": args.windows,
              "seqlen": args.seqlen, "eval_tokens": args.eval_tokens, "steps": steps, "ppl": ppl,
              "build_seconds": slices, "speed": spd, "dipsvd_compress_seconds_excl_eval": round(compress_total, 1)}
    write_json(args.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
