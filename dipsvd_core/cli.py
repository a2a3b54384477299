"""Command-line interface: `python -m dipsvd_core {compress,evaluate,sweep} ...`.

A flat argparse front over the Workbench. Bad input exits with status 2 and one line on stderr
naming the problem and the fix; progress bars go to stderr; the JSON report goes to --report.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from .common import cores
from .common.errors import DipSVDError, device_out_of_memory
from .engine.data import DEFAULT_CALIB, DEFAULT_SEQLEN, DEFAULT_WINDOWS, SOURCES


class Progress:
    """A tqdm bar driven by (fraction, message) callbacks, one bar per step name."""

    def __init__(self, quiet: bool = False):
        self.quiet, self.bar, self.step = quiet, None, None

    def __call__(self, frac: float, msg: str = "") -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        step = msg.split(":")[0].split(" ")[0]
        if self.bar is None or step != self.step:
            self.close()
            self.bar, self.step = tqdm(total=1000, desc=step, file=sys.stderr, leave=True,
                                       bar_format="{desc:<12}{percentage:3.0f}%|{bar}| {elapsed} {postfix}"), step
        self.bar.n = int(1000 * frac)
        self.bar.set_postfix_str(msg[-48:], refresh=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem (and exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio must be a number, got '{text}'") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(
            f"ratio must be strictly between 0 and 1 (fraction of targeted parameters removed), got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value}")
    return value


def _memory_size(text: str) -> int:
    """plan.memory_size, as an argparse type."""
    from .plan import memory_size

    try:
        return memory_size(text)
    except DipSVDError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


SIZE_OPTIONS = {  # the memory budgets, each a size (_memory_size; _joined_sizes lets a negative one reach it)
    "--device-memory": "the GPU memory this run may use, e.g. 22GiB (default: what is free now); the plan checks the "
                       "run against it",
    "--host-memory": "the host memory this run may use, e.g. 64GiB (default: what is free now)",
}


def _add_budget_args(p: argparse.ArgumentParser) -> None:
    for option, help in SIZE_OPTIONS.items():
        p.add_argument(option, type=_memory_size, default=None, help=help)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (bundled), a hub id, a local folder, a .gguf file, or a saved compressed folder")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the hub")


def _add_speed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speed", action="store_true", help="also measure prefill and decode tokens/s (with the settings "
                   "used and the bytes a decode step reads)")
    p.add_argument("--generate", action="store_true", help="also generate for the default prompts")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="speed and generation with a static KV cache and torch.compile, the first (compiling) call "
                        "timed apart (default: on for CUDA, off on a CPU, where compiling takes a minute)")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval", default="wiki,news", help="comma-separated: wiki, news, wikitext2, ptb, c4, or paths")
    p.add_argument("--eval-tokens", type=_positive_int, default=16384, help="tokens per evaluation set")
    p.add_argument("--eval-seqlen", type=_positive_int, default=None, help="window length (default: --seqlen)")
    p.add_argument("--report", default=None, help="write the JSON report here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _task_list(text: str) -> list[str]:
    """--tasks: comma-separated names, at least one (checked before anything loads)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("--tasks names no task; give one or more, e.g. dipsvd_wiki_cloze")
    return names


def _add_task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", type=_task_list, default=None,
                   help="comma-separated lm-evaluation-harness tasks (zero-shot accuracy with its standard error): "
                        "hub tasks such as arc_easy,hellaswag online, or dipsvd_wiki_cloze (local, from the bundled "
                        "wiki text)")
    p.add_argument("--task-limit", type=_positive_int, default=None, help="documents per task (default: all)")


def _tasks(args, model, tokenizer) -> dict:
    from .outputs.lm_tasks import lm_eval_accuracy

    return lm_eval_accuracy(model, tokenizer, args.tasks, args.task_limit)


def _check_tasks(args) -> None:
    """Before anything loads: the tasks are known and, offline, have their data (lm_tasks.check_tasks)."""
    if args.tasks:
        from .outputs.lm_tasks import check_tasks

        check_tasks(args.tasks)


def _add_calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default=DEFAULT_CALIB, help=f"calibration text: {', '.join(SOURCES)} or a .txt/.jsonl "
                   f"path (default {DEFAULT_CALIB}: wiki with every other passage a chat turn)")
    p.add_argument("--calib-windows", type=_positive_int, default=DEFAULT_WINDOWS)
    p.add_argument("--seqlen", type=_positive_int, default=DEFAULT_SEQLEN)
    p.add_argument("--seed", type=int, default=0)


KINDS = {"positive": _positive_int, "ratio": _ratio, "float": float, "int": int, "str": str}
# the Settings fields every compressing subcommand takes (compress and plan add method, allocation and ratio)
SHARED = ("weight", "bar", "whitening", "p_min", "p_max", "refine", "compute_dtype", "factor_dtype", "beta", "tau",
          "energy", "rank_of", "bo_calls", "bo_objective", "bo_windows", "dobi", "compensate", "tune")


def _add_flag(p, f, dest: str, default=dataclasses.MISSING) -> None:
    """One flag from a knob (knobs.py): its flag, default, help, type and choices come from the field."""
    meta = f.metadata
    if default is dataclasses.MISSING:
        default = f.default
    flag = meta.get("flag") or "--" + f.name.replace("_", "-")
    text = meta.get("help", "").replace("%", "%%")
    if isinstance(default, bool):
        p.add_argument(flag, dest=dest, action="store_true", help=text)
        return
    kw = {"dest": dest, "default": default, "help": text, "metavar": flag.lstrip("-").upper().replace("-", "_")}
    if meta.get("choices"):
        kw["choices"] = list(meta["choices"]())
        kw["metavar"] = "{" + ",".join(kw["choices"]) + "}"
    kind = meta.get("kind") or (type(default).__name__ if default is not None else None)
    if kind in KINDS:
        kw["type"] = KINDS[kind]
    p.add_argument(flag, **kw)


def _add_settings(p, names, **defaults) -> None:
    """Flags for these Settings fields (a nested settings dataclass gets a group of its own), with other defaults
    where given (the CLI's --allocation defaults to the method's own)."""
    from .methods.settings import Settings

    for f in dataclasses.fields(Settings):
        if f.name not in names or not f.metadata.get("cli", True):
            continue
        value = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(value):
            group = p.add_argument_group(f.metadata.get("help") or f.name)
            for sub in dataclasses.fields(value):
                if sub.metadata.get("cli", True):
                    _add_flag(group, sub, f"{f.name}.{sub.name}")
        else:
            _add_flag(p, f, f.name, defaults.get(f.name, dataclasses.MISSING))


def _settings_from(args, **over):
    """The Settings of these flags: every Settings field a flag sets (a nested field's as <field>.<name>)."""
    from .methods.settings import Settings

    fields = {}
    for f in dataclasses.fields(Settings):
        value = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if hasattr(args, f.name):
            fields[f.name] = getattr(args, f.name)
        elif dataclasses.is_dataclass(value):
            sub = {s.name: getattr(args, f"{f.name}.{s.name}") for s in dataclasses.fields(value)
                   if hasattr(args, f"{f.name}.{s.name}")}
            fields[f.name] = dataclasses.replace(value, **sub)
    fields.update(over)
    return Settings(**fields).check()


def _add_compress(sub) -> None:
    c = sub.add_parser("compress", help="compress a model, evaluate it, optionally save it")
    _add_model_args(c)
    _add_settings(c, ("method", "allocation", "ratio", *SHARED), allocation=None)
    _add_calib_args(c)
    c.add_argument("--offload", action="store_true",
                   help="a model bigger than the GPU: as many blocks as --device-memory leaves room for beside the "
                        "plan's working set stay on the GPU, as many of the others as --host-memory holds in host "
                        "memory, the rest on disk; every pass brings each block to the GPU once")
    _add_budget_args(c)
    c.add_argument("--ignore-plan", action="store_true",
                   help="run even when the plan predicts that memory or disk will not suffice")
    c.add_argument("--out", default=None, help="save the compressed model to this folder")
    c.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    c.add_argument("--html", default=None, metavar="FILE",
                   help="write a self-contained HTML report (opens offline: settings, plots, perplexity, speed, "
                        "generations)")
    c.add_argument("--export", choices=("low-rank", "dense"), default="low-rank",
                   help="dense: also write OUT-dense, the low-rank products back in ordinary Linears, for tools that "
                        "run no custom code (it saves no memory)")
    c.add_argument("--no-eval-original", action="store_true", help="skip the original model's perplexity")
    _add_speed_args(c)
    _add_eval_args(c)
    _add_task_args(c)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m dipsvd_core", description="DipSVD Studio: SVD compression of causal LMs")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    _add_compress(sub)

    w = sub.add_parser("sweep", help="a grid of methods x allocations x ratios on one set of statistics")
    _add_model_args(w)
    w.add_argument("--grid", default=None,
                   help="rows as method:allocation, comma-separated (default: the ablation plus baselines), "
                        "e.g. svd-llm:uniform,dipsvd:heuristic")
    w.add_argument("--ratios", default="0.1,0.2,0.3", help="comma-separated fractions REMOVED")
    _add_settings(w, SHARED)
    _add_calib_args(w)
    w.add_argument("--eval", default="wiki,news", help="comma-separated evaluation sets")
    w.add_argument("--eval-tokens", type=_positive_int, default=16384, help="tokens per evaluation set")
    w.add_argument("--out-json", default="sweep.json", help="the JSON report (rewritten after every row)")
    w.add_argument("--out-md", default="sweep.md", help="the Markdown table")
    w.add_argument("--quiet", action="store_true")

    pl = sub.add_parser("plan", help="predicted memory, disk and time of each phase, from the config alone")
    _add_model_args(pl)
    _add_settings(pl, ("method", "allocation", "ratio", "compute_dtype", "factor_dtype", "refine"), allocation=None)
    pl.add_argument("--calib-windows", type=_positive_int, default=DEFAULT_WINDOWS)
    pl.add_argument("--seqlen", type=_positive_int, default=DEFAULT_SEQLEN)
    pl.add_argument("--eval-tokens", type=_positive_int, default=16384, help="tokens per evaluation set")
    pl.add_argument("--eval", default="wiki,news", help="comma-separated evaluation sets (only their number counts)")
    pl.add_argument("--no-eval-original", action="store_true", help="plan without the original's perplexity")
    pl.add_argument("--offload", action="store_true", help="weights on the host, one block at a time on the GPU")
    _add_budget_args(pl)
    pl.add_argument("--no-bench", action="store_true", help="memory only: skip the few-second microbenchmark")
    pl.add_argument("--json", action="store_true", help="print one JSON object")

    e = sub.add_parser("evaluate", help="perplexity of any model, including a saved compressed one")
    _add_model_args(e)
    e.add_argument("--seqlen", type=_positive_int, default=DEFAULT_SEQLEN)
    _add_speed_args(e)
    _add_eval_args(e)
    _add_task_args(e)
    return parser


def _eval_sets(lm, spec: str, seqlen: int, max_tokens: int):
    from .engine.data import evaluation_windows

    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise DipSVDError("--eval names no dataset; give e.g. wiki,news")
    return {n: evaluation_windows(lm.tokenizer, n, seqlen, max_tokens) for n in names}


def _perplexities(model, sets, progress) -> dict:
    from .engine.evaluate import perplexity

    return {name: perplexity(model, w, progress=progress) for name, w in sets.items()}


def _run_of(args):
    """The plan's Run: the settings these flags give, and how the run is carried out."""
    from .methods.handlers import handler
    from .plan import Run

    allocation = getattr(args, "allocation", None) or handler(args.method).default_allocation
    settings = _settings_from(args, method=args.method, allocation=allocation, ratio=args.ratio)
    return Run(settings, calib_windows=args.calib_windows, seqlen=args.seqlen, eval_tokens=args.eval_tokens,
               eval_sets=len([s for s in args.eval.split(",") if s.strip()]),
               eval_original=not args.no_eval_original, dtype=args.dtype, offload=getattr(args, "offload", False),
               save=bool(getattr(args, "out", None)))


def cmd_plan(args):
    from .plan import make_plan, plan_json

    plan = make_plan(args.model, args.device, _run_of(args), bench=not args.no_bench,
                     trust_remote_code=args.trust_remote_code, budgets=_budgets(args))
    return plan_json(plan) if args.json else plan.table()


def _budgets(args) -> dict:
    return {"device": args.device_memory, "host": args.host_memory}


def _check_plan(args) -> tuple[dict | None, object]:
    """The plan's memory figures for this compress run, and where an offloaded run keeps its blocks (plan.Placement,
    from the memory budgets; None otherwise); refuses up front when they do not fit (run.session.checked_plan)."""
    from .run.session import checked_plan

    plan = checked_plan(args.model, args.device, _run_of(args), args.trust_remote_code, _budgets(args),
                        check=not args.ignore_plan)
    if plan is None:
        return None, None
    if not args.quiet:
        print(f"plan: peak host {plan.peak_host_bytes / 2**30:.2f} GiB, "
              f"device {plan.peak_device_bytes / 2**30:.2f} GiB, disk {plan.disk_bytes / 2**30:.2f} GiB "
              "(python -m dipsvd_core plan for the phases and times)"
              + (f"; offload: {plan.placement.words()}" if plan.placement else ""), file=sys.stderr)
    return plan.to_dict(), plan.placement


def _check_paths(args) -> None:
    """Before anything loads: an --out that would be overwritten, text files that are not there, and lm-eval tasks
    that are unknown or, offline, cannot run."""
    from .run.session import dense_folder

    if args.export == "dense" and not args.out:
        raise DipSVDError("--export dense writes next to the saved model; give --out DIR too")
    for out in (args.out, dense_folder(args.out) if args.export == "dense" else None):
        if out and Path(out).exists() and any(Path(out).iterdir()) and not args.force:
            raise DipSVDError(f"{out} already exists and is not empty; choose another --out or pass --force")
    if args.html and Path(args.html).exists() and not args.force:
        raise DipSVDError(f"{args.html} already exists; choose another --html file or pass --force to replace it")
    for path in (args.calib, *args.eval.split(",")):
        if path.endswith((".txt", ".jsonl")) and not Path(path).is_file():
            raise DipSVDError(f"text file not found: {path}; check the path")
    _check_tasks(args)


def _save(args, model, tokenizer, report: dict) -> None:
    from .run.session import save_run

    report.update(save_run(model, args.out, tokenizer, report, force=args.force, dense=args.export == "dense"))


def _speed_and_generations(args, model, tokenizer) -> dict:
    """One model's speed (--speed) and generations (--generate), eager or compiled (--compile; by default compiled
    on CUDA only), with the seconds the generations took; compiled code is forgotten afterwards, so that a model
    converted in place (or the next one) compiles afresh and nothing holds the old weights."""
    from .engine.evaluate import DEFAULT_PROMPTS, generate
    from .engine.speed import compile_default, forget_compiled, speed
    from .model.models import input_device

    compiled = args.compile if args.compile is not None else compile_default(input_device(model))
    out = {}
    if args.speed:
        out["speed"] = speed(model, compiled=compiled)
    if args.generate:
        t0 = time.perf_counter()
        out["generations"] = generate(model, tokenizer, DEFAULT_PROMPTS, chat=True, compiled=compiled)
        out["generation_s"] = time.perf_counter() - t0
    if compiled:
        forget_compiled()
    return out


def _sides(report: dict, timings: dict, original: dict, compressed: dict) -> None:
    """The original's and the compressed model's speed and generations side by side in the report; the compressed
    speed carries the bytes bound (the decode speed-up its bytes read allow)."""
    from .engine.speed import bytes_bound

    if "speed" in compressed:
        report["speed"] = {"original": original["speed"],
                           "compressed": dict(compressed["speed"], bytes_bound=bytes_bound(original["speed"],
                                                                                           compressed["speed"]))}
    if "generations" in compressed:
        report["generations"] = {"original": original["generations"], "compressed": compressed["generations"]}
        timings["generation"] = original["generation_s"] + compressed["generation_s"]


def cmd_compress(args) -> dict:
    from .allocation.budget import param_report
    from .engine.memwatch import PhaseMemory, lifetime_device_peak
    from .io.report import compression_report
    from .methods.handlers import handler
    from .model.models import count_params
    from .run.loading import load_model
    from .run.pipeline import Workbench, peak_memory_mb

    allocation = args.allocation or handler(args.method).default_allocation
    settings = _settings_from(args, method=args.method, allocation=allocation, ratio=args.ratio)
    _check_paths(args)
    t0 = time.perf_counter()
    plan, blocks = _check_plan(args)
    timings = {"plan": time.perf_counter() - t0}  # the config alone; a GGUF's is parsed whole (seconds)
    progress, memory = Progress(args.quiet), PhaseMemory()
    t0 = time.perf_counter()
    with memory.phase("load"):
        lm = load_model(args.model, args.device, args.dtype, args.trust_remote_code, progress, args.offload, blocks=blocks)
    timings["load_model"] = time.perf_counter() - t0
    bench = Workbench(lm, args.calib, args.calib_windows, args.seqlen, args.seed)
    bench.memory = memory
    t0 = time.perf_counter()
    bench.windows()
    timings["calibration_text"] = time.perf_counter() - t0
    # Everything the original is needed for comes first; then the build converts it in place, so the
    # run holds one model, never the original and the compressed one side by side.
    t0 = time.perf_counter()  # evaluation includes cutting its windows, as the app's does
    sets = _eval_sets(lm, args.eval, args.eval_seqlen or args.seqlen, args.eval_tokens)
    with memory.phase("evaluation"):
        ppl = {} if args.no_eval_original else {"original": _perplexities(lm.model, sets, progress)}
    t_eval = time.perf_counter() - t0
    progress.close()
    extra = {"original": _speed_and_generations(args, lm.model, lm.tokenizer)}  # before the in-place build
    if args.tasks:
        extra["lm_eval"] = {"original": _tasks(args, lm.model, lm.tokenizer)}
    params_before = count_params(lm.model)
    result = bench.build(settings, progress=progress, inplace=True)
    timings.update(result.timings_s)
    progress.close()
    t0 = time.perf_counter()
    with memory.phase("evaluation"):
        ppl = {"compressed": _perplexities(result.model, sets, progress), **ppl}
    timings["evaluation"] = t_eval + time.perf_counter() - t0
    progress.close()
    report = compression_report(lm, bench, result,
                                param_report(params_before, result.model, lm.targets, result.allocation.ranks), ppl)
    report["eval"] = {"sets": list(sets), "tokens_per_set": args.eval_tokens}
    if report.get("dobi", {}).get("note"):
        print(f"note: {report['dobi']['note']}", file=sys.stderr)
    _sides(report, timings, extra["original"], _speed_and_generations(args, result.model, lm.tokenizer))
    if args.tasks:
        report["lm_eval"] = dict(extra["lm_eval"], compressed=_tasks(args, result.model, lm.tokenizer))
    if args.out:
        t0 = time.perf_counter()
        with memory.phase("save"):
            _save(args, result.model, lm.tokenizer, report)
        timings["save"] = time.perf_counter() - t0
    report["timings_s"] = timings
    report["peak_memory_mb"] = peak_memory_mb()
    report["memory"] = {"phases": memory.report(), "device_peak_bytes": lifetime_device_peak()}  # the run's
    if plan is not None:
        report["plan"] = plan
    if args.html:
        from .outputs.html_report import report_figures, write_html

        report["html"] = str(write_html(args.html, report, report_figures(bench, result)))
    return report


def cmd_evaluate(args) -> dict:
    from .model.models import count_params
    from .run.loading import load_model
    from .run.pipeline import peak_memory_mb

    _check_tasks(args)
    progress = Progress(args.quiet)
    t0 = time.perf_counter()
    lm = load_model(args.model, args.device, args.dtype, args.trust_remote_code, progress)
    timings = {"load_model": time.perf_counter() - t0}
    sets = _eval_sets(lm, args.eval, args.eval_seqlen or args.seqlen, args.eval_tokens)
    t0 = time.perf_counter()
    report = {"model": lm.spec, "model_source": lm.source, "params": {"total": count_params(lm.model)},
              "ppl": _perplexities(lm.model, sets, progress)}
    timings["evaluation"] = time.perf_counter() - t0
    progress.close()
    entry = getattr(lm.model.config, "dipsvd_compression", None)
    if entry:
        report["compression"] = entry
    measured = _speed_and_generations(args, lm.model, lm.tokenizer)
    report.update({k: measured[k] for k in ("speed", "generations") if k in measured})
    if args.tasks:
        report["lm_eval"] = _evaluate_tasks(args, lm, entry)
    report["timings_s"] = timings
    report["peak_memory_mb"] = peak_memory_mb()
    return report


def _evaluate_tasks(args, lm, entry: dict | None) -> dict:
    """lm-eval accuracy of the model, and for a saved compressed folder of the original it names, side by side
    (loaded after the compressed one is freed: one model at a time)."""
    from .run.loading import load_model

    side = "compressed" if entry else "model"
    out = {side: _tasks(args, lm.model, lm.tokenizer)}
    if entry and entry.get("model"):
        del lm.model
        original = load_model(entry["model"], args.device, args.dtype, args.trust_remote_code)
        out = {"original": _tasks(args, original.model, original.tokenizer), **out}
    return out


def cmd_sweep(args) -> dict:
    from .outputs.sweep import markdown, parse_grid, parse_ratios, run_sweep
    from .run.loading import load_model
    from .run.pipeline import Workbench, peak_memory_mb

    grid, ratios = parse_grid(args.grid), parse_ratios(args.ratios)
    base = _settings_from(args, ratio=ratios[0])
    for out in (args.out_json, args.out_md):
        if Path(out).is_dir():
            raise DipSVDError(f"{out} is a folder; give a file name")
    progress = Progress(args.quiet)
    t0 = time.perf_counter()
    lm = load_model(args.model, args.device, args.dtype, args.trust_remote_code, progress)
    load_s = time.perf_counter() - t0
    bench = Workbench(lm, args.calib, args.calib_windows, args.seqlen, args.seed)
    sets = _eval_sets(lm, args.eval, args.seqlen, args.eval_tokens)

    def write(report):
        report.update(model=lm.spec, dequantized_from_gguf=lm.from_gguf,
                      calibration={"source": args.calib, "windows": args.calib_windows, "seqlen": args.seqlen,
                                   "seed": args.seed})
        Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_json).write_text(json.dumps(report, indent=1, default=str))
        Path(args.out_md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_md).write_text(markdown(report))

    report = run_sweep(bench, base, grid, ratios, sets, progress, on_row=write)
    progress.close()
    report["timings_s"]["load_model"] = load_s
    report["peak_memory_mb"] = peak_memory_mb()
    write(report)
    report["report_paths"] = [args.out_json, args.out_md]
    return report


def _joined_sizes(argv: list[str]) -> list[str]:
    """`--device-memory -1GiB` as `--device-memory=-1GiB`: argparse takes a value starting with '-' for an option
    and would answer "expected one argument"; joined, the size itself gets its message."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in SIZE_OPTIONS and i + 1 < len(argv) and argv[i + 1].startswith("-") and argv[i + 1][1:2].isdigit():
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


COMMANDS = {"compress": cmd_compress, "evaluate": cmd_evaluate, "sweep": cmd_sweep, "plan": cmd_plan}
# Where a device out-of-memory error outside memwatch's phases (which name their own) happened, by command
OUTSIDE_PHASES = {"evaluate": "evaluation", "plan": "plan's measurement",
                  "compress": "speed or generation", "sweep": "sweep"}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("DIPSVD_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(_joined_sizes(sys.argv[1:] if argv is None else argv))
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
        from .outputs.sweep import markdown

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
        from .refine.sequential import summary

        lines.append(f"  refine: {summary(report['refine'])}")
    return "\n".join(lines)
