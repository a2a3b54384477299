"""A grid of methods x allocations x ratios on ONE set of cached statistics (`python -m dipsvd_core sweep`).

Everything expensive is shared: the calibration windows, the statistics, the Fisher pass and one
factorisation per method; each row only allocates (slicing cached factors), builds the compressed
copy and measures perplexity. Rows are grouped by method so that one method's factors can be
freed before the next is loaded. The default grid is the paper's ablation (Table 6) plus the
baselines and our coupled allocator:

  svd-llm + uniform   SVD-LLM                   dipsvd + uniform    Step 1 (local importance)
  svd-llm + heuristic Step 2 (global only)      dipsvd + heuristic  Step 1+2 (DipSVD, heuristic)
  dipsvd + bayes      Step 1+2 (DipSVD, BO)     svd / fwsvd / asvd + uniform   baselines
  dipsvd + coupled    ours: per-matrix ranks from whitened loss curves and Fisher weights
  dipsvd + nested     ours: the heuristic's per-block budgets, split per matrix by type-calibrated weights
Dobi-SVD rows are asked for by name (dobi:trained, dobi-remap:trained); they train per ratio.
An allocation with "+refine" (e.g. dipsvd:heuristic+refine) builds that row with sequential
compensation (refine.py) on top of the same factors and allocation.
"""
from __future__ import annotations

import time
from dataclasses import replace

from ..allocation.strategies import ALLOCATIONS
from ..common.errors import DipSVDError
from ..engine import passes as P
from ..engine.evaluate import perplexity
from ..methods.handlers import grid_names, handler, needs, refines, resolve
from ..methods.settings import settings_dict
from ..run.pipeline import Settings, Workbench

REFINED = "+refine"  # an allocation with this suffix is built with sequential compensation

DEFAULT_GRID = (("svd-llm", "uniform"), ("dipsvd", "uniform"), ("svd-llm", "heuristic"), ("dipsvd", "heuristic"),
                ("dipsvd", "bayes"), ("svd", "uniform"), ("fwsvd", "uniform"), ("asvd", "uniform"),
                ("dipsvd", "coupled"), ("dipsvd", "nested"))
LABELS = {("svd-llm", "uniform"): "SVD-LLM", ("dipsvd", "uniform"): "Step 1", ("svd-llm", "heuristic"): "Step 2",
          ("dipsvd", "heuristic"): "Step 1+2", ("dipsvd", "bayes"): "Step 1+2 (BO)",
          ("dipsvd", "coupled"): "ours: coupled", ("dipsvd", "nested"): "ours: nested", ("dobi", "trained"): "Dobi-SVD",
          ("dobi-remap", "trained"): "Dobi-SVD + remap"}


def parse_grid(text: str | None) -> list[tuple[str, str]]:
    """'svd-llm:uniform,dipsvd:heuristic' -> [(method, allocation), ...]; empty means the default grid."""
    if not text or not text.strip():
        return list(DEFAULT_GRID)
    rows = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        method, sep, allocation = item.partition(":")
        plain = allocation.removesuffix(REFINED)
        if not sep or method not in grid_names() or plain not in ALLOCATIONS:
            raise DipSVDError(f"bad grid entry '{item}'; write method:allocation with method in {', '.join(grid_names())} "
                              f"and allocation in {', '.join(ALLOCATIONS)} (optionally +refine), e.g. "
                              "svd-llm:uniform,dipsvd:heuristic,dipsvd:heuristic+refine")
        if (method, allocation) not in rows:
            rows.append((method, allocation))
    if not rows:
        raise DipSVDError("--grid names no row; e.g. --grid svd-llm:uniform,dipsvd:heuristic")
    return rows


def parse_ratios(text: str) -> list[float]:
    try:
        ratios = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise DipSVDError(f"--ratios must be comma-separated numbers like 0.1,0.2,0.3; got '{text}'") from None
    if not ratios or not all(0 < r < 1 for r in ratios):
        raise DipSVDError(f"every ratio must be strictly between 0 and 1 (fraction removed); got '{text}'")
    return ratios


def run_sweep(bench: Workbench, base: Settings, grid: list[tuple[str, str]], ratios: list[float],
              eval_sets: dict, progress=None, on_row=None) -> dict:
    """Rows of {method, allocation, ratio, ratio_realized, ppl{set}, allocation_s, ...}; on_row(report)
    is called after every row so that partial results can be written out."""
    for method, allocation in grid:  # validate every row before any work
        _settings(base, method, allocation, ratios[0]).check()
    report = {"grid": [list(g) for g in grid], "ratios": ratios, "eval_sets": list(eval_sets),
              "eval_tokens": {n: int(w.numel()) for n, w in eval_sets.items()},
              "settings": {k: v for k, v in settings_dict(base).items() if k not in ("method", "allocation", "ratio")},
              "timings_s": {}, "rows": []}
    timings = report["timings_s"]
    t0 = time.perf_counter()
    report["original_ppl"] = {n: perplexity(bench.lm.model, w) for n, w in eval_sets.items()}
    timings["evaluate_original"] = time.perf_counter() - t0
    methods = list(dict.fromkeys(m for m, _ in grid))
    rows = {(m, a): _settings(base, m, a, ratios[0]) for m, a in grid}
    wanted = frozenset().union(*(needs(s) for s in rows.values()))
    gram = list(dict.fromkeys(s.spec for s in rows.values() if P.GRAMS in needs(s)))
    if gram:  # one streaming pass gives the statistics and every Gram method's factors
        t0 = time.perf_counter()
        bench.factor_cache.prefactor(gram, progress)
        timings["statistics + factors (" + ", ".join(s.method for s in gram) + ")"] = time.perf_counter() - t0
    if P.STATISTICS in wanted or gram:
        t0 = time.perf_counter()
        bench.stats(progress)
        timings["statistics"] = time.perf_counter() - t0
    if P.FISHER in wanted:
        t0 = time.perf_counter()
        bench.fisher(progress)  # shared by every row that needs it (heuristic, bayes, coupled, nested, fwsvd)
        timings["fisher"] = time.perf_counter() - t0
    allocations: dict = {}  # a refined row reuses its unrefined twin's allocation (BO is not run twice)
    for method in methods:
        factored = any(P.FACTORS in needs(s) for (m, _), s in rows.items() if m == method)
        if factored:
            spec = next(s.spec for (m, _), s in rows.items() if m == method)
            t0 = time.perf_counter()
            bench.factors(spec, progress)
            timings[f"factors/{method}"] = time.perf_counter() - t0
        for ratio in ratios:
            for m, allocation in grid:
                if m != method:
                    continue
                settings = _settings(base, method, allocation, ratio)
                row = _row(bench, settings, eval_sets, progress, allocations)
                label = LABELS.get((method, settings.allocation), row["label"])
                row["method"], row["allocation"], row["refine"] = method, allocation, settings.refine
                row["label"] = label + (" + refine" if refines(settings.refine) else "")
                report["rows"].append(row)
                if on_row:
                    on_row(report)
        if factored:
            bench.factor_cache.drop(spec)
    return report


def _settings(base: Settings, method: str, allocation: str, ratio: float) -> Settings:
    if allocation.endswith(REFINED):
        base, allocation = replace(base, refine="sequential"), allocation.removesuffix(REFINED)
    method, variant = resolve(method)  # a variant (dobi-remap) is its method with some settings changed
    return variant(replace(base, method=method, allocation=allocation, ratio=ratio))


def _row(bench: Workbench, settings: Settings, eval_sets: dict, progress, allocations: dict | None = None) -> dict:
    from ..io.report import compression_report, sweep_row

    t0 = time.perf_counter()
    if handler(settings.method).trains_ranks:  # training + IPCA update is its "allocation"; build does both
        result = bench.build(settings, progress=progress)
        allocation, t1 = result.allocation, time.perf_counter()
    else:
        key = repr(replace(settings, refine="none"))
        allocations = {} if allocations is None else allocations
        if key not in allocations:
            allocations[key] = bench.allocate(settings, progress)
        allocation = allocations[key]
        t1 = time.perf_counter()
        result = bench.build(settings, allocation)
    ppl = {n: perplexity(result.model, w) for n, w in eval_sets.items()}
    t2 = time.perf_counter()
    row = sweep_row(compression_report(bench.lm, bench, result, None, ppl))
    del result
    row.update(label=LABELS.get((settings.method, settings.allocation), "baseline"), allocation_s=t1 - t0,
               build_eval_s=t2 - t1)
    return row


def markdown(report: dict) -> str:
    """One table: a row per (method, allocation, ratio), perplexity per evaluation set."""
    sets = report["eval_sets"]
    head = ["method", "allocation", "step", "ratio (removed / kept)", "realized", *[f"ppl {s}" for s in sets],
            "allocation s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    orig = report.get("original_ppl", {})
    lines.append("| original | - | - | 0 / 100% | 0 | " + " | ".join(f"{orig.get(s, float('nan')):.2f}" for s in sets)
                 + " | - |")
    for r in sorted(report["rows"], key=lambda r: (r["ratio"], _order(report, r))):
        cells = [r["method"], r["allocation"], r["label"], f"{r['ratio']:g} / {100 * (1 - r['ratio']):.0f}%",
                 f"{r['ratio_realized']:.4f}", *[f"{r['ppl'][s]:.2f}" for s in sets], f"{r['allocation_s']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _order(report: dict, row: dict) -> int:
    grid = [tuple(g) for g in report["grid"]]
    key = (row["method"], row["allocation"])
    return grid.index(key) if key in grid else len(grid)
