"""The command line's commands: plan, compress, evaluate and sweep, each from parsed flags to a report."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..common.errors import DipSVDError
from .args import Progress, settings_from


def _tasks(args, model, tokenizer) -> dict:
    from ..outputs.lm_tasks import lm_eval_accuracy

    return lm_eval_accuracy(model, tokenizer, args.tasks, args.task_limit)


def _check_tasks(args) -> None:
    """Before anything loads: the tasks are known and, offline, have their data (lm_tasks.check_tasks)."""
    if args.tasks:
        from ..outputs.lm_tasks import check_tasks

        check_tasks(args.tasks)


def _eval_sets(lm, spec: str, seqlen: int, max_tokens: int):
    from ..engine.data import evaluation_windows

    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise DipSVDError("--eval names no dataset; give e.g. wiki,news")
    return {n: evaluation_windows(lm.tokenizer, n, seqlen, max_tokens) for n in names}


def _perplexities(model, sets, progress) -> dict:
    from ..engine.evaluate import perplexity

    return {name: perplexity(model, w, progress=progress) for name, w in sets.items()}


def _run_of(args):
    """The plan's Run: the settings these flags give, and how the run is carried out."""
    from ..plan import Run

    settings = settings_from(args, method=args.method, ratio=args.ratio)  # allocation, refine: the method's own
    return Run(settings, calib=getattr(args, "calib", Run.calib), calib_windows=args.calib_windows,
               seqlen=args.seqlen, eval_tokens=args.eval_tokens,
               eval_sets=len([s for s in args.eval.split(",") if s.strip()]),
               eval_original=not args.no_eval_original, dtype=args.dtype, offload=getattr(args, "offload", False),
               save=bool(getattr(args, "out", None)), inplace=not settings.distill.epochs)


def cmd_plan(args):
    from ..plan import make_plan, plan_json

    if args.measure_rates and args.no_bench:
        raise DipSVDError("--measure-rates times the device, and --no-bench skips the timing; drop one of them")
    plan = make_plan(args.model, args.device, _run_of(args), bench=not args.no_bench,
                     trust_remote_code=args.trust_remote_code, budgets=_budgets(args), measure_rates=args.measure_rates)
    return plan_json(plan) if args.json else plan.table()


def _budgets(args) -> dict:
    return {"device": args.device_memory, "host": args.host_memory}


def _check_plan(args) -> tuple[dict | None, object]:
    """The plan's memory figures for this compress run, and where an offloaded run keeps its blocks (plan.Placement,
    from the memory budgets; None otherwise); refuses up front when they do not fit (run.session.checked_plan)."""
    from ..run.session import checked_plan

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
    from ..run.session import dense_folder

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
    from ..run.session import save_run

    report.update(save_run(model, args.out, tokenizer, report, force=args.force, dense=args.export == "dense"))


def _speed_and_generations(args, model, tokenizer) -> dict:
    """One model's speed (--speed) and generations (--generate), eager or compiled (--compile; by default compiled
    on CUDA only), with the seconds the generations took; compiled code is forgotten afterwards, so that a model
    converted in place (or the next one) compiles afresh and nothing holds the old weights."""
    from ..engine.evaluate import DEFAULT_PROMPTS, generate
    from ..engine.speed import compile_default, forget_compiled, speed
    from ..model.models import input_device

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
    from ..engine.speed import bytes_bound

    if "speed" in compressed:
        report["speed"] = {"original": original["speed"],
                           "compressed": dict(compressed["speed"], bytes_bound=bytes_bound(original["speed"],
                                                                                           compressed["speed"]))}
    if "generations" in compressed:
        report["generations"] = {"original": original["generations"], "compressed": compressed["generations"]}
        timings["generation"] = original["generation_s"] + compressed["generation_s"]


def cmd_compress(args) -> dict:
    from ..allocation.budget import param_report
    from ..engine.memwatch import PhaseMemory, lifetime_device_peak
    from ..io.report import compression_report
    from ..model.models import count_params
    from ..run.loading import load_model
    from ..run.pipeline import Workbench, peak_memory_mb

    settings = settings_from(args, method=args.method, ratio=args.ratio)  # allocation, refine: the method's own
    _check_paths(args)
    t0 = time.perf_counter()
    plan, blocks = _check_plan(args)
    timings = {"plan": time.perf_counter() - t0}  # the config alone; a GGUF's is parsed whole (seconds)
    progress, memory = Progress(args.quiet), PhaseMemory()
    t0 = time.perf_counter()
    with memory.phase("load"):
        lm = load_model(args.model, args.device, args.dtype, args.trust_remote_code, progress, args.offload, blocks=blocks)
    timings["load_model"] = time.perf_counter() - t0
    bench = Workbench(lm, args.calib, args.calib_windows, args.seqlen, args.seed, memory=memory)
    t0 = time.perf_counter()
    with memory.phase("load"):  # the calibration text too: tokenizing its source is a peak no other phase measures
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
    # distillation needs the original as its teacher: that build keeps it
    result = bench.build(settings, progress=progress, inplace=not settings.distill.epochs)
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
        from ..outputs.html_report import report_figures, write_html

        report["html"] = str(write_html(args.html, report, report_figures(bench, result)))
    return report


def cmd_evaluate(args) -> dict:
    from ..model.models import count_params
    from ..run.loading import load_model
    from ..run.pipeline import peak_memory_mb

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
    from ..run.loading import load_model

    side = "compressed" if entry else "model"
    out = {side: _tasks(args, lm.model, lm.tokenizer)}
    if entry and entry.get("model"):
        del lm.model
        original = load_model(entry["model"], args.device, args.dtype, args.trust_remote_code)
        out = {"original": _tasks(args, original.model, original.tokenizer), **out}
    return out


def cmd_sweep(args) -> dict:
    from ..outputs.sweep import markdown, parse_grid, parse_ratios, run_sweep
    from ..run.loading import load_model
    from ..run.pipeline import Workbench, peak_memory_mb

    grid, ratios = parse_grid(args.grid), parse_ratios(args.ratios)
    base = settings_from(args, ratio=ratios[0])
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
