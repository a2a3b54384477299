"""Issue 35, a tried idea: refine's block error without the first token's massive activations.

    .venv/bin/python bench/experiments/bench_block_error.py [--ratios 0.2] --variant massive|check|fit

(one variant a call: each build patches refine for its process). Rows are appended to
bench/experiments/block_error.jsonl.

From block 11 on, the bundled SmolLM2-135M's residual stream holds massive activations on the first token of every
window (|h| up to 29,000 in a few channels; 96-99% of the hidden states' squared norm), so every squared error refine
sums over a block's output is mostly that one token's. Variants:
- massive: no build; per block, the first token's share of the original hidden states' squared norm and the largest
  |h| (two calibration windows of the mix);
- check: the default path at --ratios (mix calibration, nested, refine sequential, compensate outputs) with the block
  check (refine/contest.py) scoring each token's error relative to the original output's mean square there;
- fit: the same path with the residual-writing Linear's least squares (down_proj's, whose target takes back the
  residual stream's drift) weighting each token by 1 / the original block output's mean square there, in its sums
  and held-out error alike (closed_form.GroupStats.add_residual), the block check as it is.
Each build row as bench_panel.py writes it (config "mix-comp-check-relative" or "mix-comp-fit-relative"), on the
same panel and evaluation windows, against bench/panel.jsonl's mix-comp rows. The patches live here, not in the
product: neither changed the panel by more than 1.5%, so neither was kept.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # bench/: common.py and bench_panel.py

import torch  # noqa: E402

import bench_panel  # noqa: E402
from common import load_bundled, workbench  # noqa: E402


def massive(lm) -> dict:
    """Per block input (hidden_states[l]), the first token's share of the squared norm and the largest |h|."""
    windows = workbench(lm, 4, 512, calib="mix").windows()[:2]
    with torch.no_grad():
        hidden = lm.model(windows, output_hidden_states=True).hidden_states
    rows = []
    for layer, h in enumerate(hidden):
        sq = h.double().pow(2)
        rows.append({"layer": layer, "first_token_share": round(float(sq[:, 0].sum() / sq.sum()), 3),
                     "max_abs": round(float(h.abs().max()), 1)})
    return {"variant": "massive", "layers": rows}


def relative_check() -> None:
    """The block check's error (contest._held_error) by each token's relative error, whatever refine asks for
    (contest.token_errors' "relative")."""
    from dipsvd_core.refine import contest

    held_error = contest._held_error
    contest._held_error = lambda reference, outputs, held, park, error="absolute": held_error(
        reference, outputs, held, park, "relative")


def relative_fit() -> None:
    """The residual-writing Linear's sums with each token weighted by 1 / the original block output's mean square
    there: its input and target rows scaled by the square root of the weight."""
    from dipsvd_core.engine.stats import matmul_precision
    from dipsvd_core.refine.closed_form import GroupStats, gram_precision

    def add_residual(self, i, x_raw, r_h, block_out):
        part, xh = self._part(i), x_raw.float()
        b = block_out.reshape(-1, r_h.shape[-1])
        d = b - r_h
        with matmul_precision(gram_precision(x_raw, d)):
            root = b.float().pow(2).mean(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny).rsqrt()
            d, xh = d.float() * root, xh * root
            part.add("numerator", (d.T @ xh).double())
            part.add_gram(xh)
        if part.held:
            part.target_sq += float(d.double().pow(2).sum())
    GroupStats.add_residual = add_residual


PATCHES = {"check": relative_check, "fit": relative_fit}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratios", default="0.2")
    p.add_argument("--variant", required=True, choices=["massive", *PATCHES])
    args = p.parse_args()
    lm, out = load_bundled("cpu", "float32"), HERE / "block_error.jsonl"
    if args.variant == "massive":
        with out.open("a") as f:
            f.write(json.dumps(massive(lm)) + "\n")
        return
    PATCHES[args.variant]()
    name = f"mix-comp-{args.variant}-relative"
    bench_panel.CONFIGS[name] = bench_panel.CONFIGS["mix-comp"]
    opts = argparse.Namespace(calib="32x512", eval_tokens=4096, tune_epochs=4, tune_lr=None, tune_error=None)
    done = {bench_panel._key(r) for r in bench_panel._rows(out) if "config" in r}  # not the massive rows
    bench_panel.run_config(lm, name, [float(r) for r in args.ratios.split(",")], opts, done, out)


if __name__ == "__main__":
    main()
