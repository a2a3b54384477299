"""One self-contained HTML file of a compression, to send after the demo (`compress --html FILE`, the Export page).

It opens offline: plotly's JavaScript is written into the file once (no CDN), and every figure is an interactive
plotly chart of it. The sections, from the JSON report (report.py) and the figures the caller passes:
the model and the settings, the importance plots, the allocation, perplexity (and lm-eval accuracy where the
report has it), speed, and the original's and the compressed model's generations side by side, each with its
repetition measures. Every text from the report is HTML-escaped.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import plotly.graph_objects as go

from ..io.report import build_words

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #1f2328; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #d0d7de; }
table { border-collapse: collapse; margin: 0.5rem 0; } td, th { border: 1px solid #d0d7de; padding: 4px 10px; }
th { background: #f6f8fa; text-align: left; } .pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; }
.gen { background: #f6f8fa; padding: 0.6rem; white-space: pre-wrap; border-radius: 6px; }
.muted { color: #656d76; font-size: 0.9rem; }
"""


def _table(header: list[str], rows: list[list]) -> str:
    cells = lambda tag, row: "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in row)  # noqa: E731
    body = "".join(f"<tr>{cells('td', r)}</tr>" for r in rows)
    return f"<table><tr>{cells('th', header)}</tr>{body}</table>"


def _fmt(x) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _summary(report: dict) -> str:
    cal = report.get("calibration", {})
    params = report.get("params") or {}
    rows = [["model", report.get("model")], ["method", report.get("method")],
            ["allocation", report.get("allocation")],
            ["refine", (report.get("settings") or {}).get("refine", "none")],
            ["ratio (target / realized)", f"{report.get('ratio_target')} / {_fmt(report.get('ratio_realized'))}"],
            ["calibration", f"{cal.get('source')}, {cal.get('windows')} x {cal.get('seqlen')} tokens"],
            ["parameters (before / after)", f"{params.get('total_before', '-'):,} / {params.get('total_after', '-'):,}"
             if params else "-"]]
    return _table(["", ""], rows) + "<details><summary>every setting</summary>" + \
        _table(["setting", "value"], _setting_rows(report.get("settings") or {})) + "</details>"


def _setting_rows(settings: dict) -> list[list]:
    """One row per setting, a nested one (Dobi-SVD's) as <field>.<name>: never a Python dict's repr."""
    rows = []
    for name, value in settings.items():
        inner = value.items() if isinstance(value, dict) else [(None, value)]
        rows += [[name if k is None else f"{name}.{k}", _fmt(v)] for k, v in inner]
    return rows


def _perplexity(report: dict) -> str:
    ppl = report.get("ppl") or {}
    sets = sorted({s for side in ppl.values() for s in side})
    if not sets:
        return "<p>no perplexity measured</p>"
    sides = [s for s in ("original", "compressed") if s in ppl]
    rows = [[s, *(_fmt(ppl[side].get(s, "-")) for side in sides)] +
            ([_fmt(ppl["compressed"][s] / ppl["original"][s]) + "x"] if len(sides) == 2 else []) for s in sets]
    return _table(["set", *sides] + (["compressed / original"] if len(sides) == 2 else []), rows)


def _lm_eval(report: dict) -> str:
    tasks = report.get("lm_eval") or {}
    if not tasks:
        return ""
    rows = [[task, side, _fmt(r["acc"]), _fmt("n/a" if r.get("acc_stderr") is None else r["acc_stderr"])]
            for side, results in tasks.items() for task, r in results.items()]
    return "<h2>lm-evaluation-harness</h2>" + _table(["task", "model", "accuracy", "standard error"], rows)


def _speed(report: dict) -> str:
    speed = report.get("speed") or {}
    if not speed:
        return ""
    from ..engine.speed import speed_settings

    rows = [[side, _fmt(s.get("prefill_tok_s")), _fmt(s.get("decode_tok_s")), _fmt(s.get("decode_bytes", "")),
             _fmt(s.get("bytes_bound", ""))] for side, s in speed.items()]
    return "<h2>Speed</h2>" + _table(["model", "prefill tokens/s", "decode tokens/s", "bytes read per decode step",
                                      "decode bound (bytes)"], rows) + f"<p>{html.escape(speed_settings(speed))}</p>"


def _generations(report: dict) -> str:
    """Every model's generation of each prompt in one row: the CLI's {"original": [...], "compressed": [...]}, or the
    app's columns (one label per model)."""
    gens = {label: rows for label, rows in (report.get("generations") or {}).items() if rows}
    if not gens:
        return ""
    parts = ["<h2>Generations, side by side</h2>"]
    grid = f"style='grid-template-columns: repeat({len(gens)}, 1fr)'"
    for row in zip(*gens.values()):
        parts.append(f"<h3>{html.escape(row[0]['prompt'])}</h3><div class='pair' {grid}>")
        for label, g in zip(gens, row):
            parts.append(f"<div><b>{html.escape(label)}</b><div class='gen'>{html.escape(g['text'])}</div>"
                         f"<p class='muted'>distinct 3-grams {g.get('distinct_3', 0):.2f}, longest repeat "
                         f"{g.get('longest_repeat', 0)} words</p></div>")
        parts.append("</div>")
    return "".join(parts)


def report_html(report: dict, figures: dict[str, go.Figure] | None = None) -> str:
    """The whole page: `figures` (title -> figure) are drawn in order after the summary."""
    from plotly.offline import get_plotlyjs

    charts = "".join(f"<h2>{html.escape(title)}</h2>" + fig.to_html(full_html=False, include_plotlyjs=False)
                     for title, fig in (figures or {}).items())
    title = f"DipSVD Studio: {report.get('model')} — " + (build_words(report["settings"]) if "settings" in report else
                                                           f"{report.get('method')}, {report.get('ratio_words')}")
    raw = html.escape(json.dumps({k: report[k] for k in ("ranks", "p_blocks", "timings_s") if k in report}))
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style><script>{get_plotlyjs()}</script></head><body>"
            f"<h1>{html.escape(title)}</h1>{_summary(report)}<h2>Perplexity</h2>{_perplexity(report)}"
            f"{_lm_eval(report)}{_speed(report)}{charts}{_generations(report)}"
            f"<h2>Raw figures</h2><details><summary>ranks, keep ratios, timings (JSON)</summary>"
            f"<pre>{raw}</pre></details></body></html>")


def write_html(path, report: dict, figures: dict[str, go.Figure] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report_html(report, figures), encoding="utf-8")
    return path


def report_figures(bench, result) -> dict[str, go.Figure]:
    """The importance plots the workbench has already computed (no new pass: Fisher only where the run computed it)
    and the allocation against the uniform one, for `result` (pipeline.Result)."""
    from ..allocation import budget as alloc
    from ..engine import passes as P
    from ..run import steps
    from . import figures as F

    out = {}
    if steps.done(bench, P.FISHER, result.settings):
        imp = bench.importance(result.settings)
        out["Fisher sensitivity"] = F.per_block(imp["S"], "Fisher sensitivity S_l", "S_l")
        out["Effective rank"] = F.per_block(imp["R"], "Effective rank R_l", "R_l", color=F.GREEN)
        out["Block importance Q"] = F.importance_q(imp["S_norm"], imp["R_norm"], imp["Q"], result.settings.beta)
    uniform = alloc.uniform(bench.targets, result.settings.ratio)
    out["Allocation"] = F.keep_ratios(result.allocation.p_blocks, uniform.p_blocks, result.settings.allocation)
    return out
