"""refined-kl: the allocation chosen after refinement, by the KL of the refined model's next-token distribution."""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from dipsvd_core.allocation.refined_search import CANDIDATES, kl_divergence, log_probs
from dipsvd_core.allocation.strategies import strategy
from dipsvd_core.lowrank.surgery import compress_model
from dipsvd_core.run.pipeline import Settings, Workbench


def test_kl_divergence_is_the_definition(tiny_lm):
    windows = Workbench(tiny_lm, "wiki", 4, 32).heldout(2)
    reference = log_probs(tiny_lm.model, windows)
    assert abs(kl_divergence(reference, tiny_lm.model, windows)) < 1e-3  # bfloat16 reference against itself
    model = compress_model(tiny_lm.model, {})
    with torch.no_grad():  # a perturbed head: KL from the definition, token by token
        head = model.lm_head
        head.weight = torch.nn.Parameter(head.weight + 0.05 * torch.randn_like(head.weight))
        p = [F.log_softmax(tiny_lm.model(w[None]).logits[0].float(), -1) for w in windows]
        q = [F.log_softmax(model(w[None]).logits[0].float(), -1) for w in windows]
    expected = float(sum((a.exp() * (a - b)).sum() for a, b in zip(p, q))) / sum(a.shape[0] for a in p)
    assert kl_divergence(reference, model, windows) == pytest.approx(expected, rel=0.02)
    assert expected > 0


def test_refined_kl_keeps_the_candidate_whose_refined_model_is_closest(tiny_lm):
    bench = Workbench(tiny_lm, "wiki", 8, 32)
    s = Settings(method="svd-llm", allocation="refined-kl", ratio=0.4, refine="sequential", bo_windows=2)
    calls = []
    found = bench.allocate(s, callback=lambda i, value, best: calls.append((i, value, best)))
    windows = bench.heldout(2)
    reference = log_probs(tiny_lm.model, windows)
    expected = {}
    for name in CANDIDATES:
        allocation = bench.allocate(replace(s, allocation=name))  # the same probes' windows (bo_windows)
        weights, _ = bench.refine(s, allocation)
        expected[name] = kl_divergence(reference, compress_model(tiny_lm.model, weights), windows)
    best = min(expected, key=expected.get)
    assert found.values == pytest.approx(list(expected.values()), rel=1e-6) and found.method == f"refined-kl ({best})"
    assert found.ranks == bench.allocate(replace(s, allocation=best)).ranks
    assert [c[0] for c in calls] == [1, 2, 3] and calls[-1][2] == min(expected.values())
    assert found.history == [min(found.values[:i]) for i in (1, 2, 3)]
    assert math.isclose(found.ratio_realized, 0.4, abs_tol=0.005)
    assert strategy("refined-kl").search_refines == len(CANDIDATES) and not strategy("refined-kl").reproducible
