"""Issue 35, a tried idea: the compressed model distilled end to end from the original after the build.

    .venv/bin/python bench/experiments/bench_distill.py [--ratio 0.2] [--epochs 4] [--lr 2e-5]
        [--scope factors|norms|block] [--calib 32x512]

The default build (dipsvd + nested + refine sequential, compensation auto, the mix) at --ratio, then a copy of it
trained on the calibration windows to match the original's next-token distribution: KL(original || compressed)
on every token, AdamW (weight decay 0.01), 10% warm-up, cosine decay, gradient clipping at 1.0, one window a step.
`--scope factors`: the low-rank factors and the norms; `norms`: the norms alone; `block`: every parameter of the
blocks (dense matrices too).
The embeddings (tied to the lm_head) stay. After every epoch the KL on held-out calibration windows (disjoint from
the fit) is measured and the best epoch's weights are kept (epoch 0, the build itself, included).
Each row as bench_panel.py writes it (config "mix-comp-distill"), on the same panel and evaluation windows, against
bench/panel.jsonl's mix-comp rows; appended to bench/experiments/distill.jsonl.

The script came first, to see whether the gain was worth a pass; the product's pass is refine/distill.py
(`--distill-epochs`, bench_panel.py's mix-comp-distill). It trains `factors` and norms as the product does; `norms`
and `block` are the scopes it tried besides.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # bench/: common.py and bench_panel.py

import torch  # noqa: E402

import bench_panel  # noqa: E402
from common import calib_size, load_bundled, workbench  # noqa: E402
from dipsvd_core.refine.distill import kl_divergence as kl  # noqa: E402  (the product's, the same KL)

OUT = HERE / "distill.jsonl"


def trainable(model: torch.nn.Module, scope: str) -> list[torch.nn.Parameter]:
    """The parameters distillation trains: the blocks' low-rank factors and every norm (factors), every norm alone
    (norms), or every parameter of the blocks and the final norm (block); never the embeddings or the lm_head
    (tied), nor a bias."""
    chosen = []
    for name, p in model.named_parameters():
        in_blocks = ".layers." in name or name.endswith("norm.weight")
        own = {"factors": name.endswith(("u.weight", "v.weight", "norm.weight")), "norms": name.endswith("norm.weight"),
               "block": True}[scope]
        p.requires_grad_(in_blocks and own and not name.endswith("bias"))
        if p.requires_grad:
            chosen.append(p)
    return chosen


def held_kl(student, teacher_logits: list[torch.Tensor], held: torch.Tensor) -> float:
    with torch.no_grad():
        return sum(float(kl(student(w[None]).logits[0], t)) for w, t in zip(held, teacher_logits)) / len(held)


def distill(student, teacher, fit: torch.Tensor, held: torch.Tensor, args) -> dict:
    params = trainable(student, args.scope)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    steps = args.epochs * len(fit)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: (i + 1) / warm if i < warm else 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, steps - warm))))
    with torch.no_grad():
        held_t = [teacher(w[None]).logits[0] for w in held]
    curve = [held_kl(student, held_t, held)]
    best = (curve[0], {id(p): p.detach().clone() for p in params})
    g = torch.Generator().manual_seed(0)
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        for i in torch.randperm(len(fit), generator=g).tolist():
            with torch.no_grad():
                target = teacher(fit[i][None]).logits[0]
            loss = kl(student(fit[i][None]).logits[0], target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
        curve.append(held_kl(student, held_t, held))
        print(json.dumps({"epoch": epoch + 1, "held_kl": round(curve[-1], 5), "s": round(time.perf_counter() - t0)}),
              flush=True)
        if curve[-1] < best[0]:
            best = (curve[-1], {id(p): p.detach().clone() for p in params})
    with torch.no_grad():
        for p in params:
            p.copy_(best[1][id(p)])
            p.requires_grad_(False)
    return {"held_kl": [round(c, 5) for c in curve], "kept_epoch": curve.index(best[0]), "trained": len(params),
            "trained_numel": sum(p.numel() for p in params)}


def main() -> None:
    from dipsvd_core.run.pipeline import Settings

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--scope", choices=("factors", "norms", "block"), default="factors")
    p.add_argument("--calib", default="32x512")
    p.add_argument("--held", type=int, default=4, help="held-out calibration windows for the epoch choice")
    p.add_argument("--eval-tokens", type=int, default=4096)
    args = p.parse_args()
    torch.manual_seed(0)
    lm = load_bundled("cpu", "float32")
    windows, seqlen = calib_size(args.calib)
    bench = workbench(lm, windows, seqlen, calib="mix")
    sets = {t: bench.eval_windows(t, args.eval_tokens) for t in bench_panel.TEXTS}
    built = bench.build(Settings(method="dipsvd", ratio=args.ratio))
    student = copy.deepcopy(built.model)
    del built
    t0 = time.perf_counter()
    info = distill(student, lm.model, bench.windows(), bench.heldout(args.held), args)
    seconds = time.perf_counter() - t0
    row = {"config": "mix-comp-distill", "ratio": args.ratio, "calib": args.calib, "epochs": args.epochs,
           "lr": args.lr, "scope": args.scope, **info, "distill_s": round(seconds, 1),
           "ppl": bench_panel._ppl(student, sets), "generations": bench_panel._generations(student, lm.tokenizer)}
    with OUT.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "generations"}), flush=True)


if __name__ == "__main__":
    main()
