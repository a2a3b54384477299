"""What distillation trains on: the calibration windows alone (the product's pass), a higher peak learning rate, or
the calibration windows with text the original writes itself (engine/self_text.py, the `self` source), at the same
number of steps. The panel's texts scored as bench_panel.py scores them.

    .venv/bin/python bench/experiments/bench_distill_data.py [--ratio 0.2] [--calib 32x512]
        [--variants lr3e-4,self96,self128] [--eval-tokens 4096]

The default path with every dense matrix compensated (bench_panel's mix-comp-all) is built once at --ratio; each
variant distils its own copy of it from the original with refine/distill.distill (the product's pass), the epoch
kept by the KL on the same 4 held-out calibration windows. Variants (VARIANTS): the fit windows, the epochs and the
peak learning rate. The model's own text is sampled from the original at temperature 1 (top-p 0.95) from prompts of
the calibration halves, so no panel text and no evaluation half is in it. A variant whose last field is true also trains the
decoder blocks' dense matrices (those the allocation kept whole), beside the product's factors and norms. Rows are
appended to bench/experiments/distill_data.jsonl.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # bench/: common.py

from bench_panel import TEXTS, _generations, _ppl  # noqa: E402
from common import calib_size, load_bundled, machine, utc_date, workbench  # noqa: E402

OUT = HERE / "distill_data.jsonl"
# name -> (calibration windows in the fit, windows of the model's own text in the fit, epochs, peak lr, whether the
# dense matrices are trained too)
VARIANTS = {
    "calib": (True, 0, 4, 1e-4, False),  # the product's pass at its defaults
    "lr3e-4": (True, 0, 4, 3e-4, False),
    "self96": (True, 96, 1, 1e-4, False),  # 128 windows once: the steps of 4 epochs over 32
    "self128": (False, 128, 1, 1e-4, False),
    "self96x2": (True, 96, 2, 1e-4, False),  # twice the steps
    "self224": (True, 224, 1, 1e-4, False),  # twice the steps, each window seen once
    "self448": (True, 448, 1, 1e-4, False),  # 3.75x the steps, each window seen once
    "dense96": (True, 96, 1, 1e-4, True),  # self96, the dense matrices trained too
}


def with_dense(trainable):
    """A stand-in for refine/distill.trainable: its parameters and every dense matrix's weight in the decoder blocks
    (a copy of its own where it is the original's), made trainable."""
    from torch import nn

    from dipsvd_core.lowrank.surgery import LowRankLinear
    from dipsvd_core.model.blocks import find_blocks

    def chosen_with_dense(model, original, scope: str = "factors") -> list:
        chosen = trainable(model, original, scope)
        theirs, mine = {p.data_ptr() for p in original.parameters()}, {id(p) for p in chosen}
        for block in find_blocks(model)[1]:
            low = {id(m) for lr in block.modules() if isinstance(lr, LowRankLinear) for m in (lr.u, lr.v)}
            for m in block.modules():
                if isinstance(m, nn.Linear) and id(m) not in low and id(m.weight) not in mine:
                    if m.weight.data_ptr() in theirs:
                        m.weight = nn.Parameter(m.weight.detach().clone())
                    m.weight.requires_grad_(True)
                    chosen.append(m.weight)
        return chosen

    return chosen_with_dense


def main() -> None:
    from dipsvd_core.refine import distill as distill_module
    from dipsvd_core.refine.choices import DistillConfig
    from dipsvd_core.refine.distill import distill
    from dipsvd_core.run.pipeline import Settings

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--calib", default="32x512")
    p.add_argument("--variants", default="lr3e-4,self96,self128")
    p.add_argument("--eval-tokens", type=int, default=4096)
    args = p.parse_args()
    lm = load_bundled("cpu", "float32")
    windows, seqlen = calib_size(args.calib)
    bench = workbench(lm, windows, seqlen, calib="mix")
    sets = {t: bench.eval_windows(t, args.eval_tokens) for t in TEXTS}
    built = bench.build(Settings(method="dipsvd", ratio=args.ratio, refine="sequential", compensate="all"))
    for name in args.variants.split(","):
        with_calib, n_self, epochs, lr, dense = VARIANTS[name]
        t0 = time.perf_counter()
        own = workbench(lm, n_self, seqlen, calib="self").windows() if n_self else bench.windows()[:0]
        fit = torch.cat([bench.windows(), own]) if with_calib else own
        writing = time.perf_counter() - t0
        cfg = DistillConfig(epochs=epochs, lr=lr)
        student = copy.deepcopy(built.model)
        product = distill_module.trainable
        distill_module.trainable = with_dense(product) if dense else product
        try:
            info = distill(student, lm.model, fit, bench.heldout(cfg.held), cfg)
        finally:
            distill_module.trainable = product
        row = {"date": utc_date(), "machine": machine(), "variant": name, "ratio": args.ratio, "calib": args.calib,
               "fit_calib": windows if with_calib else 0, "fit_self": n_self, "epochs": epochs, "lr": lr,
               "dense": dense,
               "held_kl": [round(k, 5) for k in info["held_kl"]], "kept_epoch": info["kept_epoch"],
               "self_text_s": round(writing, 1), "distill_s": round(info["seconds"], 1),
               "ppl": _ppl(student, sets), "original_ppl": _ppl(lm.model, sets) if name == args.variants.split(",")[0]
               else None, "generations": _generations(student, lm.tokenizer)}
        del student
        with OUT.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "generations"}), flush=True)


if __name__ == "__main__":
    main()
