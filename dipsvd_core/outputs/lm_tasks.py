"""Zero-shot accuracy through lm-evaluation-harness (`evaluate --tasks`), on the in-memory model.

`lm_eval.simple_evaluate` runs on the model through lm-eval's HF wrapper (HFLM wraps the module and tokenizer we
already hold: nothing is loaded twice). Online users name hub tasks (arc_easy, hellaswag, ...). Offline, and in the
tests, the task `dipsvd_wiki_cloze` is defined here over text the project ships: each document is the opening of a
sentence from the held-out wiki articles (docs/DESIGN.md section 6), and the choices are its true next words and the
next words of three other sentences; lm-eval scores each choice by its log-likelihood after the context. Its task
yaml and data are written to the user cache folder, and lm-eval reads them as a local json dataset;
`python -m dipsvd_core.outputs.lm_tasks` writes them and prints the folder, for lm-eval's own command line
(`lm_eval --include_path "$(python -m dipsvd_core.outputs.lm_tasks)" --tasks dipsvd_wiki_cloze ...`).
`check_tasks` runs before any model loads: an unknown task, or offline a hub task whose data is not in the local
cache, is refused in one line naming the local task. The datasets library reads HF_DATASETS_OFFLINE once, when it
is imported, so a local-only or offline evaluation sets its flag itself, for that evaluation only.
Each task's accuracy is reported with its standard error (lm-eval's acc and acc_stderr; None where lm-eval has
none, as for a single document).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import re
from pathlib import Path

from ..common.errors import DipSVDError

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
    from ..engine.data import load_documents

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
    from ..common.cache import cache_dir

    folder = cache_dir() / "lm_eval_tasks"
    data = folder / f"{LOCAL_TASK}.jsonl"
    if not data.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = data.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(d) + "\n" for d in cloze_documents()))
        os.replace(tmp, data)
    (folder / f"{LOCAL_TASK}.yaml").write_text(YAML.format(task=LOCAL_TASK, data=json.dumps(str(data))))
    return folder


@functools.lru_cache(maxsize=4)
def _manager(include_path: str, defaults: bool):
    """lm-eval's task index with the local task: with lm-eval's own 14,000-odd tasks (defaults) about 10 s to build,
    once per process; the local task alone, milliseconds."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=defaults)


def task_manager(tasks: list[str] | None = None):
    """The index the tasks need: the local task's alone where they name only it, else lm-eval's whole index."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise DipSVDError(f"--tasks needs lm-evaluation-harness ({e}); `pip install lm-eval`") from e
    return _manager(str(local_task_dir()), tasks is None or any(t != LOCAL_TASK for t in tasks))


def _dataset_paths(manager, name: str, depth: int = 0) -> set:
    """The datasets a task, group or tag reads (None where its config does not say: a Python task)."""
    entry = manager.task_index.get(name)
    cfg = (entry.cfg or {}) if entry is not None else {}
    if cfg.get("dataset_path"):
        return {cfg["dataset_path"]}
    subtasks = [t for t in cfg.get("task", []) if isinstance(t, str)] if isinstance(cfg.get("task"), list) else []
    subtasks += [n for n, e in manager.task_index.items() if name in (e.tags or ())]
    if not subtasks or depth > 4:
        return {None}
    return set().union(*(_dataset_paths(manager, t, depth + 1) for t in subtasks))


def _cached(dataset_path: str | None) -> bool:
    """Whether a dataset can be read without the hub: a local builder's files, or the hub's in a local cache."""
    import datasets.config as dc
    from huggingface_hub import constants

    if dataset_path is None:
        return False
    if "/" not in dataset_path and dataset_path in ("json", "csv", "text", "parquet", "arrow"):
        return True
    return (Path(constants.HF_HUB_CACHE, "datasets--" + dataset_path.replace("/", "--")).is_dir()
            or Path(dc.HF_DATASETS_CACHE, dataset_path.replace("/", "___")).is_dir())


def check_tasks(tasks: list[str]) -> bool:
    """Before any model loads: every task is known and, offline, has its data locally. Returns whether the
    evaluation runs offline (the hub unreachable, or only local data)."""
    from ..model.models import hub_reachable

    manager = task_manager(tasks)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise DipSVDError(f"unknown lm-eval task(s) {', '.join(unknown)}; offline, use {LOCAL_TASK}")
    paths = {t: _dataset_paths(manager, t) for t in tasks}
    if all(_cached(p) and "/" not in p for ps in paths.values() for p in ps):
        return True  # local files only
    if hub_reachable():
        return False
    missing = [t for t, ps in paths.items() if not all(_cached(p) for p in ps)]
    if missing:
        raise DipSVDError(f"lm-eval task(s) {', '.join(missing)} need the Hugging Face datasets hub, which is "
                          f"unreachable (offline), and their data is not in the local cache; use {LOCAL_TASK}, the "
                          "local task over the bundled wiki text, or run once online")
    return True


@contextlib.contextmanager
def datasets_offline(offline: bool):
    """datasets' offline flag for one evaluation: it read HF_DATASETS_OFFLINE when it was imported, so setting the
    variable now would change nothing; its config is set instead, and restored after."""
    import datasets.config as dc

    old = dc.HF_HUB_OFFLINE, dc.HF_DATASETS_OFFLINE
    if offline:
        dc.HF_HUB_OFFLINE = dc.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        dc.HF_HUB_OFFLINE, dc.HF_DATASETS_OFFLINE = old


def _stderr(value) -> float | None:
    """lm-eval's standard error, or None where it has none ("N/A" for a single document)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def lm_eval_accuracy(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 8) -> dict:
    """task -> {"acc", "acc_stderr", "n"} of `model` (lm-eval's zero-shot accuracy)."""
    offline = check_tasks(tasks)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with datasets_offline(offline):
        out = simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager(tasks), limit=limit, num_fewshot=0,
                              log_samples=False)  # acc: a mean, its standard error in closed form
    results = {}
    for task in tasks:
        r = out["results"][task]
        results[task] = {"acc": float(r["acc,none"]), "acc_stderr": _stderr(r.get("acc_stderr,none")),
                         "n": int(out.get("n-samples", {}).get(task, {}).get("effective", limit or 0))}
    return results


if __name__ == "__main__":  # the folder to give lm_eval's --include_path
    print(local_task_dir())
