"""Issue 11, item 2, a tried idea: keep the heuristic's budget per block (it generalizes best at 0.3 and 0.4) and
spread each block's budget over its matrices by the coupled objective, with today's weights.

    .venv/bin/python bench/experiments/bench_nested.py [--ratios 0.1,0.2,0.3,0.4] [--variants heuristic,nested,nested-typed] \
        >> bench/experiments/nested.jsonl

Variants (the same realized ratio; blocks the heuristic keeps dense stay dense):
- heuristic: DipSVD's per-block keep fractions, every matrix of a block at the same fraction;
- nested: inside each block, the ranks minimising sum_m w_m L_m(k_m)^2 under the block's budget, w_m the coupled
  allocator's Fisher-pass weight (allocators.coupled_weights; the block probe's calibration is one factor per block,
  so it cancels inside a block);
- nested-typed: the same with w_m times a factor per matrix type, measured: each type's 30 matrices truncated at keep
  0.25 together on the held-out wiki windows (the first line of bench/experiments/typeprobe.jsonl) against what the weights
  predict for that cut;
- trust-typed-PHI (e.g. trust-typed-0.75): nested-typed inside a trust region around the heuristic's even split,
  every matrix of a cut block kept between PHI f_b and min(1, f_b / PHI) of its parameters (f_b the block's keep
  fraction): the additive error model trusted only near the point the heuristic chose;
- svdllm-v2: SVD-LLM V2's heterogeneous per-matrix ratios (`svdllm_v2`), on the same dipsvd factors;
- coupled: the coupled allocation as it is (`Workbench.allocate`), for scans beside the heuristic.
Bundled SmolLM2-135M, dipsvd, 32 x 512 calibration windows of wiki; the first 4096 tokens of wiki and news (as in
bench_mix.py); factors and Fisher from the user cache when present. One JSON line per point. With --refine, each
allocation is built refined (`Workbench.refine`, --refine sequential) before it is evaluated (no held-out loss then).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent  # bench/experiments/: this script's results sit beside it
sys.path.insert(0, str(HERE.parent))  # bench/: common.py and the maintained scripts

from common import eval_sets, load_bundled, print_row, workbench

from dipsvd_core.allocation import allocators
from dipsvd_core.allocation import budget as alloc
from dipsvd_core.allocation.bayes import Objective
from dipsvd_core.allocation.budget import DENSE
from dipsvd_core.engine.evaluate import perplexity
from dipsvd_core.lowrank.surgery import compress_model
from dipsvd_core.run.pipeline import Settings


def kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def type_factors(factors, raw: dict, targets) -> dict[str, float]:
    """c_type (allocators.calibrate_types) from the type probe measured on wiki (bench/experiments/typeprobe.jsonl)."""
    measured = json.loads((HERE / "typeprobe.jsonl").read_text().splitlines()[0])["type_probes_wiki"]
    return allocators.calibrate_types(measured, factors, raw, targets)


def nested(outer: dict, sigmas: dict, weights: dict, targets, p_min: float = 0.05, phi: float | None = None) -> dict:
    """Per block: the outer allocation's kept parameters, spread over the block's matrices by the coupled solver
    (with `phi`, each matrix between phi f_b and min(1, f_b / phi), f_b the block's keep fraction)."""
    ranks = {}
    for b in range(1 + max(t.block for t in targets)):
        block = [t for t in targets if t.block == b]
        if all(outer[t.name] is DENSE for t in block):
            ranks.update({t.name: DENSE for t in block})
            continue
        budget = sum(alloc.matrix_params(outer[t.name], t.out_features, t.in_features) for t in block)
        f = budget / sum(t.params for t in block)
        lo, hi = (p_min, 1.0) if phi is None else (phi * f, min(1.0, f / phi))
        ranks.update(allocators.coupled_ranks(sigmas, weights, block, budget, lo, hi))
    return ranks


def svdllm_v2(sigmas: dict, targets, ratio: float, p_min: float = 0.05) -> dict:
    """SVD-LLM V2's heterogeneous ratios: inside each group of one matrix type, the truncation loss L_i of every
    matrix at the uniform ratio, and R_i = n R (1 / log L_i) / sum_j (1 / log L_j) (a larger loss compresses less);
    every group keeps the uniform ratio on average."""
    ranks = {}
    for ty in sorted({kind(t.name) for t in targets}):
        group = [t for t in targets if kind(t.name) == ty]
        inv = []
        for t in group:
            k = alloc.rank_for(1 - ratio, t.out_features, t.in_features)
            inv.append(1 / np.log(np.sqrt((sigmas[t.name][k:] ** 2).sum())))
        inv = np.asarray(inv)
        for t, r in zip(group, len(group) * ratio * inv / inv.sum()):
            ranks[t.name] = alloc.rank_for(float(np.clip(1 - r, p_min, 1.0)), t.out_features, t.in_features)
    return ranks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="0.1,0.2,0.3,0.4")
    ap.add_argument("--variants", default="heuristic,nested,nested-typed")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--refine", action="store_true", help="evaluate each allocation refined (--refine sequential)")
    args = ap.parse_args()
    lm = load_bundled()
    wb = workbench(lm)
    base = Settings(method="dipsvd", allocation="heuristic")
    targets, factors = wb.targets, wb.factors(base.spec)
    evals = eval_sets(wb, args.eval_tokens)
    objective = Objective(lm.model, targets, factors, wb.heldout(base.bo_windows))
    raw = allocators.coupled_weights(factors, wb.fisher(), targets)
    c = type_factors(factors, raw, targets)
    typed = {t.name: raw[t.name] * c[kind(t.name)] for t in targets}
    sigmas = {t.name: factors[t.name].sigma.double().numpy() for t in targets}
    for ratio in [float(r) for r in args.ratios.split(",")]:
        outer = wb.allocate(replace(base, ratio=ratio)).ranks
        for variant in args.variants.split(","):
            if variant.startswith("trust-typed-"):
                ranks = nested(outer, sigmas, typed, targets, phi=float(variant.rsplit("-", 1)[1]))
            else:
                ranks = {"heuristic": lambda: outer, "nested": lambda: nested(outer, sigmas, raw, targets),
                         "nested-typed": lambda: nested(outer, sigmas, typed, targets),
                         "svdllm-v2": lambda: svdllm_v2(sigmas, targets, ratio),
                         "coupled": lambda: wb.allocate(replace(base, ratio=ratio, allocation="coupled")).ranks,
                         }[variant]()
            if args.refine:  # the build's own refine on these ranks, then the refined model
                a = alloc.from_ranks(ranks, targets, ratio, variant)
                weights, _ = wb.refine(replace(base, ratio=ratio, refine="sequential"), a)
                model = compress_model(lm.model, weights)
                held, ppl = None, {s: perplexity(model, x) for s, x in evals.items()}
                del model, weights
            else:
                held, ppl = objective.measure(ranks, lambda m: {s: perplexity(m, x) for s, x in evals.items()})
            keep: dict[str, list[float]] = {}
            for t in targets:
                if outer[t.name] is not DENSE or ranks[t.name] is not DENSE:  # the blocks the heuristic cuts
                    keep.setdefault(kind(t.name), []).append(
                        alloc.matrix_params(ranks[t.name], t.out_features, t.in_features) / t.params)
            print_row(dict(ratio=ratio, variant=variant, refined=args.refine, realized=alloc.realized_ratio(ranks, targets),
                           heldout=held, **ppl, keep={k: round(sum(v) / len(v), 2) for k, v in keep.items()}))


if __name__ == "__main__":
    main()
