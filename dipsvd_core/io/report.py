"""The one report builder: the JSON report of a compression, for the CLI's `compress --report`, every
row of a sweep, and the app's Export page. What a method adds (Dobi-SVD's storage and training, BO's
convergence) comes from its handler (methods.py)."""
from __future__ import annotations

from ..allocation.budget import describe_ratio
from ..methods.handlers import handler, refines
from ..methods.settings import settings_dict


def compression_report(lm, bench, result, params: dict | None, ppl: dict | None = None, speed: dict | None = None,
                       generations: dict | None = None) -> dict:
    """lm: models.LoadedModel; bench: pipeline.Workbench; result: pipeline.Result."""
    settings, allocation = result.settings, result.allocation
    out = {"model": lm.spec, "model_source": lm.source, "dequantized_from_gguf": lm.from_gguf,
           "method": settings.method, "allocation": settings.allocation, "ratio_target": settings.ratio,
           "ratio_realized": allocation.ratio_realized, "ratio_words": describe_ratio(settings.ratio),
           "settings": settings_dict(settings),
           "calibration": {"source": bench.calib, "windows": bench.n_windows, "seqlen": bench.seqlen,
                           "seed": bench.seed},
           "params": params, "p_blocks": [float(x) for x in allocation.p_blocks],
           "ranks": {n: (k if k is not None else "dense") for n, k in allocation.ranks.items()},
           "ppl": ppl or {}, "timings_s": dict(result.timings_s), "versions": library_versions()}
    out.update(handler(settings.method).report_fields(result.info, allocation))
    for step in ("refine", "distill"):
        if step in result.info:
            out[step] = result.info[step]
    if speed:
        out["speed"] = speed
    if generations:
        out["generations"] = generations
    return out


def library_versions() -> dict:
    """The versions of what ran (a report read later or from another machine says what made it)."""
    import platform

    import accelerate
    import safetensors
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "safetensors": safetensors.__version__}


def build_words(settings: dict) -> str:
    """A build in words, for a report's title and the app's column labels (settings_dict of its Settings):
    'dipsvd + heuristic · ratio 0.2 removed, 80% kept · refined (sequential)'."""
    refine = settings.get("refine", "none")
    epochs = settings.get("distill", {}).get("epochs", 0)
    return (f"{settings['method']} + {settings['allocation']} · {describe_ratio(settings['ratio'])} · "
            + (f"refined ({refine})" if refines(refine) else "not refined")
            + (f" · distilled ({epochs} epochs)" if epochs else ""))


def sweep_row(report: dict) -> dict:
    """A sweep's row: the report's headline figures and the per-matrix ranks (so that two sweeps can be compared,
    bench/compare_sweeps.py)."""
    row = {"method": report["method"], "allocation": report["allocation"], "ratio": report["ratio_target"],
           "ratio_realized": report["ratio_realized"], "ppl": report["ppl"],
           "p_blocks": [round(p, 5) for p in report["p_blocks"]], "ranks": report["ranks"]}
    row.update(handler(report["method"]).row_fields(report))
    if "refine" in report:
        row["refine_s"] = report["refine"]["seconds"]
        if "blocks" in report["refine"]:  # how many blocks the held-out check kept refined
            row["refined_blocks"] = sum(b["refined"] for b in report["refine"]["blocks"])
    if report.get("bo_history"):
        row.update(bo_history=report["bo_history"], bo_calls=len(report["bo_history"]))
    return row
