"""Issue 11, item 2, a tried idea: calibrate the coupled weights by matrix type as well as by block.

    .venv/bin/python bench/experiments/bench_typeprobe.py > bench/experiments/typeprobe.jsonl

The coupled allocation's weights are calibrated per block by a probe (each block alone truncated to keep 0.25,
allocators.py). Here every matrix TYPE is probed the same way (all q_proj of the model at keep 0.25, then all
k_proj, ...), on the same 4 held-out wiki windows and, for comparison, on 2048 tokens of news; then the weights
are fitted to both sets of probes at once by iterative proportional fitting (w_m = raw_m a_block c_type), and
the allocation from those weights is set beside today's coupled allocation: perplexity on the first 4096
tokens of wiki and news, and the mean keep fraction per type. Bundled SmolLM2-135M, dipsvd, 32 x 512 windows.
"""
import math
import time

import numpy as np
import torch
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent  # bench/experiments/: this script's results sit beside it
sys.path.insert(0, str(HERE.parent))  # bench/: common.py and the maintained scripts

from common import eval_sets, load_bundled, print_row, workbench

from dipsvd_core.allocation import allocators
from dipsvd_core.allocation import budget as alloc
from dipsvd_core.allocation.bayes import Objective
from dipsvd_core.allocation.budget import DENSE
from dipsvd_core.allocation.importance import truncated
from dipsvd_core.engine.evaluate import perplexity
from dipsvd_core.run.pipeline import Settings

KEEP = allocators.PROBE_KEEP


@torch.no_grad()
def probe(lm, T, F, names, held):
    """Log perplexity on `held` with the matrices `names` truncated to keep KEEP."""
    with truncated(lm.model, T, F, names, KEEP):
        return math.log(perplexity(lm.model, held))


def main() -> None:
    lm = load_bundled(); wb = workbench(lm)
    T = wb.targets
    base = Settings(method="dipsvd", allocation="coupled")
    F = wb.factors(base.spec)
    held = wb.heldout(4)

    t0 = time.perf_counter()
    base_loss = math.log(perplexity(lm.model, held))
    types = sorted({t.name.rsplit(".", 1)[-1] for t in T})
    d_type = {ty: probe(lm, T, F, {t.name for t in T if t.name.endswith(ty)}, held) - base_loss for ty in types}
    print_row({"type_probes_wiki": d_type, "seconds": time.perf_counter() - t0})
    news = wb.eval_windows("news", 2048, 512)
    news_base = math.log(perplexity(lm.model, news))
    print_row({"type_probes_news": {ty: probe(lm, T, F, {t.name for t in T if t.name.endswith(ty)}, news) - news_base
                                    for ty in types}})
    d_block = wb.probes.block_sensitivity(base)
    raw = allocators.coupled_weights(F, wb.fisher(), T)
    keep = np.full(len(d_block), KEEP)
    ranks = alloc.ranks_for(keep, T)
    L2 = {t.name: (0.0 if ranks[t.name] is DENSE else float((F[t.name].sigma[ranks[t.name]:].double() ** 2).sum())) for t in T}
    typ = {t.name: t.name.rsplit(".", 1)[-1] for t in T}
    a = np.ones(len(d_block)); c = {ty: 1.0 for ty in types}
    floor_b = allocators.PROBE_FLOOR * np.median(d_block[d_block > 0])
    db = np.maximum(d_block, floor_b)
    for it in range(50):
        pb = np.zeros(len(db))
        for t in T: pb[t.block] += raw[t.name] * c[typ[t.name]] * L2[t.name]
        a = db / np.maximum(pb, 1e-300)
        pt = {ty: 0.0 for ty in types}
        for t in T: pt[typ[t.name]] += raw[t.name] * a[t.block] * L2[t.name]
        c = {ty: max(d_type[ty], 1e-6) / max(pt[ty], 1e-300) for ty in types}
    print_row({"type_factors": c})
    w_ipf = {t.name: raw[t.name] * a[t.block] * c[typ[t.name]] for t in T}
    w_cal = wb.probes.coupled_weights(base)
    ev = eval_sets(wb, 4096)
    obj = Objective(lm.model, T, F, held)
    for r in [0.1, 0.2, 0.3, 0.4]:
        for name, w in [("coupled", w_cal), ("ipf", w_ipf)]:
            al = allocators.coupled(F, w, T, r)
            h, e = obj.measure(al.ranks, lambda m: {s: round(perplexity(m, x), 2) for s, x in ev.items()})
            kinds = {}
            for t in T: kinds.setdefault(typ[t.name], []).append(alloc.matrix_params(al.ranks[t.name], t.out_features, t.in_features) / t.params)
            print_row(dict(ratio=r, w=name, held=round(h, 2), **e, keep={k: round(float(np.mean(v)), 2) for k, v in kinds.items()}))


if __name__ == "__main__":
    main()
