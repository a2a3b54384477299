"""Benchmark of issue 35, item 5: the best path on a panel of texts that no calibration source contains.

    .venv/bin/python bench/bench_panel.py [--configs base,comp,mix,mix-comp,tune] [--ratios 0.2,0.3]
        [--calib 32x512] [--eval-tokens 4096] [--tune-epochs 4] [--out bench/panel.jsonl] [--write]

The panel (dipsvd_core.engine.data.PANEL): `python-docs` (CPython's reference manual: technical writing), `kjv` (narrative
books of the King James Bible: book prose; Debian's bible-kjv) and `fortunes` (Debian's fortunes: quotations, jokes
and dialogue), beside wiki and news. Each config is one build of the best path, dipsvd + nested (or refined-kl), at each ratio,
with one item of issue 35 switched on or off (CONFIGS): the calibration text (wiki-chat, the mix, or the mix with
the model's own text),
dense compensation (refine --compensate outputs), block tuning (refine block, AdamW; --tune-epochs on this CPU) and
the allocation scored after refinement (refined-kl, which refines uniform, heuristic and nested and keeps the one
closest to the original by KL on mixed held-out windows); `mix-comp-distill` is the default path distilled end to end
from the original afterwards (--distill-epochs 4, refine/distill.py; `mix-comp-distill8` for 8 epochs,
`mix-comp-all-distill` with every dense matrix compensated first, `mix-comp-all-tune-distill` tuned too,
`comp-distill` on the one source wiki-chat, `mix-comp-all-distill-own` one epoch on the calibration windows and 96
windows of the original's own text, --distill-own-text).
Each row: perplexity of the original and the compressed model on every text (the first --eval-tokens tokens of its
evaluation half, in windows of the calibration's length), the greedy generations of the default prompts (chat
template on, 48 new tokens) with their distinct-3-gram shares against the original's, and the build's seconds.
Rows go to --out as JSON lines as they finish (a rerun skips the rows already there); --write replaces the
"## Quality panel (issue 35)" section of bench/RESULTS.md from --out.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import BENCH, RESULTS, calib_size, load_bundled, machine, replace_section, utc_date, workbench

SECTION = "## Quality panel (issue 35)"
TEXTS = ("wiki", "news", "python-docs", "kjv", "fortunes")
PANEL = TEXTS[2:]  # the texts no calibration source contains (wiki and news are sources of the mix)
# name -> (calibration source, refine, compensate, allocation[, epochs of end-to-end distillation after the build[,
# windows of the model's own text it trains on besides]])
CONFIGS = {
    "base": ("wiki-chat", "sequential", "none", "nested"),
    "comp": ("wiki-chat", "sequential", "outputs", "nested"),
    "mix": ("mix", "sequential", "none", "nested"),
    "mix-comp": ("mix", "sequential", "outputs", "nested"),
    "mix-comp-all": ("mix", "sequential", "all", "nested"),  # item 2 on every dense matrix, q/k/v/gate/up too
    "tune": ("wiki-chat", "block", "none", "nested"),
    "mix-comp-tune": ("mix", "block", "outputs", "nested"),
    "mix-comp-all-tune": ("mix", "block", "all", "nested"),  # items 1 and 2 together, every dense matrix
    # the default path, then the whole model distilled from the original (refine/distill.py; --distill-epochs)
    "mix-comp-distill": ("mix", "sequential", "outputs", "nested", 4),
    "mix-comp-distill8": ("mix", "sequential", "outputs", "nested", 8),  # twice the epochs
    "comp-distill": ("wiki-chat", "sequential", "outputs", "nested", 4),  # one calibration source, distilled
    "mix-comp-all-distill": ("mix", "sequential", "all", "nested", 4),  # every dense matrix compensated, distilled
    "mix-comp-all-tune-distill": ("mix", "block", "all", "nested", 4),  # items 1 and 2, then distilled
    # distilled one epoch on the calibration windows and 96 of the original's own text: 4 epochs' steps
    "mix-comp-all-distill-own": ("mix", "sequential", "all", "nested", 1, 96),
    "mix-comp-kl": ("mix", "sequential", "outputs", "refined-kl"),  # item 4: the allocation scored after refinement
    # item 3's last source: the default mix and text the model writes itself (engine/self_text.py), a fifth of it
    "mix-self-comp": ("mix:wiki-chat=2,wiki=1,news=1,self=1", "sequential", "outputs", "nested"),
}
# The ablation: each item of issue 35 as (item, the config with it on, the same config with it off). A tuned row is
# compared at each of its epochs.
ABLATIONS = (  # the last one is no item of issue 35: the build distilled end to end from the original afterwards
    ("1. block tuning", "tune", "base"),
    ("1. block tuning", "mix-comp-tune", "mix-comp"),
    ("1. block tuning", "mix-comp-all-tune", "mix-comp-all"),
    ("2. dense compensation", "comp", "base"),
    ("2. dense compensation", "mix-comp", "mix"),
    ("2. every dense matrix compensated", "mix-comp-all", "mix-comp"),
    ("2. every dense matrix compensated", "mix-comp-all-tune", "mix-comp-tune"),
    ("3. mix calibration", "mix", "base"),
    ("3. mix calibration", "mix-comp", "comp"),
    ("3. the model's own text in the mix", "mix-self-comp", "mix-comp"),
    ("4. allocation scored after refinement", "mix-comp-kl", "mix-comp"),
    ("end-to-end distillation", "mix-comp-distill", "mix-comp"),
    ("end-to-end distillation", "mix-comp-distill8", "mix-comp"),
    ("end-to-end distillation", "comp-distill", "comp"),
    ("3. mix calibration", "mix-comp-distill", "comp-distill"),
    ("end-to-end distillation", "mix-comp-all-distill", "mix-comp-all"),
    ("2. every dense matrix compensated", "mix-comp-all-distill", "mix-comp-distill"),
    ("1. block tuning", "mix-comp-all-tune-distill", "mix-comp-all-distill"),
    ("end-to-end distillation", "mix-comp-all-tune-distill", "mix-comp-all-tune"),
    ("distillation on the model's own text", "mix-comp-all-distill-own", "mix-comp-all-distill"),
)


def _ppl(model, sets: dict) -> dict:
    from dipsvd_core.engine.evaluate import perplexity

    return {name: round(perplexity(model, windows), 3) for name, windows in sets.items()}


def _generations(model, tokenizer) -> list[dict]:
    from dipsvd_core.engine.evaluate import DEFAULT_PROMPTS, generate

    return [{"text": g["text"], "distinct_3": g["distinct_3"]}
            for g in generate(model, tokenizer, DEFAULT_PROMPTS, 48, chat=True)]


def run_config(lm, name: str, ratios: list[float], args, done: set, out: Path) -> None:
    from dipsvd_core.refine.choices import DistillConfig, TuneConfig
    from dipsvd_core.run.pipeline import Settings

    calib, refine, compensate, allocation, *distilled = CONFIGS[name]
    windows, seqlen = calib_size(args.calib)
    bench = workbench(lm, windows, seqlen, calib=calib)
    sets = {t: bench.eval_windows(t, args.eval_tokens) for t in TEXTS}
    if ("original", args.calib) not in done:
        row = {"config": "original", "calib": args.calib, "ppl": _ppl(lm.model, sets),
               "generations": _generations(lm.model, lm.tokenizer)}
        _append(out, row, done)
    tuned = refine == "block"
    options = tune_options(args) if tuned else {}  # a row names its tuning options that are not the defaults
    for ratio in ratios:
        if (name, ratio, args.calib, args.tune_epochs if tuned else None, tuple(sorted(options.items()))) in done:
            continue
        s = Settings(method="dipsvd", allocation=allocation, ratio=ratio, refine=refine, compensate=compensate,
                     tune=TuneConfig(epochs=args.tune_epochs, **options),
                     distill=DistillConfig(epochs=distilled[0] if distilled else 0,
                                           own_text=distilled[1] if len(distilled) > 1 else 0))
        t0 = time.perf_counter()
        built = bench.build(s)
        seconds = time.perf_counter() - t0
        row = {"config": name, "ratio": ratio, "calib": args.calib, "source": calib, "refine": refine,
               "allocation": built.allocation.method,
               "compensate": compensate, "tune_epochs": args.tune_epochs if tuned else None,
               **({"distill_epochs": distilled[0], "distill_held_kl": [round(k, 5) for k in
                                                                       built.info["distill"]["held_kl"]],
                   "distill_kept": built.info["distill"]["kept_epoch"],
                   "distill_own_text": built.info["distill"]["own_text"]} if distilled else {}),
               **({"tune_options": options} if options else {}),
               "ppl": _ppl(built.model, sets), "generations": _generations(built.model, lm.tokenizer),
               "build_s": round(seconds, 1), "timings_s": {k: round(v, 1) for k, v in built.timings_s.items()},
               "blocks": [(b["block"], b["choice"]) for b in built.info.get("refine", {}).get("blocks", [])]}
        del built
        _append(out, row, done)


def _append(out: Path, row: dict, done: set) -> None:
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    done.add(_key(row))
    print(json.dumps({k: v for k, v in row.items() if k != "generations"}), flush=True)


def _key(row: dict):
    """A row's identity: its config, ratio and calibration, and a tuned row's epochs (4 and 25 are two rows) and
    its tuning options that are not the defaults."""
    if row["config"] == "original":
        return ("original", row["calib"])
    return (row["config"], row["ratio"], row["calib"], row.get("tune_epochs"),
            tuple(sorted(row.get("tune_options", {}).items())))


def tune_options(args) -> dict:
    """The tuning options given on the command line that are not TuneConfig's defaults (lr, error, scope)."""
    from dipsvd_core.refine.choices import TuneConfig

    given = {"lr": args.tune_lr, "error": args.tune_error, "scope": args.tune_scope}
    return {k: v for k, v in given.items() if v is not None and v != getattr(TuneConfig, k)}


def _rows(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in out.read_text().splitlines() if ln.strip()] if out.exists() else []


def markdown(rows: list[dict], command: str) -> str:
    lines = [SECTION, "",
             f"Machine: {machine()}. Date: {utc_date()}. Command: `{command}` (rows in bench/panel.jsonl). dipsvd + "
             "the allocation of each row on the bundled SmolLM2-135M; every text evaluated on the first tokens of its evaluation half "
             "(none of the panel is in any calibration source; wiki's and news's calibration halves are not their "
             "evaluation halves). Each cell: the compressed model's perplexity as a multiple of the original's on "
             "the same windows; d3: the default prompts' distinct-3-gram shares as a multiple of the original's (the "
             "lowest of the three); build s: statistics to surgery, with the caches of earlier rows of the same "
             "calibration text reused."]
    for calib in dict.fromkeys(r["calib"] for r in rows):
        lines += ["", *_table([r for r in rows if r["calib"] == calib], calib)]
        ablation = _ablation([r for r in rows if r["calib"] == calib], calib)
        lines += ["", *ablation] if len(ablation) > 4 else []
    return "\n".join(lines) + "\n"


def _ablation(rows: list[dict], calib: str) -> list[str]:
    """Each item on against off (ABLATIONS), at every ratio where both rows exist: the change of each text's
    perplexity, how many panel texts it makes worse, the lowest distinct-3-gram share and the build seconds. A text
    the item makes worse is in bold. An off row that is tuned is the one tuned alike (epochs and options)."""
    by_key = {_key(r): r for r in rows}
    original = next(r for r in rows if r["config"] == "original")
    base_d3 = [g["distinct_3"] for g in original["generations"]]
    lines = [f"Ablation at {calib}: each item on against the same path with it off (change of perplexity; a text it "
             "makes worse in bold; d3 min and refine s: off -> on; refine s: the refine pass and any search by refined "
             "candidates, the part of a build that does not depend on which earlier rows filled the caches):", "",
             "| item | on | off | ratio | " + " | ".join(TEXTS) + " | panel texts worse | d3 min | refine s |",
             "|---|---|---|---|" + "---|" * (len(TEXTS) + 3)]
    for item, on, off in ABLATIONS:
        for r in sorted((r for r in rows if r["config"] == on), key=lambda r: _key(r)[1:]):
            base = by_key.get(_key({**r, "config": off}) if CONFIGS[off][1] == "block"  # a tuned off: same tuning
                              else (off, r["ratio"], r["calib"], None, ()))
            if base is None:
                continue
            change = [round(r["ppl"][t] / base["ppl"][t] - 1, 3) for t in TEXTS]  # as shown: worse is above +0.0%
            cells = [f"**{c:+.1%}**" if c > 0 else f"{c:+.1%}" for c in change]
            label = on + _tuning(r)
            lines.append(f"| {item} | {label} | {off} | {r['ratio']} | " + " | ".join(cells)
                         + f" | {sum(c > 0 for c, t in zip(change, TEXTS) if t in PANEL)} | "
                         f"{_d3_min(base, base_d3):.2f} -> "
                         f"{_d3_min(r, base_d3):.2f} | {_own_s(base):.0f} -> {_own_s(r):.0f} |")
    return lines


def _own_s(row: dict) -> float:
    """A row's refine seconds, its search's (refined-kl) and its distillation's: what its items cost whatever the
    caches held."""
    return sum(row["timings_s"].get(step, 0) for step in ("refine", "search", "distill"))


def _tuning(row: dict) -> str:
    """A tuned row's epochs, and its options that are not the defaults: " (25 epochs, error relative)"."""
    if not row.get("tune_epochs"):
        return ""
    return f" ({row['tune_epochs']} epochs" + "".join(f", {k} {v:g}" if isinstance(v, float) else f", {k} {v}"
                                                      for k, v in row.get("tune_options", {}).items()) + ")"


def _d3_min(row: dict, base_d3: list[float]) -> float:
    """The lowest of the default prompts' distinct-3-gram shares as a multiple of the original's."""
    return min(g["distinct_3"] / b if b else 1.0 for g, b in zip(row["generations"], base_d3))


def _distilled(row: dict) -> str:
    """A distilled row's epochs, and the windows of the model's own text it trained on besides: " + distilled 1
    epoch (+ 96 own)"."""
    epochs, own = row.get("distill_epochs"), row.get("distill_own_text")
    if not epochs:
        return ""
    return f" + distilled {epochs} epoch{'s' if epochs != 1 else ''}" + (f" (+ {own} own)" if own else "")


def _table(rows: list[dict], calib: str) -> list[str]:
    original = next(r for r in rows if r["config"] == "original")
    base_d3 = [g["distinct_3"] for g in original["generations"]]
    lines = [f"Calibration {calib} (windows x tokens):", "",
             "| config | ratio | calibration | allocation | refine | compensate | " + " | ".join(TEXTS)
             + " | worst | d3 min | build s |",
             "|---|---|---|---|---|---|" + "---|" * (len(TEXTS) + 3),
             "| original | | | | | | " + " | ".join(f"{original['ppl'][t]:.2f}" for t in TEXTS) + " | | | |"]
    for r in sorted((r for r in rows if r["config"] != "original"), key=lambda r: (r["ratio"], r["config"])):
        mult = [r["ppl"][t] / original["ppl"][t] for t in TEXTS]
        d3 = _d3_min(r, base_d3)
        refine = r["refine"] + _tuning(r) + _distilled(r)
        lines.append(f"| {r['config']} | {r['ratio']} | {r['source']} | {r.get('allocation', 'nested')} | {refine} | "
                     f"{r['compensate']} | "
                     + " | ".join(f"{m:.2f}x" for m in mult) + f" | {max(mult):.2f}x | {d3:.2f} | {r['build_s']:.0f} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--ratios", default="0.2,0.3")
    p.add_argument("--calib", default="32x512")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--tune-epochs", type=int, default=4)
    p.add_argument("--tune-lr", type=float, default=None, help="block tuning's peak learning rate (default: "
                   "TuneConfig's)")
    p.add_argument("--tune-error", default=None, help="block tuning's error, absolute or relative (default: "
                   "TuneConfig's)")
    p.add_argument("--tune-scope", default=None, help="what block tuning trains, factors or block (default: "
                   "TuneConfig's)")
    p.add_argument("--out", default=str(BENCH / "panel.jsonl"))
    p.add_argument("--write", action="store_true")
    p.add_argument("--from-out", action="store_true", help="only write the section from --out")
    args = p.parse_args()
    out = Path(args.out)
    if not args.from_out:
        from dipsvd_core.common import cores

        lm = load_bundled("cpu", "float32")
        done = {_key(r) for r in _rows(out)}
        with cores.job():  # one compute job of the machine: a test run beside it takes its share, not more
            for name in args.configs.split(","):
                run_config(lm, name, [float(x) for x in args.ratios.split(",")], args, done, out)
    if args.write:
        options = "".join(f" --tune-{k} {v}" for k, v in tune_options(args).items())
        command = (".venv/bin/python bench/bench_panel.py --configs " + args.configs + f" --ratios {args.ratios} "
                   f"--calib {args.calib} --eval-tokens {args.eval_tokens} --tune-epochs {args.tune_epochs}{options} "
                   "--write")
        replace_section(RESULTS, SECTION, markdown(_rows(out), command), keep_from="### ")


if __name__ == "__main__":
    main()
