"""Allocations under one budget: the projector, heuristic, coupled (vs brute force) and bayes."""
import itertools
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from dipsvd_core.allocation import allocators
from dipsvd_core.allocation.bayes import bayes
from dipsvd_core.allocation.budget import DENSE, block_params, kept_params, matrix_params, project, uniform
from dipsvd_core.common.errors import DipSVDError
from dipsvd_core.allocation.probes import TYPE_PROBE
from dipsvd_core.model.blocks import Target
from dipsvd_core.run.pipeline import Settings, Workbench


def llama_targets(n_blocks=6, d=64, kv=32, inter=160):
    """Llama-shaped targets: q, k, v, o, gate, up, down per block."""
    shapes = [("q", d, d), ("k", kv, d), ("v", kv, d), ("o", d, d), ("gate", inter, d), ("up", inter, d),
              ("down", d, inter)]
    return [Target(f"layers.{b}.{n}", b, o, i, False) for b in range(n_blocks) for n, o, i in shapes]


def assert_on_budget(a, targets, ratio, p_min, p_max):
    total = sum(t.params for t in targets)
    assert kept_params(a.ranks, targets) <= (1 - ratio) * total
    assert 0 <= a.ratio_realized - ratio <= 0.005
    assert a.ratio_realized == pytest.approx(1 - kept_params(a.ranks, targets) / total)
    assert (a.p_blocks >= p_min - 1e-12).all() and (a.p_blocks <= p_max + 1e-12).all()


Q_CASES = {
    "equal": np.full(6, 0.3),
    "zeros": np.zeros(6),
    "some zeros": np.array([0.0, 1.0, 0.0, 2.0, 0.5, 0.0]),
    "huge outlier": np.array([1.0, 1.0, 1e9, 1.0, 1.0, 1.0]),
    "tiny values": np.array([1e-12, 2e-12, 3e-12, 1e-12, 5e-12, 1e-12]),
    "spread": np.array([1e-6, 0.2, 0.4, 0.6, 0.8, 1.0]),
}


@pytest.mark.parametrize("case", list(Q_CASES))
@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.5, 0.8])
@pytest.mark.parametrize("bounds", [(0.05, 1.0), (0.1, 0.9)])
def test_projector_meets_budget_and_bounds(case, ratio, bounds):
    targets = llama_targets()
    if 1 - ratio > bounds[1]:  # keeping 95% is impossible when no block may keep more than 90%
        with pytest.raises(DipSVDError, match="p_max"):
            project(Q_CASES[case], targets, ratio, *bounds)
        return
    a = project(Q_CASES[case], targets, ratio, *bounds)
    assert_on_budget(a, targets, ratio, *bounds)


def test_projector_on_real_model_shapes_and_errors(tiny_lm):
    for q in Q_CASES.values():
        q = q[: tiny_lm.n_blocks] if len(q) >= tiny_lm.n_blocks else q
        for ratio in (0.1, 0.3):
            assert_on_budget(project(q[:2], tiny_lm.targets, ratio), tiny_lm.targets, ratio, 0.05, 1.0)
    with pytest.raises(DipSVDError, match="p_min"):
        project(np.ones(6), llama_targets(), 0.97, p_min=0.5)
    with pytest.raises(DipSVDError, match="finite"):
        project(np.array([1, np.nan, 1, 1, 1, 1]), llama_targets(), 0.2)


def test_heuristic_gives_more_to_the_block_with_higher_q():
    targets = llama_targets(n_blocks=3)
    q = np.array([0.2, 1.0, 0.5])
    a = allocators.heuristic(q, targets, 0.3)
    assert_on_budget(a, targets, 0.3, 0.05, 1.0)
    kept = np.zeros(3)
    for t in targets:
        kept[t.block] += matrix_params(a.ranks[t.name], t.out_features, t.in_features)
    kept /= block_params(targets)
    assert a.p_blocks[1] > a.p_blocks[2] > a.p_blocks[0]
    assert kept[1] > kept[2] > kept[0]
    # proportional before clamping: p_l / p_m = Q_l / Q_m wherever no bound is hit
    if a.p_blocks.max() < 1:
        assert a.p_blocks[2] / a.p_blocks[0] == pytest.approx(2.5, rel=1e-6)
    with pytest.raises(DipSVDError, match="one importance score per block"):
        allocators.heuristic(q[:2], targets, 0.3)


# --- coupled: exact against brute force -----------------------------------------------------------

def _objective(ranks, sigmas, weights):
    total = 0.0
    for n, k in ranks.items():
        if k is not DENSE:
            total += weights[n] * float((sigmas[n][k:] ** 2).sum())
    return total


def _brute_force(targets, sigmas, weights, budget):
    options = []
    for t in targets:
        k_cap = -(-t.params // (t.out_features + t.in_features)) - 1
        options.append(list(range(1, min(k_cap, t.out_features, t.in_features) + 1)) + [DENSE])
    best = None
    for combo in itertools.product(*options):
        ranks = dict(zip((t.name for t in targets), combo))
        if kept_params(ranks, targets) <= budget:
            value = _objective(ranks, sigmas, weights)
            best = value if best is None or value < best else best
    return best


@pytest.mark.parametrize("seed", range(6))
def test_coupled_is_optimal_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    targets = [Target("a", 0, 9, 6, False), Target("b", 0, 8, 8, False), Target("c", 1, 12, 5, False),
               Target("d", 1, 7, 10, False)]
    # Non-convex spectra on purpose: plateaus and jumps, so the greedy's hull could skip points.
    sigmas = {t.name: np.sort(rng.choice([0.1, 1.0, 3.0], size=min(t.out_features, t.in_features))
                              * rng.uniform(0.5, 2.0, size=min(t.out_features, t.in_features)))[::-1]
              for t in targets}
    weights = {t.name: float(rng.uniform(0.2, 3.0)) for t in targets}
    total = sum(t.params for t in targets)
    for keep in (0.3, 0.5, 0.7, 0.9):
        budget = keep * total
        ranks = allocators.coupled_ranks(sigmas, weights, targets, budget, p_min=0.0, exact=True)
        assert kept_params(ranks, targets) <= budget
        assert _objective(ranks, sigmas, weights) == pytest.approx(_brute_force(targets, sigmas, weights, budget),
                                                                   rel=1e-12, abs=1e-12)
        # the auto choice is the exact solver on a problem this small
        assert allocators.coupled_ranks(sigmas, weights, targets, budget, p_min=0.0) == ranks
        # the greedy is feasible and never worse than the uniform ranks at the same budget
        greedy = allocators.coupled_ranks(sigmas, weights, targets, budget, p_min=0.0, exact=False)
        assert kept_params(greedy, targets) <= budget
        assert _objective(greedy, sigmas, weights) >= _objective(ranks, sigmas, weights) - 1e-12


@pytest.mark.parametrize("seed", range(20))
def test_lower_hull_matches_a_brute_force_hull(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 12))
    costs = np.cumsum(rng.integers(1, 5, size=n))
    losses = rng.choice([rng.uniform(0, 10, size=n), np.sort(rng.uniform(0, 10, size=n))[::-1]])
    hull = allocators._hull(costs, losses)
    # brute force: a point is on the decreasing lower hull from point 0 iff it is below every earlier
    # point's loss and strictly below every chord between a point on its left and a lower one on its right
    expected = [0]
    for j in range(1, n):
        if losses[j] >= losses[:j].min():
            continue  # dominated
        under = True
        for a in range(j):
            for b in range(j + 1, n):
                chord = losses[a] + (losses[b] - losses[a]) * (costs[j] - costs[a]) / (costs[b] - costs[a])
                if losses[j] >= chord - 1e-12 and losses[b] < losses[j]:
                    under = False
        if under:
            expected.append(j)
    assert hull == expected


def test_coupled_greedy_is_fast_on_a_135m_sized_model():
    """30 blocks x 7 matrices of SmolLM2-135M's shapes, up to 576 ranks each."""
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    targets = [Target(f"{b}.{j}", b, o, i, False) for b in range(30) for j, (o, i) in enumerate(shapes)]
    rng = np.random.default_rng(0)
    sigmas = {t.name: np.sort(rng.gamma(2.0, size=min(t.out_features, t.in_features)))[::-1] for t in targets}
    weights = {t.name: float(rng.uniform(0.5, 2)) for t in targets}
    budget = 0.8 * sum(t.params for t in targets)
    t0 = time.perf_counter()
    ranks = allocators.coupled_ranks(sigmas, weights, targets, budget, p_min=0.05)
    seconds = time.perf_counter() - t0
    assert seconds < 1.0
    kept = kept_params(ranks, targets)
    assert budget * 0.999 <= kept <= budget
    # better than uniform ranks on its own objective
    uni = uniform(targets, 0.2).ranks
    assert _objective(ranks, sigmas, weights) < _objective(uni, sigmas, weights)


@pytest.fixture(scope="module")
def bench(tiny_lm):
    return Workbench(tiny_lm, "wiki", 4, 64)


def test_coupled_on_the_tiny_model(bench, tiny_lm):
    s = Settings(method="dipsvd", allocation="coupled", ratio=0.3)
    a = bench.allocate(s)
    targets = tiny_lm.targets
    assert a.method == "coupled"
    assert 0 <= a.ratio_realized - 0.3 <= 0.005
    factors = bench.factors(s.spec)
    w = bench.probes.coupled_weights(s)
    sig = {t.name: factors[t.name].sigma.numpy() for t in targets}
    uni = bench.allocate(Settings(method="dipsvd", allocation="uniform", ratio=0.3))
    assert _objective(a.ranks, sig, w) <= _objective(uni.ranks, sig, w)
    # predicted loss: per block, the sum of the tails of the chosen ranks
    pred = bench.probes.predicted_loss(s, a)
    expected = np.zeros(tiny_lm.n_blocks)
    for t in targets:
        if a.ranks[t.name] is not DENSE:
            expected[t.block] += float((factors[t.name].sigma[a.ranks[t.name]:] ** 2).sum())
    np.testing.assert_allclose(pred, expected, rtol=1e-12)
    np.testing.assert_allclose(a.p_blocks * block_params(targets),
                               [sum(matrix_params(a.ranks[t.name], t.out_features, t.in_features)
                                    for t in targets if t.block == b) for b in range(tiny_lm.n_blocks)])


def test_coupled_weights_are_the_output_fisher_estimate_calibrated_by_the_block_probe(bench, tiny_lm):
    s = Settings(method="dipsvd", allocation="coupled", ratio=0.3)
    targets, factors, fisher = tiny_lm.targets, bench.factors(s.spec), bench.fisher()
    raw = allocators.coupled_weights(factors, fisher, targets)
    for t in targets:  # w_m = G_m / out_m * E_m / L_m(0)^2
        total = float((factors[t.name].sigma.double() ** 2).sum())
        assert raw[t.name] == pytest.approx(fisher.out_grad2[t.name] / t.out_features * fisher.out_energy[t.name]
                                            / total, rel=1e-12)
    # after calibration the coupled objective at the probe's ranks IS the measured loss increase, block by block
    d = bench.probes.block_sensitivity(s)
    assert np.isfinite(d).all() and d.max() > 0  # a random tiny model can even gain from a cut block
    probe_ranks = {t.name: allocators.alloc.rank_for(allocators.PROBE_KEEP, t.out_features, t.in_features)
                   for t in targets}
    floored = np.maximum(d, allocators.PROBE_FLOOR * np.median(d[d > 0]))
    np.testing.assert_allclose(allocators.weighted_loss(factors, bench.probes.coupled_weights(s), probe_ranks, targets),
                               floored, rtol=1e-9)


def test_block_probe_equals_writing_the_truncated_weights_into_a_copy(bench, tiny_lm):
    import copy
    import math

    from dipsvd_core.allocation.probes import block_sensitivity
    from dipsvd_core.engine.evaluate import perplexity

    s = Settings(method="dipsvd")
    factors, windows, model = bench.factors(s.spec), bench.heldout(2), tiny_lm.model
    before = perplexity(model, windows)
    d = block_sensitivity(model, tiny_lm.targets, factors, windows, 0.4)
    assert perplexity(model, windows) == before  # the hooks are gone, nothing was written
    for b in range(tiny_lm.n_blocks):
        other = copy.deepcopy(model)
        mods = dict(other.named_modules())
        with torch.no_grad():
            for t in tiny_lm.targets:
                k = allocators.alloc.rank_for(0.4, t.out_features, t.in_features)
                if t.block == b and k is not DENSE:
                    mods[t.name].weight.copy_(factors[t.name].weight(k).float())
        assert d[b] == pytest.approx(math.log(perplexity(other, windows)) - math.log(before), rel=1e-4, abs=1e-6)


def test_quick_build_only_when_nothing_but_a_slice_is_left(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("DIPSVD_STUDIO_CACHE", str(tmp_path))  # nothing cached by other tests
    fresh = Workbench(tiny_lm, "wiki", 4, 64)
    s = Settings(method="dipsvd", allocation="uniform", refine="none", ratio=0.3)
    assert not fresh.quick_build(s)  # the factors are not in memory yet
    fresh.factors(s.spec)
    assert fresh.quick_build(s) and fresh.quick_build(replace(s, allocation="bayes"))
    assert not fresh.quick_build(replace(s, refine="sequential")) and not fresh.quick_build(replace(s, method="dobi"))
    assert not fresh.quick_build(replace(s, allocation="heuristic"))  # Fisher is still to run
    fresh.fisher()
    assert fresh.quick_build(replace(s, allocation="heuristic"))
    assert not fresh.quick_build(replace(s, allocation="coupled"))  # the block probe is still to run
    fresh.allocate(replace(s, allocation="coupled"))
    assert fresh.quick_build(replace(s, allocation="coupled"))


def test_calibrate_floors_noise_and_rejects_nan():
    c = allocators.calibrate([0.2, -0.01, 0.4], [0.1, 0.5, 0.8])  # median of the positive ones: 0.3
    np.testing.assert_allclose(c, [2.0, allocators.PROBE_FLOOR * 0.3 / 0.5, 0.5])
    with pytest.raises(DipSVDError, match="float32"):
        allocators.calibrate([0.1, float("nan")], [1.0, 1.0])


def test_weighted_loss_sums_each_blocks_weighted_tails():
    targets = [Target("a", 0, 4, 3, False), Target("b", 0, 3, 3, False), Target("c", 1, 5, 2, False)]
    sig = {"a": torch.tensor([3.0, 2.0, 1.0]), "b": torch.tensor([2.0, 1.0, 0.5]), "c": torch.tensor([4.0, 1.0])}
    factors = {n: type("F", (), {"sigma": v})() for n, v in sig.items()}
    w = {"a": 2.0, "b": 10.0, "c": 0.5}
    out = allocators.weighted_loss(factors, w, {"a": 1, "b": DENSE, "c": 1}, targets)
    np.testing.assert_allclose(out, [2.0 * (4 + 1), 0.5 * 1])


# --- bayes ------------------------------------------------------------------------------------

def test_bayes_is_reproducible_and_never_breaks_the_budget(bench, tiny_lm):
    s = Settings(method="dipsvd", allocation="bayes", ratio=0.3, bo_calls=5, bo_windows=2, seed=3)
    seen = []
    first = bench.allocate(s, callback=lambda i, v, b: seen.append((i, v, b)))
    second = bench.allocate(s)
    assert len(first.history) == 5 and [i for i, _, _ in seen] == [1, 2, 3, 4, 5]
    assert first.history == second.history and first.ranks == second.ranks
    assert first.history == list(np.minimum.accumulate(first.values))
    assert first.history[-1] == min(v for _, v, _ in seen)
    assert_on_budget(first, tiny_lm.targets, 0.3, 0.05, 1.0)
    # the warm starts are the first two calls: uniform, then heuristic
    assert seen[0][1] == pytest.approx(bench.memo.get("objective", (s.spec.key, "ppl", 2), None)(
        bench.allocate(Settings(method="dipsvd", allocation="uniform", ratio=0.3)).ranks), rel=1e-9)


def test_bo_objective_swaps_into_the_one_model_and_puts_it_back(bench, tiny_lm):
    from dipsvd_core.allocation.bayes import Objective
    from dipsvd_core.engine.evaluate import perplexity

    model = tiny_lm.model
    before = {n: (id(m), m.weight.clone()) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    params_before = sum(p.numel() for p in model.parameters())
    s = Settings(method="dipsvd", allocation="uniform", refine="none", ratio=0.3)  # the swap is of unrefined factors
    held = bench.heldout(2)
    objective = Objective(model, tiny_lm.targets, bench.factors(s.spec), held)
    built = bench.build(s)
    ranks = built.allocation.ranks
    # at these ranks the swapped model is the built one: the same low-rank modules, so the same perplexity
    value, inside = objective.measure(ranks, lambda m: (m is model, sum(p.numel() for p in m.parameters())))
    assert value == pytest.approx(perplexity(built.model, held), rel=1e-6)
    assert inside == (True, sum(p.numel() for p in built.model.parameters()))  # no second model
    # afterwards, and after a failure inside, every original Linear is back, untouched
    with pytest.raises(RuntimeError):
        objective.measure(ranks, lambda m: (_ for _ in ()).throw(RuntimeError("inside")))
    after = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {n: id(m) for n, m in after.items()} == {n: i for n, (i, _) in before.items()}
    assert all(torch.equal(after[n].weight, w) for n, (_, w) in before.items())
    assert sum(p.numel() for p in model.parameters()) == params_before


def test_bayes_every_evaluated_point_is_on_budget_and_cancel_stops(tiny_lm):
    targets = tiny_lm.targets
    budget = 0.7 * sum(t.params for t in targets)
    evaluated = []

    def objective(ranks):  # a cheap stand-in: prefers keeping block 1
        evaluated.append(kept_params(ranks, targets))
        return float(sum(k or 64 for n, k in ranks.items() if ".0." in n))

    warm = [np.full(2, 0.7), np.array([0.4, 1.0])]
    a = bayes(objective, targets, 0.3, warm, calls=8, seed=0)
    assert len(evaluated) == 8 and max(evaluated) <= budget
    assert len(a.history) == 8 and a.history[-1] == min(a.values)
    # a callback returning False stops after that call; so does a set Event
    b = bayes(objective, targets, 0.3, warm, calls=8, seed=0, callback=lambda i, v, best: i < 3)
    assert len(b.history) == 3
    ev = threading.Event()
    c = bayes(objective, targets, 0.3, warm, calls=8, seed=0, callback=lambda i, v, best: ev.set() if i == 4 else None,
              cancel=ev)
    assert len(c.history) == 4
    assert_on_budget(c, targets, 0.3, 0.05, 1.0)
    with pytest.raises(DipSVDError, match="bo-calls"):
        bayes(objective, targets, 0.3, warm, calls=1)


def test_settings_reject_bad_global_importance_values():
    for bad, match in [(dict(beta=-0.1), "beta"), (dict(tau=0.0), "tau"), (dict(energy="x"), "energy"),
                       (dict(bo_objective="kl"), "objective"), (dict(bo_calls=1), "bo_calls"),
                       (dict(allocation="random"), "allocation")]:
        with pytest.raises(DipSVDError, match=match):
            Settings(**bad).check()


def test_type_probe_equals_writing_every_matrix_of_the_type_into_a_copy(bench, tiny_lm):
    import copy
    import math

    from dipsvd_core.allocation.probes import type_sensitivity
    from dipsvd_core.engine.evaluate import perplexity

    factors, windows, model = bench.factors(Settings(method="dipsvd").spec), bench.heldout(2), tiny_lm.model
    before = perplexity(model, windows)
    d = type_sensitivity(model, tiny_lm.targets, factors, windows, 0.4)
    assert sorted(d) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert perplexity(model, windows) == before  # the hooks are gone, nothing was written
    for ty in ("q_proj", "up_proj"):
        other = copy.deepcopy(model)
        mods = dict(other.named_modules())
        with torch.no_grad():
            for t in tiny_lm.targets:
                k = allocators.alloc.rank_for(0.4, t.out_features, t.in_features)
                if t.name.endswith(ty) and k is not DENSE:
                    mods[t.name].weight.copy_(factors[t.name].weight(k).float())
        assert d[ty] == pytest.approx(math.log(perplexity(other, windows)) - math.log(before), rel=1e-4, abs=1e-6)


def test_nested_weights_are_calibrated_so_that_each_type_probe_is_predicted(bench, tiny_lm):
    s = Settings(method="dipsvd", allocation="nested", refine="none", ratio=0.3)
    targets, factors = tiny_lm.targets, bench.factors(s.spec)
    raw = allocators.coupled_weights(factors, bench.fisher(), targets)
    w = bench.probes.nested_weights(s)
    d = bench.probes.type_sensitivity(s)
    floored = np.maximum(np.array(list(d.values())), allocators.PROBE_FLOOR * np.median([v for v in d.values() if v > 0]))
    probe_ranks = {t.name: allocators.alloc.rank_for(allocators.PROBE_KEEP, t.out_features, t.in_features)
                   for t in targets}
    for ty, measured in zip(d, floored):  # sum over the type of w_m L_m(k)^2 at the probe's ranks = d_type
        mine = [t for t in targets if t.name.endswith("." + ty)]
        predicted = sum(w[t.name] * float((factors[t.name].sigma[probe_ranks[t.name]:].double() ** 2).sum())
                        for t in mine if probe_ranks[t.name] is not DENSE)
        assert predicted == pytest.approx(measured, rel=1e-9)
        ratios = [w[t.name] / raw[t.name] for t in mine]  # one factor per type
        assert max(ratios) == pytest.approx(min(ratios), rel=1e-12)


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_nested_spends_each_blocks_budget_better_than_the_even_split(ratio):
    rng = np.random.default_rng(int(ratio * 10))
    targets = llama_targets()
    Q = np.array([1.0, 0.2, 0.9, 0.1, 0.5, 0.05])  # a spread that leaves some blocks dense
    outer = allocators.heuristic(Q, targets, ratio)
    factors = {t.name: type("F", (), {"sigma": torch.from_numpy(np.sort(rng.gamma(0.7, size=min(t.out_features,
                                                                                                 t.in_features)))[::-1].copy())})()
               for t in targets}
    weights = {t.name: float(rng.uniform(0.1, 10)) for t in targets}
    a = allocators.nested(outer, factors, weights, targets, exact=True)
    assert a.method == "nested" and a.ratio_target == ratio
    assert 0 <= a.ratio_realized - outer.ratio_realized <= 0.01
    even = allocators.weighted_loss(factors, weights, outer.ranks, targets)
    mine = allocators.weighted_loss(factors, weights, a.ranks, targets)
    for b in range(6):
        block = [t for t in targets if t.block == b]
        spent = sum(matrix_params(a.ranks[t.name], t.out_features, t.in_features) for t in block)
        budget = sum(matrix_params(outer.ranks[t.name], t.out_features, t.in_features) for t in block)
        assert spent <= budget  # every block stays inside what the heuristic gave it
        if all(outer.ranks[t.name] is DENSE for t in block):
            assert all(a.ranks[t.name] is DENSE for t in block)
        else:
            assert mine[b] <= even[b] * (1 + 1e-12)  # the even split is feasible, so the optimum is no worse
    assert (mine < even * (1 - 1e-3)).any()  # and unequal weights do move the split
    assert a.p_blocks == pytest.approx([sum(matrix_params(a.ranks[t.name], t.out_features, t.in_features)
                                            for t in targets if t.block == b) for b in range(6)]
                                       / block_params(targets))


def test_nested_type_probe_is_cached_on_disk_and_makes_the_build_quick(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("DIPSVD_STUDIO_CACHE", str(tmp_path))
    s = Settings(method="dipsvd", allocation="nested", refine="none", ratio=0.3)
    first = Workbench(tiny_lm, "wiki", 4, 64)
    first.factors(s.spec)
    first.fisher()
    assert not first.probes.has(s) and not first.quick_build(s)
    a = first.allocate(s)
    assert TYPE_PROBE in first.timings_s and first.probes.has(s) and first.quick_build(s)
    assert not first.probes.has(replace(s, allocation="coupled"))  # the block probe is another one
    again = Workbench(tiny_lm, "wiki", 4, 64)
    again.factors(s.spec)
    assert again.probes.has(s)  # read from the disk cache
    b = again.allocate(s)
    assert TYPE_PROBE not in again.timings_s and b.ranks == a.ranks
