"""Every registered method, allocation and refine choice, and every distinct set of passes a build runs (a cover of
the registrations, `combinations`, not their whole product), on the tiny random Llama, with the test-only
allocation and scaling of tests/extensions.py registered too: full rank gives W back, the
realized ratio is on budget, the phases the plan says are needed are exactly the passes the run records in its
timings, and save and load round-trip. A new registration is tested here without editing this file."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from extensions import TEST_ONLY, registered

from dipsvd_core.allocation.allocators import PROBE_KEEP
from dipsvd_core.allocation.budget import matrix_params, rank_for
from dipsvd_core.allocation.strategies import names_for, strategy
from dipsvd_core.cli import main
from dipsvd_core.common.errors import DipSVDError
from dipsvd_core.engine import passes
from dipsvd_core.io.compressed import load_compressed, save_compressed
from dipsvd_core.methods.dobi import DobiConfig
from dipsvd_core.methods.handlers import handler, method_names, needs, refines
from dipsvd_core.outputs.sweep import parse_grid, run_sweep
from dipsvd_core import plan as P
from dipsvd_core.refine.choices import REFINES
from dipsvd_core.run import steps
from dipsvd_core.run.pipeline import Settings, Workbench

FAST = dict(bo_calls=3, bo_windows=1, dobi=DobiConfig(epochs=1, windows=2))


def pass_phases() -> set[str]:
    """The plan's phases that are passes (registered probes included: read while they are registered)."""
    return set(P.phases_in_order()) - set(P.ALWAYS)


def every_combination() -> list[tuple[str, str, str]]:
    """Every registered method x allocation x refine that can be built."""
    with registered():
        # refine "block" is refine "sequential" with a tuning step that reads nothing the allocation gives: it is
        # taken with one allocation per method (uniform), every other refine with every allocation; a search that
        # refines its candidates (refined-kl) runs refine whatever the method's factors: taken with one method
        return [(m, a, r) for m in method_names() for a in names_for(m) for r in REFINES
                if (not refines(r) or handler(m).refinable) and (r != "block" or a == "uniform")
                and (not strategy(a).search_refines or m == "dipsvd")]


# Combinations that once broke on their own, kept whatever the cover below takes: the product's best path, and
# refined-kl, whose search refines its candidates (the plan once missed its refine passes).
ONCE_BROKEN = (("dipsvd", "nested", "sequential"), ("dipsvd", "refined-kl", "none"))


def _passes(combo: tuple[str, str, str]) -> frozenset:
    m, a, r = combo
    return frozenset(needs(Settings(method=m, allocation=a, ratio=0.3, refine=r)))


def combinations() -> list[tuple[str, str, str]]:
    """Each registration once, not every product of them: every method with uniform (or its own allocation),
    every allocation with dipsvd (or its method), every refine choice, one combination per distinct set of
    passes a build runs among the real registrations (dipsvd's where it has one; a test-only one is taken once),
    and ONCE_BROKEN: on today's registrations 34 builds of the 93 in the full product, and still every registered
    method, allocation and refine choice (checked below)."""
    full = every_combination()
    real = [c for c in full if not set(c) & TEST_ONLY]  # the test-only registrations are each taken once
    chosen: list[tuple[str, str, str]] = []

    def take(pick):
        if pick is not None and pick not in chosen:
            chosen.append(pick)

    def first(match):
        return next((c for c in sorted(full, key=lambda c: (c[0] != "dipsvd", c[1] != "uniform", c[2] != "none"))
                     if match(c)), None)

    with registered():
        for m in dict.fromkeys(c[0] for c in full):
            take(first(lambda c: c[0] == m))
        for a in dict.fromkeys(c[1] for c in full):
            take(first(lambda c: c[1] == a))
        for r in REFINES:
            take(first(lambda c: c[2] == r))
        seen = {_passes(c) for c in chosen}
        for c in sorted(real, key=lambda c: (c[0] != "dipsvd", c[1] != "uniform", c[2] != "none")):
            if _passes(c) not in seen:
                seen.add(_passes(c))
                take(c)
    for c in ONCE_BROKEN:
        take(c if c in full else None)
    return chosen


@pytest.fixture(autouse=True)
def extensions():
    with registered():
        yield


@pytest.fixture
def fresh(tiny_lm, tmp_path, monkeypatch):
    """A Workbench over a cache without statistics, factors, Fisher, probes or training, so that every pass a
    build needs really runs (and is timed). The extracted text is shared with the suite's cache: it is no pass,
    and extracting it again took 4 of a test's 5 s."""
    suite = Path(os.environ["DIPSVD_STUDIO_CACHE"])
    (suite / "text").mkdir(parents=True, exist_ok=True)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "text").symlink_to(suite / "text", target_is_directory=True)
    monkeypatch.setenv("DIPSVD_STUDIO_CACHE", str(tmp_path / "cache"))
    return Workbench(tiny_lm, "wiki", 4, 64)


def test_the_cover_names_every_registration_and_every_set_of_passes():
    full, combos = every_combination(), combinations()
    assert {c[0] for c in combos} == {c[0] for c in full} and {c[1] for c in combos} == {c[1] for c in full}
    assert {c[2] for c in combos} == set(REFINES)
    with registered():
        real = [c for c in full if not set(c) & TEST_ONLY]
        assert {_passes(c) for c in combos} >= {_passes(c) for c in real}
    assert set(ONCE_BROKEN) <= set(combos) and len(combos) < len(full)


def test_the_test_only_registrations_are_among_the_combinations():
    combos = every_combination()
    assert ("gram-diag", "uniform", "none") in combos and ("dipsvd", "first-dense", "sequential") in combos
    assert ("dobi", "trained", "none") in combos and ("dobi", "uniform", "none") not in combos
    assert not any(m == "dobi" and refines(r) for m, _, r in combos)


def test_an_allocation_with_a_probe_of_its_own_is_one_file(fresh, tiny_lm):
    """tests/extension_probe.py declares a probe (attention against MLP) and an allocation that reads it, and
    edits nothing else: the pass is in the run order with its button, the plan counts it (one forward over the
    held-out windows per part; the larger part's truncated factors), the build runs and times it, and it is cached."""
    s = Settings(method="dipsvd", allocation="split-by-part", ratio=0.3, **FAST).check()
    assert passes.PASSES.index("part probe") < passes.PASSES.index("search")
    assert passes.ASK["part probe"][1:] == ("Probe the parts", "Probing the parts")
    sh, run = P.shapes_of(tiny_lm.model.config), P.Run(s)
    phases = P.memory(sh, run, False, 0)
    assert phases["part probe"].needed and not phases["type probe"].needed and not phases["block probe"].needed
    truncated = lambda ts: sum(matrix_params(rank_for(PROBE_KEEP, t.out_features, t.in_features),  # noqa: E731
                                             t.out_features, t.in_features) * 4 for t in ts)
    mlp = truncated(t for t in tiny_lm.targets if ".mlp." in t.name)
    attention = truncated(t for t in tiny_lm.targets if ".self_attn." in t.name)
    widest_type = max(truncated(t for t in tiny_lm.targets if t.name.endswith(ty))
                      for ty in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    assert phases["part probe"].host_bytes - phases["type probe"].host_bytes == max(mlp, attention) - widest_type
    P.timing(phases, sh, run, P.Rates(1.0, 1.0, 1.0, 1.0, 1e9, 1e9))
    assert phases["part probe"].seconds * 7 == pytest.approx(phases["type probe"].seconds * 2)  # 2 parts, 7 types

    assert "part probe" in steps.missing(fresh, s) and not steps.done(fresh, "part probe", s)
    result = fresh.build(s)
    assert result.timings_s["part probe"] > 0 and "type probe" not in result.timings_s
    d = fresh.probes.labelled(s, "part")
    assert set(d) == {"mlp", "self_attn"} and all(v > 0 for v in d.values())
    kept = {p: sum(matrix_params(result.allocation.ranks[t.name], t.out_features, t.in_features)
                   for t in tiny_lm.targets if f".{p}." in t.name)
            / sum(t.params for t in tiny_lm.targets if f".{p}." in t.name) for p in d}
    costlier = max(d, key=d.get)
    assert kept[costlier] > kept[min(d, key=d.get)]
    again = Workbench(tiny_lm, "wiki", 4, 64)  # the same cache folder: the factors and the probe are read back
    again.factors(s.spec)
    assert steps.done(again, "part probe", s)
    assert "part probe" not in again.build(s).timings_s


def test_every_pass_is_one_object_with_every_verb(tiny_lm):
    """Each pass of the run order (the test-only probe's included) is one object (run/steps.py) that answers whether
    its result is here and runs it, and gives its phase, its cost in words, its plan bytes and its plan seconds: the
    same figures the plan's table has for that phase."""
    s = Settings(method="dipsvd", allocation="split-by-part", ratio=0.3, refine="sequential", **FAST).check()
    sh, run = P.shapes_of(tiny_lm.model.config), P.Run(s)
    rates = P.Rates(1.0, 1.0, 1.0, 1.0, 1e9, 1e9)
    table = P.memory(sh, run, False, 0)
    P.timing(table, sh, run, rates)
    for name in passes.PASSES:
        p = steps.step(name)
        assert p.name == name and p.phase in table and callable(p.done), name
        assert p.cost, f"{name} has no cost in words"
        assert p.memory(sh, run, False) == dataclasses.replace(table[p.phase], seconds=None), name
        assert p.seconds(sh, run, rates) == table[p.phase].seconds, name
    assert steps.step("part probe").ask[1] == "Probe the parts" and steps.step("factors").ask[1] == "Factor matrices"


@pytest.mark.parametrize("method,allocation,refine", combinations())
def test_conformance(fresh, tiny_lm, tmp_path, method, allocation, refine):
    ratio = 0.3
    settings = Settings(method=method, allocation=allocation, ratio=ratio, refine=refine, **FAST).check()
    result = fresh.build(settings)
    # the realized ratio is on budget (in bytes against 16-bit weights for Dobi-SVD's remap, else parameters)
    assert 0 <= result.allocation.ratio_realized - ratio <= 0.005
    # the plan's needed phases are exactly the passes this run timed
    planned = {n for n, ph in P.memory(P.shapes_of(tiny_lm.model.config), P.Run(settings), False, 0).items()
               if ph.needed} & pass_phases()
    assert {k for k in result.timings_s if k in pass_phases()} == planned
    # save and load give the same model back
    out = save_compressed(result.model, tmp_path / "saved", tiny_lm.tokenizer,
                          {"method": method, "allocation": allocation, **result.info.get("storage", {})})
    back = load_compressed(out, device="cpu")
    ids = fresh.windows()[:1]
    with torch.no_grad():
        torch.testing.assert_close(back.model(ids).logits, result.model(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", sorted({m for m, a, _ in combinations() if a == "uniform"}))
def test_full_rank_gives_every_weight_back(fresh, tiny_lm, method):
    """Every factored method: the factors at full rank multiply back to W (a method whose ranks are not a slice
    of factors, Dobi-SVD, has no uniform allocation and is checked in test_dobi)."""
    factors = fresh.factors(Settings(method=method).spec)
    mods = dict(tiny_lm.model.named_modules())
    for t in tiny_lm.targets:
        f = factors[t.name]
        W = mods[t.name].weight.double()
        assert (f.weight(f.max_rank) - W).abs().max() <= 1e-4 * W.abs().max()


def test_cli_plan_and_sweep_take_the_new_names(tiny_model_dir, tmp_path, capsys):
    code = main(["plan", "--model", tiny_model_dir, "--method", "gram-diag", "--allocation", "first-dense",
                 "--no-bench", "--json"])
    assert code == 0
    phases = json.loads(capsys.readouterr().out)["phases"]
    assert {n for n in pass_phases() if phases[n]["needed"]} == {"statistics", "factors"}
    out_json, out_md = tmp_path / "s.json", tmp_path / "s.md"
    grid = "gram-diag:first-dense,gram-diag:uniform+refine,dipsvd:first-dense"
    code = main(["sweep", "--model", tiny_model_dir, "--grid", grid, "--ratios", "0.3", "--eval", "wiki",
                 "--calib-windows", "4", "--seqlen", "64", "--eval-tokens", "128", "--quiet",
                 "--out-json", str(out_json), "--out-md", str(out_md)])
    assert code == 0
    rows = json.loads(out_json.read_text())["rows"]
    assert {(r["method"], r["allocation"]) for r in rows} == set(parse_grid(grid))
    first = next(r for r in rows if r["allocation"] == "first-dense" and r["method"] == "gram-diag")
    assert first["p_blocks"][0] == 1.0 and first["p_blocks"][1] < 0.5
    report = tmp_path / "r.json"
    code = main(["compress", "--model", tiny_model_dir, "--method", "gram-diag",  # first-dense: its declared own
                 "--ratio", "0.2", "--calib-windows", "4", "--seqlen", "64", "--eval", "wiki", "--eval-tokens", "128",
                 "--quiet", "--report", str(report), "--gram-diag-power", "1.0"])
    assert code == 0
    r = json.loads(report.read_text())
    assert r["method"] == "gram-diag" and r["allocation"] == "first-dense" and r["settings"]["refine"] == "none"
    assert all(k == "dense" for n, k in r["ranks"].items() if ".layers.0." in n)
    assert r["settings"]["gram-diag"] == {"power": 1.0}  # its own option, from the flag its knob declared
    code = main(["compress", "--model", tiny_model_dir, "--method", "svd-llm", "--gram-diag-power", "1.0"])
    assert code != 0 and "--gram-diag-power is an option of gram-diag; use it with method gram-diag, not svd-llm" \
        in capsys.readouterr().err


def test_a_scaling_with_an_option_of_its_own(fresh):
    """The test-only scaling's one option (extensions.GramDiagonalOptions) is settings["gram-diag"], keys its factors
    and changes them as its math says: S = diag(G_jj^power), so at power 0 the factors are plain SVD's."""
    import extensions

    with registered():
        default = Settings(method="gram-diag")
        flat = Settings(method="gram-diag", **{"gram-diag": extensions.GramDiagonalOptions(power=0.0)})
        assert default.spec.options.power == 0.5 and default.spec.key != flat.spec.key
        name = fresh.lm.targets[0].name
        by_power, by_svd = fresh.factors(flat.spec)[name], fresh.factors(Settings(method="svd").spec)[name]
        for k in (1, 8):
            torch.testing.assert_close(by_power.weight(k), by_svd.weight(k), rtol=0, atol=1e-5)
        assert not torch.allclose(fresh.factors(default.spec)[name].weight(8), by_svd.weight(8), atol=1e-3)
        with pytest.raises(DipSVDError, match="power must be in"):
            Settings(method="gram-diag", **{"gram-diag": extensions.GramDiagonalOptions(power=3.0)}).check()


def test_the_sweep_prefetches_what_its_rows_declare(fresh):
    """A grid of the test-only names only: the sweep runs the statistics (with gram-diag's factors in the same
    pass) and no Fisher pass, since no row declares one."""
    report = run_sweep(fresh, Settings(), [("gram-diag", "first-dense")], [0.2], {"wiki": fresh.windows()[:1]})
    assert "fisher" not in report["timings_s"] and "statistics + factors (gram-diag)" in report["timings_s"]
