"""Plain data for looking at a model and a compression: what the Studio shows, sweeps and exports.

These functions turn core objects (LoadedModel, Stats, factors, Allocation) into numbers, arrays,
rows and dicts. `figures` draws them; the app only lays them out. No Streamlit import here.
"""
from __future__ import annotations

import csv
import io
from collections import OrderedDict

import numpy as np

from ..allocation.budget import Allocation, describe_ratio, matrix_params
from ..lowrank.factors import FactorSpec
from ..model.blocks import Target, find_blocks
from ..model.models import LoadedModel, count_params
from ..run.pipeline import Settings, Workbench

LARGE_MODEL_PARAMS = 1e9  # below this, small models have flat spectra: 0.1 removed is already a lot


def default_ratio(lm: LoadedModel) -> float:
    """0.1 for models under ~1B parameters (docs/DESIGN.md section 8), 0.2 for 7B-class models."""
    return 0.1 if count_params(lm.model) < LARGE_MODEL_PARAMS else 0.2


def relative_names(lm: LoadedModel) -> dict[str, str]:
    """Target name -> its name inside the block, e.g. 'model.layers.3.mlp.up_proj' -> 'mlp.up_proj'."""
    prefix, _ = find_blocks(lm.model)
    cut = len(prefix) + 1 if prefix else 0
    return {t.name: t.name[cut:].split(".", 1)[1] for t in lm.targets}


def architecture(lm: LoadedModel) -> dict:
    total = count_params(lm.model)
    targeted = sum(t.params for t in lm.targets)
    cfg = getattr(lm.model, "config", None)
    return {"architecture": type(lm.model).__name__, "model_type": getattr(cfg, "model_type", "?"),
            "blocks": lm.n_blocks, "targeted_linears": len(lm.targets), "total_params": total,
            "targeted_params": targeted, "targeted_share": targeted / total, "dtype": str(next(lm.model.parameters()).dtype).replace("torch.", ""),
            "device": str(lm.device), "from_gguf": lm.from_gguf, "source": lm.source, "offload": placed_blocks(lm)}


def placed_blocks(lm: LoadedModel) -> str:
    """Where an offloaded model's decoder blocks are, in words ("" when it is not offloaded)."""
    if not lm.offloaded:
        return ""
    from ..plan import Placement

    prefix, blocks = find_blocks(lm.model)
    where = [lm.model.hf_device_map.get(f"{prefix}.{b}") for b in range(len(blocks))]
    host, disk = where.count("cpu"), where.count("disk")
    if lm.device.type == "cpu":  # the host is the device
        return Placement(len(where) - disk, 0, disk, gpu=False).words()
    return Placement(len(where) - host - disk, host, disk).words()


def layer_rows(lm: LoadedModel) -> list[dict]:
    """One row per kind of targeted Linear (same name inside every block), with its shape and counts."""
    rel = relative_names(lm)
    rows: OrderedDict[tuple, dict] = OrderedDict()
    for t in lm.targets:
        key = (rel[t.name], t.out_features, t.in_features)
        row = rows.setdefault(key, {"linear": rel[t.name], "out x in": f"{t.out_features} x {t.in_features}",
                                    "bias": t.has_bias, "blocks": 0, "params per block": t.params,
                                    "params total": 0})
        row["blocks"] += 1
        row["params total"] += t.params
    return list(rows.values())


def input_groups(lm: LoadedModel, stats) -> dict[str, list[str]]:
    """Linears that read the same input share one Gram and one alpha. Returns a label per group kind
    (e.g. 'self_attn.q_proj / k_proj / v_proj') -> the group's leading Linear in every block."""
    rel = relative_names(lm)
    members: OrderedDict[str, list[str]] = OrderedDict()
    for t in lm.targets:
        members.setdefault(stats.group_of[t.name], []).append(t.name)
    kinds: OrderedDict[str, list[str]] = OrderedDict()
    for leader, names in members.items():
        first = rel[names[0]]
        label = " / ".join([first] + [rel[n].rsplit(".", 1)[-1] for n in names[1:]])
        kinds.setdefault(label, []).append(leader)
    return dict(kinds)


def alpha_matrix(stats, leaders: list[str]) -> np.ndarray:
    """(blocks, channels) channel importance of one input group kind."""
    return np.stack([stats.alpha(n).double().numpy() for n in leaders])


def n_protected(n_channels: int, bar: float) -> int:
    """Channels scaled by `weight`: the top round(bar * n), as in factors.channel_scale."""
    return int(round(bar * n_channels))


def comparison_specs(settings: Settings) -> dict[str, FactorSpec]:
    """Plain SVD, SVD-LLM whitening and the current channel-weighted whitening, for spectra and sweeps."""
    o = settings.dipsvd
    return {"svd": FactorSpec("svd"), "svd-llm": FactorSpec("svd-llm"),
            f"dipsvd (a={o.weight:g}, bar={o.bar:g}, {o.whitening})": FactorSpec("dipsvd", o)}


def spectra(bench: Workbench, name: str, specs: dict[str, FactorSpec]) -> dict[str, np.ndarray]:
    """Singular values of one matrix for each spec already factored (no new SVDs here)."""
    return {label: bench.factors(spec)[name].sigma.numpy() for label, spec in specs.items()
            if bench.factor_cache.has(spec)}


def dobi_preview(bench: Workbench, settings: Settings) -> dict:
    """What trained Dobi-SVD gammas give at this ratio: the budget-fixed allocation, the uniform keep
    ratios in the same currency, the ratio the gammas reached themselves, and the training curve."""
    from ..methods import dobi
    from ..methods.handlers import handler

    trained = handler(settings.method).prepare(bench.context, settings)  # cached: the page asks only after training
    targets, remap = bench.targets, settings.dobi.remap
    ranks = dobi.meet_budget(trained.gammas, targets, settings.ratio, remap)
    uniform = dobi.ranks_from_gammas(dobi.uniform_gammas(targets, settings.ratio, remap), targets, remap)
    return {"allocation": dobi.allocation_of(ranks, targets, settings.ratio, remap, []),
            "uniform": dobi.allocation_of(uniform, targets, settings.ratio, remap, []).p_blocks,
            "ratio_trained": dobi.storage_ratio(dobi.ranks_from_gammas(trained.gammas, targets, remap), targets, remap),
            "history": trained.history}


def budget(targets: list[Target], allocation: Allocation) -> dict:
    before = sum(t.params for t in targets)
    after = sum(matrix_params(allocation.ranks[t.name], t.out_features, t.in_features) for t in targets)
    return {"targeted_before": before, "targeted_after": after, "ratio_target": allocation.ratio_target,
            "ratio_realized": allocation.ratio_realized, "words": describe_ratio(allocation.ratio_target),
            "dense_matrices": sum(k is None for k in allocation.ranks.values())}


def allocation_rows(lm: LoadedModel, allocation: Allocation) -> list[dict]:
    rel = relative_names(lm)
    rows = []
    for t in lm.targets:
        k = allocation.ranks[t.name]
        rows.append({"name": t.name, "block": t.block, "linear": rel[t.name], "out": t.out_features,
                     "in": t.in_features, "p_block": round(float(allocation.p_blocks[t.block]), 6),
                     "rank": "dense" if k is None else k, "params_before": t.params,
                     "params_after": matrix_params(k, t.out_features, t.in_features)})
    return rows


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def ppl_rows(ppl: dict[str, dict[str, float]]) -> list[dict]:
    """Perplexity table rows: one per dataset, original and compressed side by side."""
    names = list(dict.fromkeys([*ppl.get("original", {}), *ppl.get("compressed", {})]))
    rows = []
    for n in names:
        o, c = ppl.get("original", {}).get(n), ppl.get("compressed", {}).get(n)
        rows.append({"dataset": n, "original": None if o is None else round(o, 2),
                     "compressed": None if c is None else round(c, 2),
                     "compressed / original": round(c / o, 3) if o and c else None})
    return rows


def sweep_curves(report: dict, dataset: str) -> dict[str, tuple[list[float], list[float]]]:
    """A `sweep.run_sweep` report as one (ratios, perplexities) curve per method/allocation row kind."""
    curves: dict[str, tuple[list[float], list[float]]] = {}
    for row in sorted(report["rows"], key=lambda r: r["ratio"]):
        name = row["method"] + (" + refine" if row.get("refine", "none") != "none" else "")
        xs, ys = curves.setdefault(name, ([], []))
        xs.append(row["ratio"])
        ys.append(row["ppl"][dataset])
    return curves



# The quality verdict beside the perplexity table: the compressed model's perplexity over the original's on the
# worst evaluated set, in three bands (upper bound, level, colour, words). A colour, not an error box: a model far
# from the original is a finding, not a failure of the app
VERDICT_BANDS = ((1.2, "close", "green", "within 1.2x of the original"),
                 (2.0, "worse", "orange", "1.2-2x the original's perplexity"),
                 (float("inf"), "far", "red", "over 2x the original's perplexity"))
LOW_RATIO = 0.1  # a lower ratio is offered as help only above this


def quality_verdict(ppl: dict[str, dict[str, float]], settings: Settings, calib_tokens: int,
                    offloaded: bool = False) -> dict | None:
    """The verdict on a compressed model from its perplexities (ppl_rows' input: {"original": {set: ppl},
    "compressed": {...}}): None until one set has both; else {"level", "color", "worst": (set, x), "words",
    "help": [what would most likely help, most likely first]} (no help within the first band; none an offloaded
    model cannot take)."""
    both = [(n, c / ppl["original"][n]) for n, c in ppl.get("compressed", {}).items()
            if ppl.get("original", {}).get(n)]
    if not both:
        return None
    name, x = max(both, key=lambda item: item[1])
    _, level, color, band = next(b for b in VERDICT_BANDS if x <= b[0])
    words = f"The compressed model is {band} (worst set: {name}, {x:.2f}x)."
    helps = [] if level == VERDICT_BANDS[0][1] else quality_help(settings, calib_tokens, offloaded)
    return {"level": level, "color": color, "worst": (name, x), "words": words, "help": helps}


def quality_help(settings: Settings, calib_tokens: int, offloaded: bool = False) -> list[str]:
    """What would most likely bring the compressed model closer to the original, from the settings chosen: the
    measured levers of this project (refine, distillation after the build where the model is not offloaded, a
    refine-ready allocation, more calibration), then a lower ratio."""
    from ..allocation.strategies import names_for
    from ..engine.data import DEFAULT_SEQLEN, DEFAULT_WINDOWS
    from ..methods.handlers import handler, refines

    out = []
    if handler(settings.method).refinable and not refines(settings.refine):
        out.append("refine (the Refine box above): same size, each block refitted to the original's outputs")
    if not settings.distill.epochs and not offloaded:  # distillation refuses an offloaded model
        out.append("distillation after the build (its box above, 4 epochs): same size, the whole model trained "
                   "towards the original's next-token distribution; 4% to 42% lower perplexity on the bundled model at "
                   "0.1 to 0.4, for about one more build's time; 1 epoch with 96 windows of the model's own text "
                   "instead lowers the texts outside the calibration by 5-22% more at 0.2-0.3, once the model has "
                   "written them (bench/RESULTS.md)")
    others = [a for a in names_for(settings.method) if a != settings.allocation]
    if others:
        out.append(f"another allocation than {settings.allocation} (Allocation page: {', '.join(others)})")
    if calib_tokens < DEFAULT_WINDOWS * DEFAULT_SEQLEN:
        out.append(f"more calibration: {calib_tokens:,} tokens now, {DEFAULT_WINDOWS} x {DEFAULT_SEQLEN} = "
                   f"{DEFAULT_WINDOWS * DEFAULT_SEQLEN:,} advised (Model and data page)")
    if settings.ratio > LOW_RATIO:
        out.append(f"a lower ratio than {settings.ratio:g}: perplexity rises fast with the ratio (the sweep below "
                   "shows how fast on this model)")
    return out


def block_ranges(blocks) -> str:
    """Block indices in words: [2, 5, 6, 7, 11, 12] -> '2, 5-7, 11-12'."""
    blocks, runs = sorted(int(b) for b in blocks), []
    for b in blocks:
        if runs and b == runs[-1][1] + 1:
            runs[-1][1] = b
        else:
            runs.append([b, b])
    return ", ".join(f"{a}" if a == z else f"{a}-{z}" for a, z in runs)


def rank_words(R, shares: dict, tau: float, k: int | None = None) -> str | None:
    """Where the effective rank R_l is set by a handful of hidden dimensions, in words (None where it is nowhere):
    the blocks, their R_l, and the share of the output's energy their largest dimension holds (energy_shares)."""
    from ..allocation.importance import HANDFUL, degenerate_blocks

    k = k or HANDFUL
    bad = degenerate_blocks(R, k)
    if not bad:
        return None
    R, top1 = np.asarray(R)[bad], shares["top1"][bad]
    dims = ", ".join(str(d) for d in sorted(set(int(d) for d in shares["dim"][bad])))
    return (f"In blocks {block_ranges(bad)} R_l is only {R.min():.0f}-{R.max():.0f}: τ = {tau:g} of the output's energy "
            f"lies in at most {k} directions, and hidden dimension {dims} alone holds {100 * top1.min():.0f}-"
            f"{100 * top1.max():.0f}% of it (a massive activation of the residual stream). There R_l counts that "
            "dimension, not how rich the block's output is, and the min-max normalisation puts R̃ at its floor.")


def q_ties(R, S_norm, Q, beta: float) -> dict | None:
    """Which blocks share one R̃ (R_l at its minimum, R̃ = ε after min-max normalisation) and so have Q_l =
    S̃_l^β ε^(1-β): among them the Fisher sensitivity alone orders Q. None where fewer than two blocks tie."""
    from ..allocation.importance import NORM_EPS

    R, S, Q = (np.asarray(x, dtype=np.float64) for x in (R, S_norm, Q))
    tied = np.flatnonzero(R == R.min()) if R.max() > R.min() else np.array([], dtype=int)
    if len(tied) < 2:
        return None
    rest = np.setdiff1d(np.arange(R.size), tied)
    nearest = rest[np.argmin(Q[rest])]
    return {"blocks": [int(b) for b in tied], "floor": NORM_EPS ** (1 - beta),
            "words": (f"Blocks {block_ranges(tied)} share R_l = {R.min():.0f}, the minimum, so R̃ = ε = {NORM_EPS:g} "
                      f"for each and Q_l = S̃_l^β · ε^(1-β) = {NORM_EPS ** (1 - beta):.1e} · S̃_l^β (β = {beta:g}): "
                      f"Q ties at about zero and the Fisher sensitivity alone decides among them (S̃ from "
                      f"{S[tied].min():.2f} to {S[tied].max():.2f}). The heuristic keeps p_l = c · Q_l, clipped to "
                      "[p_min, p_max], with c the one scale that meets the budget, so the tied blocks keep in "
                      f"proportion to S̃_l^β. Every other block's Q is larger: the smallest (block {nearest}, R_l = "
                      f"{R[nearest]:.0f}) is {Q[nearest] / Q[tied].max():.0f}x the largest tied one, so those blocks "
                      "reach p_max first, and the tied blocks share what the budget leaves.")}
