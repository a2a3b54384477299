"""Zero-shot accuracy through lm-evaluation-harness (`evaluate --tasks`), on the in-memory model.

`lm_eval.simple_evaluate` runs on the model through lm-eval's HF wrapper (HFLM wraps the module and tokenizer we
already hold: nothing is loaded twice). Online users name hub tasks (arc_easy, hellaswag, ...). Offline, and in the
tests, the task `dipsvd_wiki_cloze` is defined here over text the project ships: each document is the opening of a
sentence from the held-out wiki articles (DESIGN.md section 6), and the choices are its true next words and the
next words of three other sentences; lm-eval scores each choice by its log-likelihood after the context. Its task
yaml and data are written to the user cache folder, and lm-eval reads them as a local json dataset.
Each task's accuracy is reported with its standard error (lm-eval's acc and acc_stderr).
"""
from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

from .errors import DipSVDError

LOCAL_TASK = "dipsvd_wiki_cloze"
CONTEXT_WORDS, CHOICE_WORDS, DOCS = 24, 6, 200
YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def cloze_documents(n: int = DOCS, seed: int = 0) -> list[dict]:
    """`n` four-way choices over held-out wiki sentences: the true continuation at a random place among three
    continuations of other sentences."""
    from .data import load_documents

    words = [re.findall(r"\S+", s) for doc in load_documents("wiki", "eval") for s in re.split(r"(?<=[.!?])\s+", doc)]
    spans = [w for w in words if len(w) >= CONTEXT_WORDS + CHOICE_WORDS]
    if len(spans) < n + 3:
        raise DipSVDError(f"only {len(spans)} sentences long enough for {LOCAL_TASK}; need {n + 3}")
    rng = random.Random(seed)
    docs = []
    for i, w in enumerate(spans[:n]):
        others = rng.sample([s for j, s in enumerate(spans) if j != i], 3)
        choices = [" " + " ".join(o[CONTEXT_WORDS: CONTEXT_WORDS + CHOICE_WORDS]) for o in others]
        label = rng.randrange(4)
        choices.insert(label, " " + " ".join(w[CONTEXT_WORDS: CONTEXT_WORDS + CHOICE_WORDS]))
        docs.append({"context": " ".join(w[:CONTEXT_WORDS]), "choices": choices, "label": label})
    return docs


def local_task_dir() -> Path:
    """The folder holding the local task's yaml and data (written once, in the user cache)."""
    from .cache import cache_dir

    folder = cache_dir() / "lm_eval_tasks"
    data = folder / f"{LOCAL_TASK}.jsonl"
    if not data.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = data.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(d) + "\n" for d in cloze_documents()))
        os.replace(tmp, data)
    (folder / f"{LOCAL_TASK}.yaml").write_text(YAML.format(task=LOCAL_TASK, data=json.dumps(str(data))))
    return folder


def lm_eval_accuracy(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 8) -> dict:
    """task -> {"acc", "acc_stderr", "n"} of `model` (lm-eval's zero-shot accuracy)."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise DipSVDError(f"--tasks needs lm-evaluation-harness ({e}); `pip install lm-eval`") from e
    if set(tasks) <= {LOCAL_TASK}:  # local json only: the datasets library need not look for the hub
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    manager = TaskManager(include_path=str(local_task_dir()))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise DipSVDError(f"unknown lm-eval task(s) {', '.join(unknown)}; offline, use {LOCAL_TASK}")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=0,
                          log_samples=False)  # acc: a mean, its standard error in closed form
    results = {}
    for task in tasks:
        r = out["results"][task]
        results[task] = {"acc": float(r["acc,none"]), "acc_stderr": float(r.get("acc_stderr,none") or 0.0),
                         "n": int(out.get("n-samples", {}).get(task, {}).get("effective", limit or 0))}
    return results
