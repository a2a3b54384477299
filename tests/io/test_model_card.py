"""The model card (README.md) that `compress --out` writes into a saved folder: Hub metadata that parses, and the
same figures as the JSON and HTML reports."""
from __future__ import annotations

import json
import re

import pytest
import yaml

from dipsvd_core.io.model_card import BUNDLED_HUB_ID, base_model, front_matter
from tests.cli.test_cli import run


def parse_card(text: str) -> tuple[dict, str]:
    """(front matter, body) of a Hub model card: YAML between the first two '---' lines."""
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def table_rows(body: str, section: str) -> dict[str, list[str]]:
    """The first cell -> the other cells of each row of the Markdown table under `## section`."""
    part = body.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in part.splitlines()
            if line.startswith("|") and not line.startswith("|---")]
    return {r[0]: r[1:] for r in rows[1:]}


def test_compress_out_writes_a_card_with_the_reports_figures(tiny_model_dir, tmp_path):
    report, out, page = tmp_path / "r.json", tmp_path / "model", tmp_path / "r.html"
    proc = run("compress", "--model", tiny_model_dir, "--method", "svd-llm", "--ratio", "0.2", "--calib", "wiki",
               "--calib-windows", "4", "--seqlen", "64", "--eval", "wiki,news", "--eval-tokens", "256", "--speed",
               "--tasks", "dipsvd_wiki_cloze", "--task-limit", "4", "--out", str(out), "--report", str(report),
               "--html", str(page), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(report.read_text())
    meta, body = parse_card((out / "README.md").read_text())
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"dipsvd-studio", "svd-llm"} <= set(meta["tags"])
    assert "base_model" not in meta  # a local folder has no hub id
    assert "ratio 0.2 removed, 80% kept" in body
    assert "dipsvd.weight=30.0" in body and "tune.epochs=25" in body and "{'" not in body  # options by name, no repr
    ppl = table_rows(body, "Perplexity")
    assert set(ppl) == {"wiki", "news"}
    html = page.read_text()
    for name, (original, compressed, ratio) in ppl.items():
        assert float(original) == pytest.approx(r["ppl"]["original"][name], rel=1e-5)
        assert float(compressed) == pytest.approx(r["ppl"]["compressed"][name], rel=1e-5)
        assert float(ratio.rstrip("x")) == pytest.approx(float(compressed) / float(original), abs=1e-3)
        assert f"{r['ppl']['compressed'][name]:.4g}" in html  # the HTML report gives the same figure
    accs = re.findall(r"\| dipsvd_wiki_cloze \| (\w+) \| ([\d.]+) \|", body)
    assert {side: float(a) for side, a in accs} == {s: r["lm_eval"][s]["dipsvd_wiki_cloze"]["acc"]
                                                    for s in ("original", "compressed")}
    speed = table_rows(body, "Speed")
    assert float(speed["compressed"][1]) == pytest.approx(r["speed"]["compressed"]["decode_tok_s"], rel=1e-5)
    sides = r["speed"]["original"], r["speed"]["compressed"]
    assert [int(speed[s][2]) for s in ("original", "compressed")] == [x["decode_bytes"] for x in sides]
    assert float(speed["compressed"][3]) == pytest.approx(sides[0]["decode_bytes"] / sides[1]["decode_bytes"], 1e-5)
    assert sides[1]["settings"]["mode"] == "eager" and sides[1]["compile_s"] is None  # on a CPU by default
    assert "eager (dynamic KV cache), batch 1, prompt 256 tokens" in body and "eager (dynamic KV cache)" in html
    assert f"pretrained={out},trust_remote_code=True" in body  # the lm_eval command names this folder
    assert f'from_pretrained("{out}", trust_remote_code=True)' in body
    (tmp_path / "card.md").write_text(body)


def test_base_model_is_the_hub_id_where_there_is_one(tmp_path):
    from dipsvd_core.model.models import bundled_gguf

    bundled = {"model": "smollm2-135m", "model_source": str(bundled_gguf()), "dequantized_from_gguf": True,
               "method": "dipsvd"}
    assert base_model(bundled) == BUNDLED_HUB_ID == front_matter(bundled)["base_model"]
    hub = {"model": "HuggingFaceTB/SmolLM2-360M", "model_source": "HuggingFaceTB/SmolLM2-360M"}
    assert base_model(hub) == "HuggingFaceTB/SmolLM2-360M"
    assert base_model({"model": str(tmp_path), "model_source": str(tmp_path)}) is None  # a local folder
    assert base_model({"model": "x.gguf", "model_source": "/m/x.gguf", "dequantized_from_gguf": True}) is None
