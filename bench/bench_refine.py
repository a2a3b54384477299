"""Benchmark of issue 11: sequential compensation and the nested allocation on the bundled model.

    .venv/bin/python bench/bench_refine.py [--ratios 0.2,0.3] [--eval-tokens 8192] [--write]

The sweep of bench_sweep.py (SmolLM2-135M, 32 x 512 calibration tokens from wiki, --eval-tokens each
of wiki and news) with today's rows (svd-llm + uniform, dipsvd + heuristic, dipsvd + coupled) and the
new ones (dipsvd + nested; svd-llm + uniform, dipsvd + heuristic and dipsvd + nested, each refined),
in one run on one set of statistics. The BO rows are left out of this run (30 evaluations each); the
comparison takes them from bench/sweep_smollm.json, measured with the same calibration and evaluation
windows. Writes bench/sweep_refine.json and .md; --write replaces the "## Sequential compensation
(issue 11)" section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_sweep import replace_section, run  # noqa: E402
from dipsvd_core.pipeline import Settings  # noqa: E402
from dipsvd_core.sweep import markdown  # noqa: E402

SECTION = "## Sequential compensation (issue 11)"
GRID = ("svd-llm:uniform,dipsvd:heuristic,dipsvd:coupled,dipsvd:nested,"
        "svd-llm:uniform+refine,dipsvd:heuristic+refine,dipsvd:nested+refine")
TODAY = ("heuristic", "bayes", "coupled")  # the allocations of today's sweep that the targets compare against


def comparison(report: dict, previous: dict | None) -> list[str]:
    sets, out = report["eval_sets"], []
    rows = report["rows"] + [dict(r, from_previous=True) for r in (previous or {}).get("rows", [])
                             if r["allocation"] == "bayes" and r["ratio"] in report["ratios"]]
    for ratio in report["ratios"]:
        today = [r for r in rows if r["ratio"] == ratio and r["allocation"] in TODAY and r["method"] == "dipsvd"]
        refined = [r for r in rows if r["ratio"] == ratio and r.get("refine", "none") != "none"]
        nested = [r for r in rows if r["ratio"] == ratio and r["allocation"] == "nested"]
        heur = [r for r in rows if r["ratio"] == ratio and r["allocation"] == "heuristic" and r["method"] == "dipsvd"]
        for s in sets:
            if not today or not refined:
                continue
            best_today = min(today, key=lambda r: r["ppl"][s])
            best_ref = min(refined, key=lambda r: r["ppl"][s])
            gain = 1 - best_ref["ppl"][s] / best_today["ppl"][s]
            src = " (from bench/sweep_smollm.json)" if best_today.get("from_previous") else ""
            out.append(f"- ratio {ratio:g}, {s}: best refined {best_ref['method']} + {best_ref['allocation']} "
                       f"{best_ref['ppl'][s]:.2f} against today's best {best_today['method']} + "
                       f"{best_today['allocation']}{src} {best_today['ppl'][s]:.2f}: {100 * gain:+.1f}% lower "
                       f"(target at least 20%, aim 35%: {'met' if gain >= 0.2 else 'NOT met'})")
            if nested and heur:
                n, h = nested[0]["ppl"][s], heur[0]["ppl"][s]
                out.append(f"  nested {n:.2f} against the heuristic {h:.2f} ({100 * (1 - n / h):+.1f}% lower)")
    for r in report["rows"]:
        if r.get("refine_s"):
            out.append(f"- refine time, {r['method']} + {r['allocation']} at {r['ratio']:g}: {r['refine_s']:.0f} s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="0.2,0.3")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--grid", default=GRID)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    report = run(args.grid, args.ratios, args.eval_tokens, str(HERE / "sweep_refine"), Settings())
    prev_path = HERE / "sweep_smollm.json"
    previous = json.loads(prev_path.read_text()) if prev_path.exists() else None
    lines = comparison(report, previous)
    t = report["timings_s"]
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    text = "\n".join([SECTION, "", f"Machine: {report['machine']}. Date: {date}. Command: `.venv/bin/python "
                      f"bench/bench_refine.py --ratios {args.ratios} --eval-tokens {args.eval_tokens} --write`.", "",
                      markdown(report), *lines, "",
                      f"Cold statistics {t.get('statistics', 0):.0f} s, factors " +
                      ", ".join(f"{k.split('/')[1]} {v:.0f} s" for k, v in t.items() if k.startswith("factors/")) +
                      f", Fisher {t.get('fisher', 0):.0f} s."])
    print(text)
    if args.write:
        replace_section(HERE / "RESULTS.md", SECTION, text)


if __name__ == "__main__":
    main()
