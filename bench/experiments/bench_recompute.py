"""Distillation with and without recomputed activations (--distill-recompute, gradient checkpointing): the measured
host peak and seconds of one epoch, and the held-out KL after it, on the bundled model.

    .venv/bin/python bench/experiments/bench_recompute.py [--ratio 0.2] [--calib 32x512] [--epochs 1]

The default build (the mix, dipsvd + nested + refine sequential) at --ratio once, then each setting distils its own
copy of it from the original (refine/distill.distill, the product's pass) inside a measured phase
(engine/memwatch.PhaseMemory: the process's high-water mark, reset as the phase starts). Rows are appended to
bench/experiments/recompute.jsonl with the plan's prediction of the distill phase for the same run.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # bench/: common.py

from common import calib_size, load_bundled, machine, utc_date, workbench  # noqa: E402

OUT = HERE / "recompute.jsonl"


def planned_bytes(lm, run) -> int:
    from dipsvd_core import plan as P

    return P.memory(P.shapes_of(lm.model.config), run, False, 0)["distill"].host_bytes


def main() -> None:
    from dipsvd_core import plan as P
    from dipsvd_core.engine.memwatch import PhaseMemory
    from dipsvd_core.refine.choices import DistillConfig
    from dipsvd_core.refine.distill import distill
    from dipsvd_core.run.pipeline import Settings

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--calib", default="32x512")
    p.add_argument("--epochs", type=int, default=1)
    args = p.parse_args()
    lm = load_bundled("cpu", "float32")
    windows, seqlen = calib_size(args.calib)
    bench = workbench(lm, windows, seqlen, calib="mix")
    built = bench.build(Settings(method="dipsvd", ratio=args.ratio))
    for recompute in (False, True):
        cfg = DistillConfig(epochs=args.epochs, recompute=recompute)
        student = copy.deepcopy(built.model)
        memory = PhaseMemory()
        with memory.phase("distill") as rec:
            info = distill(student, lm.model, bench.windows(), bench.heldout(cfg.held), cfg)
        run = P.run_of(method="dipsvd", ratio=args.ratio, calib_windows=windows, seqlen=seqlen, distill=cfg)
        row = {"date": utc_date(), "machine": machine(), "ratio": args.ratio, "calib": args.calib,
               "epochs": args.epochs, "recompute": recompute, "host_peak_gib": round(rec["host_peak_bytes"] / 2**30, 3),
               "planned_gib": round(planned_bytes(lm, run) / 2**30, 3), "seconds": round(rec["seconds"], 1),
               "held_kl": [round(k, 5) for k in info["held_kl"]]}
        del student
        with OUT.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
