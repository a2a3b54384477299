"""evaluate --tasks: lm-evaluation-harness's zero-shot accuracy with its standard error, the original's and the
compressed model's side by side, on the local task built from the bundled wiki text."""
from __future__ import annotations

import json
import math
import re

from dipsvd_core.compressed import save_compressed
from dipsvd_core.lm_tasks import CHOICE_WORDS, CONTEXT_WORDS, cloze_documents
from dipsvd_core.pipeline import Settings, Workbench
from tests.test_cli import error_line, run


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
    from dipsvd_core.data import load_documents

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


def test_an_unknown_task_is_one_line(tiny_model_dir):
    proc = run("evaluate", "--model", str(tiny_model_dir), "--tasks", "no_such_task", "--eval-tokens", "256",
               "--seqlen", "64", "--quiet")
    assert proc.returncode == 2 and "unknown lm-eval task(s) no_such_task" in error_line(proc)
    assert "Traceback" not in proc.stderr
