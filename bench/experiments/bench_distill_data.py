"""What distillation trains on: the calibration windows alone (the product's pass), a higher peak learning rate, or
the calibration windows with text the original writes itself (engine/self_text.py, the `self` source), at the same
number of steps. The panel's texts scored as bench_panel.py scores them.

    .venv/bin/python bench/experiments/bench_distill_data.py [--ratio 0.2] [--calib 32x512]
        [--variants lr3e-4,self96,self128] [--eval-tokens 4096] [--allocation nested]

The default path with every dense matrix compensated (bench_panel's mix-comp-all) is built once at --ratio; each
variant distils its own copy of it from the original with refine/distill.distill (the product's pass), the epoch
kept by the KL on the same 4 held-out calibration windows. Variants (VARIANTS): the fit windows, the epochs and the
peak learning rate. The model's own text is sampled from the original at temperature 1 (top-p 0.95) from prompts of
the calibration halves, so no panel text and no evaluation half is in it. A variant whose fifth field is true also
trains the decoder blocks' dense matrices (those the allocation kept whole: the product's scope `blocks`), beside the
factors and norms. Rows are appended to bench/experiments/distill_data.jsonl.
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
# dense matrices are trained too[, the prompts of the model's text: PROMPTS])
VARIANTS = {
    "calib": (True, 0, 4, 1e-4, False),  # the product's pass at its defaults
    "lr3e-4": (True, 0, 4, 3e-4, False),
    "self96": (True, 96, 1, 1e-4, False),  # 128 windows once: the steps of 4 epochs over 32
    "self128": (False, 128, 1, 1e-4, False),
    "self96x2": (True, 96, 2, 1e-4, False),  # twice the steps
    "self224": (True, 224, 1, 1e-4, False),  # twice the steps, each window seen once
    "self448": (True, 448, 1, 1e-4, False),  # 3.75x the steps, each window seen once
    "dense96": (True, 96, 1, 1e-4, True),  # self96, the dense matrices trained too
    "dense448": (True, 448, 1, 1e-4, True),  # self448, the dense matrices trained too
    "wikiopen96": (True, 96, 1, 1e-4, False, "wiki-openings"),  # self96 from other prompts
}


def wiki_openings(prompts):
    """A stand-in for self_text.prompts: every other chat question about a wiki article's subject replaced by the
    article's opening words (a quarter of the prompts), so the model also writes on as an encyclopedia article."""
    from dipsvd_core.engine import self_text
    from dipsvd_core.engine.data import load_documents

    def chosen(tokenizer, group: int) -> list[list[int]]:
        out, wiki = prompts(tokenizer, group), load_documents("wiki", "calib")
        for j in range(2, len(out), 4):  # the product's prompt i is a chat question where i is even
            out[j] = self_text.opening(tokenizer, wiki[((group * self_text.BATCH + j) // 2) % len(wiki)])
        return out

    return chosen


# the prompts of the model's own text, beside the product's: name -> a wrapper of self_text.prompts
PROMPTS = {"wiki-openings": wiki_openings}
# the group the rows before the product's grew to 32 were written in: the group size is part of the stream's cache
# key and of what is sampled, so the rows of the product's prompts read the same cached windows
EARLIER_BATCH = 8


def own_text(lm, windows: int, seqlen: int, prompts: str | None):
    """`windows` of the `self` source's text, in groups of EARLIER_BATCH; from other prompts (PROMPTS), a stream of
    their own in the product's groups, its cache key and its groups' seeds taking the prompts' name."""
    from unittest import mock

    from dipsvd_core.engine import self_text

    if prompts is None:
        patched = {"BATCH": EARLIER_BATCH}
    else:
        key = self_text._key
        patched = {"prompts": PROMPTS[prompts](self_text.prompts),
                   "_key": lambda *parts, purpose: key(*parts, prompts, purpose=purpose)}
    with mock.patch.multiple(self_text, **patched):
        return workbench(lm, windows, seqlen, calib="self").windows()


def main() -> None:
    from dipsvd_core.refine.choices import DistillConfig
    from dipsvd_core.refine.distill import distill
    from dipsvd_core.run.pipeline import Settings

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--calib", default="32x512")
    p.add_argument("--variants", default="lr3e-4,self96,self128")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--allocation", default="nested", help="the build's allocation (the product's default: nested)")
    args = p.parse_args()
    lm = load_bundled("cpu", "float32")
    windows, seqlen = calib_size(args.calib)
    bench = workbench(lm, windows, seqlen, calib="mix")
    sets = {t: bench.eval_windows(t, args.eval_tokens) for t in TEXTS}
    built = bench.build(Settings(method="dipsvd", ratio=args.ratio, allocation=args.allocation, refine="sequential",
                                 compensate="all"))
    for name in args.variants.split(","):
        with_calib, n_self, epochs, lr, dense, *prompts = VARIANTS[name]
        t0 = time.perf_counter()
        own = own_text(lm, n_self, seqlen, (prompts or [None])[0]) if n_self else bench.windows()[:0]
        fit = torch.cat([bench.windows(), own]) if with_calib else own
        writing = time.perf_counter() - t0
        cfg = DistillConfig(epochs=epochs, lr=lr, scope="blocks" if dense else "factors")
        student = copy.deepcopy(built.model)
        info = distill(student, lm.model, fit, bench.heldout(cfg.held), cfg)
        row = {"date": utc_date(), "machine": machine(), "variant": name, "ratio": args.ratio, "calib": args.calib,
               "allocation": args.allocation,
               "fit_calib": windows if with_calib else 0, "fit_self": n_self, "epochs": epochs, "lr": lr,
               "dense": dense, "prompts": (prompts or ["product"])[0],
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
