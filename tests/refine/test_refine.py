"""Sequential compensation (refine.py): the closed form against a brute-force optimum, and the pass on
the tiny model against the plain factors."""
import json
import math
import subprocess
import sys

import pytest
import torch

from dipsvd_core.common.errors import DipSVDError
from dipsvd_core.lowrank.factors import factor_matrix, whitening
from dipsvd_core.refine.closed_form import least_squares_target
from dipsvd_core.refine.sequential import refine
from dipsvd_core.run.pipeline import Settings, Workbench


def objective(W, X, Wp, Xh):
    return float(torch.linalg.norm(W @ X - Wp @ Xh) ** 2)


def closed_form(W, X, Xh, k):
    G, C = Xh @ Xh.T, X @ Xh.T
    target, _ = least_squares_target(W, C, G)
    S, S_inv, _ = whitening(G, torch.ones(G.shape[0], dtype=torch.float64), "paper")
    u, v = factor_matrix(target, S, S_inv, dtype=torch.float64).low_rank(k)
    return u @ v, target


def als(W, X, Xh, k, starts=8, steps=400, seed=0):
    """Brute force: alternating least squares over W' = A B from random starts; the best value found."""
    gen = torch.Generator().manual_seed(seed)
    Y = W @ X
    best = float("inf")
    for _ in range(starts):
        B = torch.randn(k, W.shape[1], generator=gen, dtype=torch.float64)
        for _ in range(steps):
            Z = B @ Xh  # (k, T): A = Y Z^+
            A = torch.linalg.lstsq(Z.T, Y.T).solution.T
            # B: min ||Y - A B Xh|| -> vec form via the normal equations (A^T A) B (Xh Xh^T) = A^T Y Xh^T
            lhs = torch.kron(A.T @ A, Xh @ Xh.T)
            rhs = (A.T @ Y @ Xh.T).reshape(-1)
            B = torch.linalg.solve(lhs, rhs).reshape(k, -1)
        best = min(best, objective(W, X, A @ B, Xh))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_closed_form_is_the_optimum(seed):
    g = torch.Generator().manual_seed(seed)
    out, inn, T, k = 6, 8, 120, 3
    W = torch.randn(out, inn, generator=g, dtype=torch.float64)
    X = torch.randn(inn, T, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, inn, dtype=torch.float64)[:, None]
    Xh = X + 0.3 * torch.randn(inn, T, generator=g, dtype=torch.float64)  # what compressed blocks feed
    Wp, target = closed_form(W, X, Xh, k)
    assert torch.linalg.matrix_rank(Wp) == k
    value = objective(W, X, Wp, Xh)
    brute = als(W, X, Xh, k, seed=seed)
    assert value == pytest.approx(brute, rel=1e-7)
    # Pythagoras: for any W', the error splits into the target's residual plus the whitened distance
    other = torch.randn(out, k, generator=g, dtype=torch.float64) @ torch.randn(k, inn, generator=g, dtype=torch.float64)
    lhs = objective(W, X, other, Xh)
    rhs = objective(W, X, target, Xh) + float(torch.linalg.norm((target - other) @ Xh) ** 2)
    assert lhs == pytest.approx(rhs, rel=1e-9)
    # the plain truncation (W against X^'s Gram, ignoring that X^ differs from X) is worse
    S, S_inv, _ = whitening(Xh @ Xh.T, torch.ones(inn, dtype=torch.float64), "paper")
    u, v = factor_matrix(W, S, S_inv, dtype=torch.float64).low_rank(k)
    assert objective(W, X, u @ v, Xh) > value


def _inputs(model, name, windows):
    """The input of Linear `name` over `windows`, as (in, tokens)."""
    mod = dict(model.named_modules())[name]
    got = []
    h = mod.register_forward_pre_hook(lambda m, a: got.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for i in range(len(windows)):
            model(windows[i: i + 1])
    h.remove()
    return torch.cat(got).double().T


def test_refined_model_fits_the_original_output_better(tiny_lm):
    from dipsvd_core.lowrank.surgery import compress_model, low_rank_weights

    settings = Settings(method="svd-llm", ratio=0.4)
    bench = Workbench(tiny_lm, "wiki", 4, 64)
    factors = bench.factors(settings.spec)
    allocation = bench.allocate(settings)
    refined, info = refine(tiny_lm.model, [t.name for t in tiny_lm.targets], bench.windows(), settings.spec,
                           allocation.ranks, damp=0.0, residual=False)  # the exact minimiser of ||W X - W' X^||
    assert set(refined) == {n for n, k in allocation.ranks.items() if k is not None} and info["seconds"] > 0
    # block 0 sees the original inputs (X^ = X): refining changes nothing there
    first = tiny_lm.targets[0].name
    u, v = refined[first]
    u0, v0 = factors[first].low_rank(allocation.ranks[first])
    torch.testing.assert_close((u @ v).double(), (u0 @ v0).double(), rtol=1e-4, atol=1e-5)
    # every matrix of the last block (down_proj too, whose inputs come from the refined gate/up): on the
    # inputs the refined compressed model gives it, the refined matrix is closer to the original output
    # than the plain factors' rank-k slice
    model = compress_model(tiny_lm.model, refined)
    plain = low_rank_weights(factors, allocation.ranks)
    for name in [t.name for t in tiny_lm.targets if t.block == tiny_lm.n_blocks - 1]:
        if allocation.ranks[name] is None:
            continue
        X, Xh = _inputs(tiny_lm.model, name, bench.windows()), _inputs(model, name, bench.windows())
        W = dict(tiny_lm.model.named_modules())[name].weight.detach().double()
        e_refined = objective(W, X, (refined[name][0] @ refined[name][1]).double(), Xh)
        e_plain = objective(W, X, (plain[name][0] @ plain[name][1]).double(), Xh)
        assert e_refined < e_plain, name


def test_refine_takes_its_share_of_the_cores_at_every_block(tiny_lm, machine):
    """A long refine started beside another compute job takes the cores back once that job ends: each block
    re-reads the machine's jobs (cores.share), not only the phase's start."""
    from dipsvd_core.common import cores

    machine.with_cores(2)
    settings = Settings(method="svd-llm", ratio=0.4)
    bench = Workbench(tiny_lm, "wiki", 4, 64)
    bench.factors(settings.spec)
    ranks = bench.allocate(settings).ranks
    job = machine.other_job()
    threads = {}

    def progress(fraction, words):  # the other job ends during block 1's first group
        threads.setdefault(words.split(":")[0], torch.get_num_threads())
        job.unlink(missing_ok=True)

    with cores.job():  # this refine and the other job: one thread each at the start
        refine(tiny_lm.model, [t.name for t in tiny_lm.targets], bench.windows(), settings.spec, ranks,
               progress=progress)
    assert threads["block 1/2"] == 1 and threads["block 2/2"] == 2, threads


def test_residual_drift_brings_the_block_outputs_back(tiny_lm):
    """With the residual drift in the last Linear's target (the default), the compressed model's last hidden
    state is closer to the original's on the calibration windows than with the plain least-squares target."""
    from dipsvd_core.lowrank.surgery import compress_model

    settings = Settings(method="svd-llm", ratio=0.4)
    bench = Workbench(tiny_lm, "wiki", 4, 64)
    ranks = bench.allocate(settings).ranks
    names, windows = [t.name for t in tiny_lm.targets], bench.windows()

    def last_hidden(model):
        with torch.no_grad():
            return torch.cat([model(windows[i: i + 1], output_hidden_states=True).hidden_states[-1]
                              for i in range(len(windows))]).double()

    reference = last_hidden(tiny_lm.model)
    errors = {}
    for residual in (False, True):
        weights, _ = refine(tiny_lm.model, names, windows, settings.spec, ranks, residual=residual)
        errors[residual] = float(torch.linalg.norm(last_hidden(compress_model(tiny_lm.model, weights)) - reference))
    assert errors[True] < errors[False]


def test_refine_in_compress_and_sweep(tiny_model_dir, tmp_path):
    rep = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "dipsvd_core", "compress", "--model", tiny_model_dir, "--method",
                           "dipsvd", "--ratio", "0.3", "--refine", "sequential", "--calib-windows", "4", "--seqlen",
                           "64", "--eval", "wiki", "--eval-tokens", "256", "--report", str(rep), "--quiet", "--generate"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(rep.read_text())
    assert r["settings"]["refine"] == "sequential" and r["refine"]["seconds"] > 0 and "refine" in r["timings_s"]
    assert [b["block"] for b in r["refine"]["blocks"]] == [0, 1] and r["refine"]["held_windows"] == [3]
    kept = sum(b["refined"] for b in r["refine"]["blocks"])
    assert f"refine: refined {kept} of 2 blocks" in proc.stdout and "1 of 4 windows held out" in proc.stdout
    # --generate: each generation with its repetition measures, in the report and on the summary
    from dipsvd_core.engine.evaluate import DEFAULT_PROMPTS, repetition

    for kind in ("original", "compressed"):
        rows = r["generations"][kind]
        assert [g["prompt"] for g in rows] == DEFAULT_PROMPTS
        for g in rows:
            measures = repetition(g["text"])
            assert (g["distinct_3"], g["longest_repeat"]) == (measures["distinct_3"], measures["longest_repeat"])
            assert (f"  {kind} | {g['prompt']} | distinct 3-grams {g['distinct_3']:.2f}, longest repeat "
                    f"{g['longest_repeat']} words") in proc.stdout
    out = tmp_path / "s.json"
    proc = subprocess.run([sys.executable, "-m", "dipsvd_core", "sweep", "--model", tiny_model_dir, "--grid",
                           "svd-llm:uniform,svd-llm:uniform+refine", "--ratios", "0.3", "--calib-windows", "4",
                           "--seqlen", "64", "--eval", "wiki", "--eval-tokens", "256", "--out-json", str(out),
                           "--out-md", str(tmp_path / "s.md"), "--quiet"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["allocation"], r["refine"], r["label"]) for r in rows] == [
        ("uniform", "none", "SVD-LLM"), ("uniform+refine", "sequential", "SVD-LLM + refine")]
    assert rows[0]["ratio_realized"] == rows[1]["ratio_realized"]  # same allocation, refitted matrices
    # the refined row is its twin exactly where the held-out check kept every block unrefined
    assert 0 <= rows[1]["refined_blocks"] <= 2
    assert (rows[0]["ppl"]["wiki"] == rows[1]["ppl"]["wiki"]) == (rows[1]["refined_blocks"] == 0)
    assert "svd-llm | uniform+refine" in (tmp_path / "s.md").read_text()


def test_refine_refuses_dobi():
    from dipsvd_core.common.errors import DipSVDError

    with pytest.raises(DipSVDError, match="refine works on SVD factors"):
        Settings(method="dobi", allocation="trained", refine="sequential").check()


def test_damped_solver_is_the_regularised_inverse_and_one_serves_a_group():
    from dipsvd_core.refine.closed_form import solver

    g = torch.Generator().manual_seed(3)
    X = torch.randn(40, 300, generator=g, dtype=torch.float64) * torch.logspace(-3, 2, 40, dtype=torch.float64)[:, None]
    G = X @ X.T
    M = torch.randn(7, 40, generator=g, dtype=torch.float64)
    delta = 0.01 * torch.trace(G) / 40
    expected = M @ torch.linalg.inv(G + delta * torch.eye(40, dtype=torch.float64))
    for compute in (torch.float64, torch.float32):
        solve, n = solver(G, compute, 0.01)  # damped: the Cholesky path
        assert n == 0
        tol = 1e-10 if compute == torch.float64 else 1e-4
        torch.testing.assert_close(solve(M).double(), expected, rtol=tol, atol=tol * float(expected.abs().max()))
    # undamped: the floored eigendecomposition, which counts what it floored
    Gs = torch.diag(torch.tensor([1.0, 1e-14, 2.0], dtype=torch.float64))
    solve, n = solver(Gs, torch.float64, 0.0)
    assert n == 1
    torch.testing.assert_close(solve(torch.eye(3, dtype=torch.float64)).diagonal(),
                               torch.tensor([1.0, 1 / (2.0 * 1e-10), 0.5], dtype=torch.float64))
    # least_squares_target with a shared solver equals the one that factorises on its own
    W, C = torch.randn(5, 40, generator=g, dtype=torch.float64), G * 0.9
    a, _ = least_squares_target(W, C, G, damp=0.01)
    b, _ = least_squares_target(W, C, G, damp=0.01, solve=solver(G, torch.float64, 0.01)[0])
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_nan_activations_stop_refine_with_a_message(tiny_lm):
    import copy

    from dipsvd_core.common.errors import DipSVDError

    model = copy.deepcopy(tiny_lm.model)
    bench = Workbench(tiny_lm, "wiki", 2, 32)
    settings = Settings(method="svd-llm", ratio=0.3)
    ranks = bench.allocate(settings).ranks
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight[0] = float("nan")
    with pytest.raises(DipSVDError, match="NaN or infinite activations at model.layers.1"):
        refine(model, [t.name for t in tiny_lm.targets], bench.windows(), settings.spec, ranks)
    # failing in a later group of the block, after q/k/v and o were swapped on the compressed path: every
    # replaced forward is put back, no hook is left behind (transformers' own hooks, if any, stay as they were)
    model = copy.deepcopy(tiny_lm.model)
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[0] = float("nan")

    def state():
        return {n: ("forward" in m.__dict__, list(m._forward_hooks), list(m._forward_pre_hooks))
                for n, m in model.named_modules()}
    before = state()
    with pytest.raises(DipSVDError, match="NaN or infinite activations at model.layers.1.mlp"):
        refine(model, [t.name for t in tiny_lm.targets], bench.windows(), settings.spec, ranks)
    assert state() == before


def test_last_linear_fits_the_original_block_output(tiny_lm):
    """The residual-writing Linear's closed form: with B the original block's output and R^ the compressed path's
    residual, (B - R^) X^^T = W C + (R - R^) X^^T, and the refined factors are the whitened rank-k truncation of
    W* = (B - R^) X^^T (G^ + delta I)^{-1}, all taken on the refined compressed model itself."""
    from dipsvd_core.lowrank.surgery import compress_model
    from dipsvd_core.model.blocks import find_blocks
    from dipsvd_core.refine.choices import DAMP
    from dipsvd_core.refine.closed_form import solver

    settings = Settings(method="svd-llm", ratio=0.4)
    bench = Workbench(tiny_lm, "wiki", 4, 64)
    ranks, windows = bench.allocate(settings).ranks, bench.windows()
    refined, _ = refine(tiny_lm.model, [t.name for t in tiny_lm.targets], windows, settings.spec, ranks)
    last = tiny_lm.n_blocks - 1
    name = next(t.name for t in tiny_lm.targets if t.block == last and t.name.endswith("down_proj"))
    assert ranks[name] is not None

    def capture(model):
        """down_proj's input x and output y and the last block's output b, (tokens, width) in float64."""
        got = {"x": [], "y": [], "b": []}

        def linear(mod, args, y):
            got["x"].append(args[0])
            got["y"].append(y)
        hooks = [dict(model.named_modules())[name].register_forward_hook(linear),
                 find_blocks(model)[1][last].register_forward_hook(
                     lambda mod, args, y: got["b"].append(y[0] if isinstance(y, tuple) else y))]
        with torch.no_grad():
            for i in range(len(windows)):
                model(windows[i: i + 1])
        for h in hooks:
            h.remove()
        return {k: torch.cat([t.reshape(-1, t.shape[-1]) for t in v]).double() for k, v in got.items()}

    orig, comp = capture(tiny_lm.model), capture(compress_model(tiny_lm.model, refined))
    W = dict(tiny_lm.model.named_modules())[name].weight.detach().double()
    X, Xh, B = orig["x"], comp["x"], orig["b"]
    R, Rh = B - orig["y"], comp["b"] - comp["y"]
    numerator = (B - Rh).T @ Xh
    drifted = W @ (X.T @ Xh) + (R - Rh).T @ Xh
    assert float(torch.linalg.norm(numerator - drifted) / torch.linalg.norm(numerator)) < 1e-6  # 9e-8 measured
    assert float(torch.linalg.norm(R - Rh)) > 0.05 * float(torch.linalg.norm(R))  # the residual did drift (12%)
    G = Xh.T @ Xh
    solve, _ = solver(G, torch.float64, DAMP)
    S, S_inv, _ = whitening(G, torch.ones(G.shape[0], dtype=torch.float64), "paper")
    u, v = factor_matrix(solve(numerator), S, S_inv, dtype=torch.float64).low_rank(ranks[name])
    ours = (refined[name][0] @ refined[name][1]).double()
    # 2e-6 measured; the plain target (residual=False) is 1.8 away
    assert float(torch.linalg.norm(u @ v - ours) / torch.linalg.norm(ours)) < 1e-4


def test_a_refined_build_reads_the_factors_and_a_block_kept_unrefined_is_exactly_them(tiny_lm, tmp_path, monkeypatch):
    """Refine starts from the unrefined factors: a refined build runs the factor pass, and every block the held-out
    check keeps unrefined carries the factor pass's rank-k slices bit for bit; the report has a line per block."""
    from dipsvd_core.engine import passes as P
    from dipsvd_core.lowrank.surgery import low_rank_weights
    from dipsvd_core.methods.handlers import needs

    monkeypatch.setenv("DIPSVD_STUDIO_CACHE", str(tmp_path))
    s = Settings(method="dipsvd", allocation="uniform", ratio=0.3, refine="sequential")
    assert {P.FACTORS, P.GRAMS, P.REFINE} <= needs(s)
    bench = Workbench(tiny_lm, "wiki", 8, 64)
    result = bench.build(s)
    assert bench.factor_cache.has(s.spec) and "factors" in bench.timings_s
    info = result.info["refine"]
    assert info["held_windows"] == [3, 7] and info["fit_windows"] == 6
    assert [r["block"] for r in info["blocks"]] == list(range(tiny_lm.n_blocks))
    plain = low_rank_weights(bench.factors(s.spec), result.allocation.ranks)
    mods = dict(result.model.named_modules())
    for line in info["blocks"]:
        assert set(line["matrices"]) == {t.name for t in tiny_lm.targets if t.block == line["block"]}
        if not line["refined"]:
            for name in line["matrices"]:
                u, v = plain[name]
                assert torch.equal(mods[name].u.weight, u) and torch.equal(mods[name].v.weight, v), name


def test_held_windows_are_every_fourth_and_refine_needs_two():
    from dipsvd_core.common.errors import DipSVDError
    from dipsvd_core.refine.sequential import held_windows

    assert held_windows(16) == {3, 7, 11, 15} and held_windows(4) == {3} and held_windows(2) == {1}
    assert held_windows(3) == {2} and held_windows(9) == {3, 7}
    with pytest.raises(DipSVDError, match="at least 2 windows"):
        held_windows(1)


def _stats(W, xs, xhs, held, full=False, bs=None, rs=None):
    from dipsvd_core.refine.closed_form import GroupStats

    stats = GroupStats(full, frozenset(held))
    for i, (x, xh) in enumerate(zip(xs, xhs)):
        if full:
            stats.add_residual(i, xh, rs[i], bs[i])
        else:
            stats.add(i, xh, x)
    gx = [sum((xs[i].double().T @ xs[i].double()) for i in range(len(xs)) if (i in held) == part) for part in (0, 1)]
    stats.orig_fit, stats.held.gram_x = gx
    return stats


def test_held_out_error_from_the_sums_is_the_direct_one():
    """||Y - u v X^||^2 over the held-out windows from their Grams alone equals the direct sum, for a plain group
    (Y = W X) and for the residual-writing Linear (Y = B - R^)."""
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(20, 6, generator=g) for _ in range(4)]
    xhs = [x + 0.2 * torch.randn(x.shape, generator=g) for x in xs]
    W = torch.randn(5, 6, generator=g)
    u, v = torch.randn(5, 2, generator=g), torch.randn(2, 6, generator=g)
    held = {1, 3}
    direct = sum(float(((xs[i] @ W.T).double() - (xhs[i] @ v.T @ u.T).double()).pow(2).sum()) for i in held)
    stats = _stats(W, xs, xhs, held)
    assert stats.fit.windows == 2 and stats.held.windows == 2
    assert stats.held_error(W, u, v) == pytest.approx(direct, rel=1e-5)
    bs = [torch.randn(20, 5, generator=g) for _ in xs]
    rs = [torch.randn(20, 5, generator=g) for _ in xs]
    full = _stats(W, xs, xhs, held, full=True, bs=bs, rs=rs)
    direct = sum(float((bs[i].double() - rs[i].double() - (xhs[i] @ v.T @ u.T).double()).pow(2).sum()) for i in held)
    assert full.held_error(None, u, v) == pytest.approx(direct, rel=1e-5)


@pytest.mark.parametrize("case", ["systematic", "unseen"])
def test_each_matrix_keeps_the_refit_only_where_it_wins_on_held_out_windows(case):
    """choose on one input group: with a systematic drift of the inputs (X^ = A X on every window) the refined
    factors win on the held-out windows by a wide margin and are kept (refitted on every window); where only the
    fit windows drift and the held-out ones do not, what the refit learns is wrong there, and the unrefined factors
    are kept bit for bit."""
    from dipsvd_core.lowrank.factors import factor_model
    from dipsvd_core.refine.choices import TAUS
    from dipsvd_core.refine.closed_form import choose

    g = torch.Generator().manual_seed(6)
    inn, out, k = 12, 10, 4
    scales = torch.linspace(0.3, 3, inn)
    xs = [torch.randn(200, inn, generator=g) * scales for _ in range(8)]
    A = torch.eye(inn) + 0.3 * torch.randn(inn, inn, generator=g)
    held = {3, 7}
    xhs = [x if case == "unseen" and i in held else x @ A.T for i, x in enumerate(xs)]
    linear = torch.nn.Linear(inn, out, bias=False)
    stats = _stats(linear.weight.detach(), xs, xhs, held)
    spec = Settings(method="svd-llm").spec
    every = sum(x.double().T @ x.double() for x in xs)
    prior = factor_model({"a": linear.weight.detach()}, spec, {"a": "a"}, {"a": every})["a"].low_rank(k)
    picks, _ = choose(stats, "a", {"a": linear}, spec, {"a": k}, torch.float64, TAUS, {"a": prior}, None, None)
    pick = picks["a"]
    if case == "systematic":
        assert pick["tau"] in TAUS and pick["gain"] > 0.5
        assert not torch.equal(pick["final"][0], prior[0])
    else:
        assert pick["tau"] is None and pick["gain"] == 0.0
        assert pick["final"] is prior


def test_group_stats_accumulate_the_grams_window_by_window():
    """GroupStats, added window by window, holds G^ = X^ X^^T and C = X X^^T (plain group), or G^ and the
    whole numerator (B - R^) X^^T (the residual-writing Linear), over all windows, keeping nothing per window."""
    from dipsvd_core.refine.closed_form import GroupStats

    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(1, 10, 6, generator=g) for _ in range(3)]  # (1, tokens, in) per window
    xhs = [x + 0.1 * torch.randn(x.shape, generator=g) for x in xs]
    # the products run in float32, as in refine, and are summed in float64
    X, Xh = (torch.cat([t.reshape(-1, 6) for t in ts]).double() for ts in (xs, xhs))
    plain = GroupStats(full=False)
    for i, (x, xh) in enumerate(zip(xs, xhs)):
        plain.add(i, xh.reshape(-1, 6), x.reshape(-1, 6))
    torch.testing.assert_close(plain.gram, Xh.T @ Xh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain.cross, X.T @ Xh, rtol=1e-5, atol=1e-5)
    assert plain.numerator is None
    bs = [torch.randn(1, 10, 5, generator=g) for _ in xs]  # the original block's outputs B, hidden 5
    rs = [torch.randn(10, 5, generator=g) for _ in xs]  # the compressed path's residual r^, (tokens, hidden)
    full = GroupStats(full=True)
    for i, (xh, r, b) in enumerate(zip(xhs, rs, bs)):
        full.add_residual(i, xh.reshape(-1, 6), r, b)
    B, Rh = torch.cat([b.reshape(-1, 5) for b in bs]).double(), torch.cat(rs).double()
    torch.testing.assert_close(full.gram, Xh.T @ Xh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full.numerator, (B - Rh).T @ Xh, rtol=1e-5, atol=1e-5)
    assert full.cross is None and full.fit.windows == 3


def test_block_tuning_lowers_the_fit_error_and_each_block_ships_its_held_out_winner(tiny_lm, monkeypatch):
    """refine "block": every tuning (Contest.tune, AdamW on every parameter of the block) lowers the block's error
    on the windows it trains on; each block's report names the contender with the lowest held-out error, a block
    whose winner is "unrefined" ships the factor pass's factors bit for bit, and a tuned block ships its tuned
    norms as new parameters (the original's stay as they were)."""
    from dipsvd_core.lowrank.surgery import low_rank_weights
    from dipsvd_core.refine.choices import TuneConfig
    from dipsvd_core.refine.contest import Contest
    from dipsvd_core.refine.sequential import summary

    bench = Workbench(tiny_lm, "wiki", 8, 64)
    s = Settings(method="svd-llm", ratio=0.4, refine="block", tune=TuneConfig(epochs=3, lr=1e-3))
    fallback = low_rank_weights(bench.factors(s.spec), bench.allocate(s).ranks)
    drops = []
    tune = Contest.tune

    def recorded(self, start, windows, cfg):
        def error(weights, extra=None):
            outs = self.run(weights, windows, extra)
            return sum(float((self.walk.orig.hidden[i] - outs[i]).double().pow(2).sum()) for i in windows)
        before = error(start)
        tuned, extra = tune(self, start, windows, cfg)
        assert extra and all(t.dtype == torch.float32 for t in extra.values())
        drops.append((before, error(tuned, extra)))
        return tuned, extra
    monkeypatch.setattr(Contest, "tune", recorded)
    norms = {n: p.detach().clone() for n, p in tiny_lm.model.named_parameters() if "norm" in n}
    weights, info = bench.refine(s, bench.allocate(s), fallback=fallback)
    assert len(drops) >= tiny_lm.n_blocks and all(after < before for before, after in drops)
    for line in info["blocks"]:
        errors = line["errors"]
        assert set(errors) == {"refined", "unrefined", "tuned"}
        assert line["choice"] == min(errors, key=lambda k: (errors[k], k != "unrefined"))
        if line["choice"] == "unrefined":
            assert all(torch.equal(weights[n][0], fallback[n][0]) for n in line["matrices"])
        tuned_norms = [n for n in weights if f"layers.{line['block']}." in n and "norm" in n]
        assert bool(tuned_norms) == (line["choice"] == "tuned")
        assert all(not torch.equal(weights[n], norms[n]) for n in tuned_norms)
    assert all(torch.equal(p, norms[n]) for n, p in tiny_lm.model.named_parameters() if n in norms)
    assert ("tuned" in summary(info)) == any(b["choice"] == "tuned" for b in info["blocks"])


def test_block_errors_absolute_and_relative():
    """token_errors: "absolute" is each token's mean squared distance over the hidden size; "relative" divides it
    by the original output's mean square at that token, so scaling one token (a massive activation) scales its
    absolute error by the square and leaves its relative error as it was. The held-out sum of "absolute" is the
    summed squared distance."""
    from dipsvd_core.refine.contest import _held_error, token_errors
    from dipsvd_core.refine.walk import Park

    ref = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])  # mean squares 12.5 and 0.5
    out = torch.tensor([[[3.0, 2.0], [0.0, 1.0]]])  # squared distances 4 and 2
    assert token_errors(out, ref, "absolute").tolist() == [[2.0, 1.0]]
    assert token_errors(out, ref, "relative").tolist() == [[pytest.approx(0.16), pytest.approx(2.0)]]
    big_ref, big_out = ref.clone(), out.clone()
    big_ref[0, 0] *= 1000
    big_out[0, 0] *= 1000
    assert token_errors(big_out, big_ref, "absolute")[0, 0] == pytest.approx(2e6)
    assert token_errors(big_out, big_ref, "relative")[0, 0] == pytest.approx(0.16)
    park = Park(torch.device("cpu"))
    refs, outs = [park.put(ref)], {0: park.put(out)}
    assert _held_error(refs, outs, [0], park) == pytest.approx(6.0)
    assert _held_error(refs, outs, [0], park, "relative") == pytest.approx(2 * 2.16)


def test_block_tuning_with_the_relative_error(tiny_lm, monkeypatch):
    """TuneConfig(error="relative"): the tuning lowers each block's relative error on its training windows, and
    the block check that follows scores every contender by that same error."""
    from dipsvd_core.lowrank.surgery import low_rank_weights
    from dipsvd_core.refine.choices import TuneConfig
    from dipsvd_core.refine.contest import Contest, token_errors

    bench = Workbench(tiny_lm, "wiki", 8, 64)
    s = Settings(method="svd-llm", ratio=0.4, refine="block", tune=TuneConfig(epochs=3, lr=1e-3, error="relative"))
    fallback = low_rank_weights(bench.factors(s.spec), bench.allocate(s).ranks)
    drops, kinds = [], set()
    tune = Contest.tune

    def recorded(self, start, windows, cfg):
        def error(weights, extra=None):
            outs = self.run(weights, windows, extra)
            return sum(float(token_errors(outs[i].double(), self.walk.orig.hidden[i], "relative").sum())
                       for i in windows)
        kinds.add(self.kind)
        before = error(start)
        tuned, extra = tune(self, start, windows, cfg)
        drops.append((before, error(tuned, extra)))
        return tuned, extra
    monkeypatch.setattr(Contest, "tune", recorded)
    _, info = bench.refine(s, bench.allocate(s), fallback=fallback)
    assert kinds == {"relative"}
    assert len(drops) >= tiny_lm.n_blocks and all(after < before for before, after in drops)
    with pytest.raises(DipSVDError, match="unknown tune error 'mse'"):
        TuneConfig(error="mse").check()


def test_tuning_schedule_warms_up_then_decays():
    from dipsvd_core.refine.choices import lr_scale

    scales = [lr_scale(i, 20, 0.1) for i in range(20)]
    assert scales[:2] == [0.5, 1.0] and scales[2] == pytest.approx(1.0)
    assert scales[11] == pytest.approx(0.5 * (1 + math.cos(math.pi * 9 / 18)))
    assert all(a > b for a, b in zip(scales[2:], scales[3:])) and scales[-1] > 0
    assert lr_scale(0, 5, 0.0) == 1.0  # at least one warm-up step


@pytest.mark.parametrize("how", ["sequential", "block"])
def test_parked_activations_give_the_same_factors(tiny_lm, monkeypatch, how):
    """On a GPU refine keeps its per-window activations in host memory and brings one window's back at a time
    (Park). Here every kept tensor is wrapped (PARK_CHECK) so that any use that does not go through Park.get
    fails, and the factors are bit for bit those of the run that keeps them as they are."""
    from dipsvd_core.lowrank.surgery import low_rank_weights
    from dipsvd_core.refine import walk

    bench = Workbench(tiny_lm, "wiki", 8, 64)
    s = Settings(method="svd-llm", ratio=0.4, refine=how)
    allocation = bench.allocate(s)
    fallback = low_rank_weights(bench.factors(s.spec), allocation.ranks)
    torch.manual_seed(0)
    kept, info = bench.refine(s, allocation, fallback=fallback)
    monkeypatch.setattr(walk, "PARK_CHECK", True)
    torch.manual_seed(0)
    parked, info2 = bench.refine(s, allocation, fallback=fallback)
    assert [b["choice"] for b in info["blocks"]] == [b["choice"] for b in info2["blocks"]]
    for n in kept:
        assert torch.equal(kept[n][0], parked[n][0]) and torch.equal(kept[n][1], parked[n][1]), n


@pytest.mark.parametrize("compensate", ["outputs", "all"])
def test_dense_blocks_are_compensated(tiny_lm, compensate):
    """compensate: with block 0 factored and block 1 kept dense, refine refits block 1's dense matrices (the
    ones that alone read their input, or all of them) to the inputs the compressed block 0 gives it. They come
    back as weights of the same shape (no parameter added) and the original model is untouched. Fitted on every
    window (no held-out check), the compressed model's last hidden state is closer to the original's there than
    without compensation; with the held-out check, a dense matrix ships only where its block's held-out error
    falls."""
    from dipsvd_core.lowrank.surgery import compress_model, low_rank_weights

    settings = Settings(method="svd-llm", ratio=0.7)
    bench = Workbench(tiny_lm, "wiki", 8, 64)
    names, windows = [t.name for t in tiny_lm.targets], bench.windows()
    full = bench.allocate(settings).ranks
    ranks = {t.name: (full[t.name] if t.block == 0 else None) for t in tiny_lm.targets}
    solo = {"self_attn.o_proj", "mlp.down_proj"}
    expected = {f"{t.name}.weight" for t in tiny_lm.targets
                if t.block == 1 and (compensate == "all" or t.name.split(".", 3)[-1] in solo)}
    before = {n: p.detach().clone() for n, p in tiny_lm.model.named_parameters()}
    plain, _ = refine(tiny_lm.model, names, windows, settings.spec, ranks)
    weights, _ = refine(tiny_lm.model, names, windows, settings.spec, ranks, compensate=compensate)
    assert {n for n in weights if n.endswith(".weight")} == expected
    for n in expected:
        assert weights[n].shape == before[n].shape and not torch.equal(weights[n], before[n])
    assert all(torch.equal(p, before[n]) for n, p in tiny_lm.model.named_parameters())

    def last_hidden(model):
        with torch.no_grad():
            return torch.cat([model(windows[i: i + 1], output_hidden_states=True).hidden_states[-1]
                              for i in range(len(windows))])

    reference = last_hidden(tiny_lm.model)
    models = {k: compress_model(tiny_lm.model, w) for k, w in (("plain", plain), ("compensated", weights))}
    err = {k: float((last_hidden(m) - reference).norm()) for k, m in models.items()}
    assert err["compensated"] < err["plain"]
    assert sum(p.numel() for p in models["compensated"].parameters()) == \
        sum(p.numel() for p in models["plain"].parameters())
    fallback = low_rank_weights(bench.factors(settings.spec), ranks)
    checked, info = refine(tiny_lm.model, names, windows, settings.spec, ranks, fallback=fallback,
                           compensate=compensate)
    line = info["blocks"][-1]
    assert line["block"] == 1 and {f"{n}.weight" for n in line["matrices"]} == expected
    assert all(m["dense"] for m in line["matrices"].values())
    assert line["errors"]["refined" if line["refined"] else "unrefined"] == min(line["errors"].values())
    shipped = {n for n in checked if n.endswith(".weight")}
    assert shipped == ({f"{n}.weight" for n, m in line["matrices"].items() if m["tau"] is not None}
                       if line["refined"] else set())
    from dipsvd_core.refine.sequential import refine_table, summary

    row = refine_table(info)[-1]
    labels = [row[n.rsplit(".", 1)[-1]] for n in line["matrices"]]
    assert all(x == "dense, as it was" or x.startswith("dense, refitted ") for x in labels)
    refitted = sum(x.startswith("dense, refitted") for x in labels) if line["refined"] else 0
    assert (f"{refitted} dense matrices refitted" in summary(info)) == (refitted > 0)


def test_auto_compensation_refits_the_outputs_up_to_0_3_and_nothing_above(tiny_lm):
    """The default `auto`: outputs where the quality panel measured a gain (0.2, 0.3), none where outputs made every
    panel text worse (0.4); a named choice is itself at every ratio. The build's refine info says what ran."""
    from dipsvd_core.refine.choices import AUTO_UP_TO, compensation_for

    assert Settings().compensate == "auto" and AUTO_UP_TO == 0.3
    assert [compensation_for("auto", r) for r in (0.1, 0.3, 0.30000000000000004, 0.31, 0.4)] == \
        ["outputs", "outputs", "outputs", "none", "none"]
    assert [compensation_for(c, 0.4) for c in ("none", "outputs", "all")] == ["none", "outputs", "all"]
    wb = Workbench(tiny_lm, "wiki", 4, 64)
    for ratio, ran in ((0.2, "outputs"), (0.4, "none")):
        info = wb.build(Settings(method="svd", ratio=ratio, refine="sequential")).info["refine"]
        assert info["compensate"] == ran
    with pytest.raises(ValueError, match="compensation_for"):
        refine(tiny_lm.model, [t.name for t in tiny_lm.targets], wb.windows(), Settings(method="svd").spec, {},
               compensate="auto")
