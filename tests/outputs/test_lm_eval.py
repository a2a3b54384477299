"""evaluate --tasks: lm-evaluation-harness's zero-shot accuracy with its standard error, the original's and the
compressed model's side by side, on the local task built from the bundled wiki text."""
from __future__ import annotations

import json
import math
import re

import pytest

from dipsvd_core.io.compressed import save_compressed
from dipsvd_core.outputs.lm_tasks import CHOICE_WORDS, CONTEXT_WORDS, cloze_documents
from dipsvd_core.run.pipeline import Settings, Workbench
from tests.cli.test_cli import error_line, run, run_here


def test_the_local_task_is_four_way_choices_over_held_out_sentences():
    docs = cloze_documents(50)
    assert len(docs) == 50
    for d in docs:
        assert len(d["choices"]) == 4 and 0 <= d["label"] < 4 and len(set(d["choices"])) == 4
        assert len(d["context"].split()) == CONTEXT_WORDS
        assert all(len(c.split()) == CHOICE_WORDS and c.startswith(" ") for c in d["choices"])
    assert docs == cloze_documents(50)  # the same documents every time
    labels = [d["label"] for d in docs]
    assert len(set(labels)) == 4  # the true continuation is not always in one place
    from dipsvd_core.engine.data import load_documents

    text = " ".join(" ".join(re.findall(r"\S+", doc)) for doc in load_documents("wiki", "eval"))
    first = docs[0]
    assert first["context"] + first["choices"][first["label"]] in text  # the true next words of that sentence


def test_evaluate_tasks_reports_original_and_compressed(tiny_lm, tiny_model_dir, tmp_path):
    res = Workbench(tiny_lm, "wiki", 4, 64).build(Settings(method="svd", ratio=0.5))
    out = save_compressed(res.model, tmp_path / "c", tiny_lm.tokenizer, {"method": "svd", "model": str(tiny_model_dir)})
    report = tmp_path / "r.json"
    proc = run("evaluate", "--model", str(out), "--tasks", "dipsvd_wiki_cloze", "--task-limit", "20", "--eval", "wiki",
               "--eval-tokens", "256", "--seqlen", "64", "--report", str(report), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(report.read_text())["lm_eval"]
    assert set(r) == {"original", "compressed"}
    for side in r.values():
        t = side["dipsvd_wiki_cloze"]
        assert t["n"] == 20 and 0 <= t["acc"] <= 1 and (t["acc"] * 20) == round(t["acc"] * 20)
        assert math.isclose(t["acc_stderr"], math.sqrt(t["acc"] * (1 - t["acc"]) / 19), rel_tol=1e-9)
    assert "lm-eval compressed: dipsvd_wiki_cloze" in proc.stdout


def test_an_unknown_task_is_one_line(tiny_model_dir, capsys):
    proc = run_here(capsys, "evaluate", "--model", str(tiny_model_dir), "--tasks", "no_such_task", "--eval-tokens", "256",
               "--seqlen", "64", "--quiet")
    assert proc.returncode == 2 and "unknown lm-eval task(s) no_such_task" in error_line(proc)
    assert "Traceback" not in proc.stderr


def test_an_unknown_task_is_refused_before_the_model_loads(tmp_path, capsys):
    proc = run_here(capsys, "compress", "--model", str(tmp_path / "not-there"), "--tasks", "no_such_task", "--quiet")
    assert proc.returncode == 2 and "unknown lm-eval task(s) no_such_task" in error_line(proc)


def test_a_hub_task_offline_is_one_line_before_the_model_loads(tmp_path, monkeypatch):
    # an empty hub and datasets cache, offline; the model path does not exist, so any load would fail first
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    for command in ("evaluate", "compress"):
        proc = run(command, "--model", str(tmp_path / "not-there"), "--tasks", "arc_easy", "--quiet")
        line = error_line(proc)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert "arc_easy" in line and "offline" in line and "use dipsvd_wiki_cloze" in line
        assert "not-there" not in line


def test_a_one_document_limit_gives_a_result(tiny_lm):
    from dipsvd_core.cli import _accuracy_words
    from dipsvd_core.outputs.lm_tasks import LOCAL_TASK, lm_eval_accuracy

    r = lm_eval_accuracy(tiny_lm.model, tiny_lm.tokenizer, [LOCAL_TASK], limit=1)[LOCAL_TASK]
    assert r["n"] == 1 and r["acc"] in (0.0, 1.0) and r["acc_stderr"] is None  # lm-eval's "N/A"
    assert _accuracy_words(LOCAL_TASK, r) == f"{LOCAL_TASK} {r['acc']:.3f} ± n/a (n=1)"


def test_the_local_task_alone_skips_lm_evals_whole_index():
    """Only the local task named: lm-eval's index of its own 14,000-odd tasks (about 10 s to build) is not built."""
    import time

    from dipsvd_core.outputs.lm_tasks import LOCAL_TASK, task_manager

    t0 = time.perf_counter()
    assert list(task_manager([LOCAL_TASK]).all_tasks) == [LOCAL_TASK]
    assert time.perf_counter() - t0 < 5


def test_lm_eval_command_line_scores_a_saved_folder(tiny_lm, tmp_path):
    """The README's shell command, through lm-eval's own entry point, on a folder it loads with trust_remote_code:
    the same accuracy as the project's own loader through lm_eval_accuracy."""
    import subprocess
    import sys
    from pathlib import Path

    from dipsvd_core.io.compressed import load_compressed
    from dipsvd_core.outputs.lm_tasks import LOCAL_TASK, lm_eval_accuracy

    res = Workbench(tiny_lm, "wiki", 4, 64).build(Settings(method="svd-llm", ratio=0.3))
    out = save_compressed(res.model, tmp_path / "c", tiny_lm.tokenizer, {"method": "svd-llm"})
    tasks = subprocess.run([sys.executable, "-m", "dipsvd_core.outputs.lm_tasks"], capture_output=True, text=True, check=True)
    include = tasks.stdout.strip()
    assert (Path(include) / f"{LOCAL_TASK}.yaml").is_file()
    env = dict(__import__("os").environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([str(Path(sys.executable).parent / "lm_eval"), "--model", "hf", "--model_args",
                           f"pretrained={out},trust_remote_code=True,dtype=float32", "--include_path", include,
                           "--tasks", LOCAL_TASK, "--limit", "8", "--batch_size", "8", "--output_path",
                           str(tmp_path / "results")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = (tmp_path / "results").rglob("results_*.json")
    shell = json.loads(results.read_text())["results"][LOCAL_TASK]
    ours = lm_eval_accuracy(load_compressed(out).model, tiny_lm.tokenizer, [LOCAL_TASK], limit=8)[LOCAL_TASK]
    assert shell["acc,none"] == ours["acc"] and shell["acc_stderr,none"] == pytest.approx(ours["acc_stderr"])
    assert json.loads(results.read_text())["n-samples"][LOCAL_TASK]["effective"] == 8


def test_the_local_task_runs_with_datasets_offline_though_datasets_was_imported_first():
    import datasets.config as dc

    from dipsvd_core.outputs.lm_tasks import LOCAL_TASK, check_tasks, datasets_offline

    before = dc.HF_HUB_OFFLINE
    assert check_tasks([LOCAL_TASK]) is True  # local files only: offline whatever the network
    with datasets_offline(True):
        assert dc.HF_HUB_OFFLINE is True and dc.HF_DATASETS_OFFLINE is True
    assert dc.HF_HUB_OFFLINE == before
