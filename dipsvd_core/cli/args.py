"""The command line's parser: its flags (Settings fields declared once, knobs.knob), their types with one-line
errors, and the progress bars on stderr."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from ..common.errors import DipSVDError
from ..engine.data import DEFAULT_CALIB, DEFAULT_SEQLEN, DEFAULT_WINDOWS, SOURCES


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
    from ..plan import memory_size

    try:
        return memory_size(text)
    except DipSVDError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


SIZE_OPTIONS = {  # the memory budgets, each a size (_memory_size; joined_sizes lets a negative one reach it)
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


def _add_calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default=DEFAULT_CALIB, help=f"calibration text: {', '.join(SOURCES)} or a .txt/.jsonl "
                   f"path (default {DEFAULT_CALIB}: wiki-chat 2, wiki 1, news 1 by windows)")
    p.add_argument("--calib-windows", type=_positive_int, default=DEFAULT_WINDOWS)
    p.add_argument("--seqlen", type=_positive_int, default=DEFAULT_SEQLEN)
    p.add_argument("--seed", type=int, default=0)


KINDS = {"positive": _positive_int, "ratio": _ratio, "float": float, "int": int, "str": str}
# the Settings fields every compressing subcommand takes (compress and plan add method, allocation and ratio);
# "options": every registered method's own options (common/options.py), a flag group each
SHARED = ("p_min", "p_max", "refine", "compute_dtype", "factor_dtype", "beta", "tau", "energy", "rank_of",
          "bo_calls", "bo_objective", "bo_windows", "compensate", "options")
RUN_SETTINGS = ("method", "allocation", "ratio", *SHARED)  # compress and plan: one run's settings


def _add_flag(p, f, dest: str, default=dataclasses.MISSING, flag: str | None = None) -> None:
    """One flag from a knob (knobs.py): its flag, default, help, type and choices come from the field."""
    meta = f.metadata
    text = meta.get("help", "").replace("%", "%%")
    if default is dataclasses.MISSING:
        default = f.default
    elif default != f.default:  # a subcommand's own default replaces the knob's "(default: ...)"
        text = text.split(" (default:")[0] + f" (default here: {default})"
    flag = flag or meta.get("flag") or "--" + f.name.replace("_", "-")
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


def _add_options(p) -> None:
    """A flag group per registered method's options (common/options.py), each flag from its knob; dest
    <group>.<field>."""
    from ..common.knobs import knobs_in_order
    from ..common.options import OPTION_GROUPS, flag_of

    for name, g in OPTION_GROUPS.items():
        group = p.add_argument_group(g.title)
        for f in knobs_in_order(g.cls):
            if f.metadata.get("cli", True):
                _add_flag(group, f, f"{name}.{f.name}", flag=flag_of(name, f))


def _add_settings(p, names, **defaults) -> None:
    """Flags for these Settings fields ("options": every method's own, a group each), with other defaults where
    given (the sweep's --refine is none: its grid names the refined rows)."""
    from ..methods.settings import Settings

    for f in dataclasses.fields(Settings):
        if f.name not in names or not f.metadata.get("cli", True):
            continue
        if f.name == "options":
            _add_options(p)
        else:
            _add_flag(p, f, f.name, defaults.get(f.name, dataclasses.MISSING))


def settings_from(args, **over):
    """The Settings of these flags: every Settings field a flag sets, and each method's options from theirs
    (<group>.<field>)."""
    from ..common.options import OPTION_GROUPS
    from ..methods.settings import Settings

    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings) if hasattr(args, f.name)}
    for name, g in OPTION_GROUPS.items():
        given = {f.name: getattr(args, f"{name}.{f.name}") for f in dataclasses.fields(g.cls)
                 if hasattr(args, f"{name}.{f.name}")}
        if given:
            fields[name] = g.cls(**given)
    fields.update(over)
    if "method" in over:
        _check_foreign_options(fields, over["method"])
    return Settings(**fields).check()


def _check_foreign_options(fields: dict, method: str) -> None:
    """A flag of another method's own options (--remap with --method svd-llm) would do nothing: say so."""
    from ..common.options import OPTION_GROUPS, flag_of
    from ..methods.handlers import method_names

    for name in [n for n in OPTION_GROUPS if n in fields and n in method_names() and n != method]:
        cls = OPTION_GROUPS[name].cls
        default = cls()
        changed = [flag_of(name, f) for f in dataclasses.fields(cls)
                   if getattr(fields[name], f.name) != getattr(default, f.name)]
        if changed:
            raise DipSVDError(f"{', '.join(changed)} {'is an option' if len(changed) == 1 else 'are options'} of "
                              f"{name}; use it with method {name}, not {method}")


def _add_compress(sub) -> None:
    c = sub.add_parser("compress", help="compress a model, evaluate it, optionally save it")
    _add_model_args(c)
    _add_settings(c, RUN_SETTINGS)
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
    _add_settings(w, SHARED, refine="none")  # a row is refined where its grid name says so (method:allocation+refine)
    _add_calib_args(w)
    w.add_argument("--eval", default="wiki,news", help="comma-separated evaluation sets")
    w.add_argument("--eval-tokens", type=_positive_int, default=16384, help="tokens per evaluation set")
    w.add_argument("--out-json", default="sweep.json", help="the JSON report (rewritten after every row)")
    w.add_argument("--out-md", default="sweep.md", help="the Markdown table")
    w.add_argument("--quiet", action="store_true")

    pl = sub.add_parser("plan", help="predicted memory, disk and time of each phase, from the config alone")
    _add_model_args(pl)
    _add_settings(pl, RUN_SETTINGS)  # compress's: the plan is of the same run
    pl.add_argument("--calib", default=DEFAULT_CALIB, help="calibration text (what counts: whether the model writes "
                    "some of it, the self source, which adds the writing phase)")
    pl.add_argument("--calib-windows", type=_positive_int, default=DEFAULT_WINDOWS)
    pl.add_argument("--seqlen", type=_positive_int, default=DEFAULT_SEQLEN)
    pl.add_argument("--eval-tokens", type=_positive_int, default=16384, help="tokens per evaluation set")
    pl.add_argument("--eval", default="wiki,news", help="comma-separated evaluation sets (only their number counts)")
    pl.add_argument("--no-eval-original", action="store_true", help="plan without the original's perplexity")
    pl.add_argument("--offload", action="store_true", help="weights on the host, one block at a time on the GPU")
    _add_budget_args(pl)
    pl.add_argument("--no-bench", action="store_true", help="memory only: skip the few-second microbenchmark")
    pl.add_argument("--measure-rates", action="store_true",
                    help="first time the eigendecompositions at this model's widths on the device (minutes for 8B "
                         "widths) and store them in the cache for this device; later plans read their times from them")
    pl.add_argument("--json", action="store_true", help="print one JSON object")

    e = sub.add_parser("evaluate", help="perplexity of any model, including a saved compressed one")
    _add_model_args(e)
    e.add_argument("--seqlen", type=_positive_int, default=DEFAULT_SEQLEN)
    _add_speed_args(e)
    _add_eval_args(e)
    _add_task_args(e)
    return parser


def joined_sizes(argv: list[str]) -> list[str]:
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
