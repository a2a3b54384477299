"""Command-line interface: `python -m dipsvd_core {compress,evaluate,sweep} ...`.

A flat argparse front over the Workbench. Bad input exits with status 2 and one line on stderr
naming the problem and the fix; progress bars go to stderr; the JSON report goes to --report.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch

from ..common import cores
from ..common.errors import DipSVDError, device_out_of_memory
from .args import build_parser, joined_sizes
from .commands import cmd_compress, cmd_evaluate, cmd_plan, cmd_sweep

COMMANDS = {"compress": cmd_compress, "evaluate": cmd_evaluate, "sweep": cmd_sweep, "plan": cmd_plan}
# Where a device out-of-memory error outside memwatch's phases (which name their own) happened, by command
OUTSIDE_PHASES = {"evaluate": "evaluation", "plan": "plan's measurement",
                  "compress": "speed or generation", "sweep": "sweep"}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("DIPSVD_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(joined_sizes(sys.argv[1:] if argv is None else argv))
    try:
        if getattr(args, "report", None) and Path(args.report).is_dir():
            raise DipSVDError(f"--report {args.report} is a folder; give a file name like report.json")
        with cores.job():  # its share of the cores beside the machine's other compute jobs
            report = COMMANDS[args.command](args)
        if isinstance(report, str):  # plan prints its own text
            print(report)
            return 0
    except DipSVDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError as e:  # CUDA's, outside the phases
        print(f"error: {device_out_of_memory(str(e), OUTSIDE_PHASES[args.command])}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory; use fewer calibration windows, a shorter --seqlen, or a smaller model",
              file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2, default=str)
    path = getattr(args, "report", None)  # sweep writes its own --out-json / --out-md
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    print(_summary(report) if path or "rows" in report else text)
    return 0


def _accuracy_words(task: str, r: dict) -> str:
    stderr = "n/a" if r["acc_stderr"] is None else f"{r['acc_stderr']:.3f}"  # none for a single document
    return f"{task} {r['acc']:.3f} ± {stderr} (n={r['n']})"


def _summary(report: dict) -> str:
    if "rows" in report:
        from ..outputs.sweep import markdown

        return markdown(report) + f"written: {', '.join(report.get('report_paths', []))}"
    lines = [f"model {report.get('model')}"]
    if "ratio_target" in report:
        lines.append(f"{report['method']} + {report['allocation']}: ratio {report['ratio_target']:g} removed "
                     f"(realized {report['ratio_realized']:.4f})")
    for kind, sets in (report["ppl"].items() if "compressed" in report["ppl"] else [("ppl", report["ppl"])]):
        lines.append(f"  {kind}: " + ", ".join(f"{k} {v:.2f}" for k, v in sets.items()))
    gens = report.get("generations", {})  # compress: per model; evaluate: the one model's list
    for kind, rows in (gens.items() if isinstance(gens, dict) else [("generated", gens)]):
        for row in rows:
            lines.append(f"  {kind} | {row['prompt']} | distinct 3-grams {row['distinct_3']:.2f}, longest repeat "
                         f"{row['longest_repeat']} words | {' '.join(row['text'].split())}")
    for side, tasks in report.get("lm_eval", {}).items():
        lines.append(f"  lm-eval {side}: " + ", ".join(_accuracy_words(t, r) for t, r in tasks.items()))
    if report.get("refine", {}).get("blocks"):
        from ..refine.sequential import summary

        lines.append(f"  refine: {summary(report['refine'])}")
    if "distill" in report:
        from ..refine.distill import distilled_summary

        lines.append(f"  distill: {distilled_summary(report['distill'])}")
    return "\n".join(lines)
