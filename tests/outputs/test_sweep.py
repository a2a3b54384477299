"""`python -m dipsvd_core sweep` on the tiny model, and the global-importance CLI flags."""
import json
import math

import pytest

from dipsvd_core.cli import main
from dipsvd_core.common.errors import DipSVDError
from dipsvd_core.outputs.sweep import DEFAULT_GRID, markdown, parse_grid, parse_ratios

SMALL = ["--calib-windows", "4", "--seqlen", "64", "--eval-tokens", "128", "--quiet"]


def test_sweep_cli_writes_json_and_markdown_with_the_expected_rows(tiny_model_dir, tmp_path, capsys):
    out_json, out_md = tmp_path / "s.json", tmp_path / "s.md"
    grid = "svd-llm:uniform,dipsvd:heuristic,dipsvd:bayes,fwsvd:uniform,dipsvd:coupled"
    code = main(["sweep", "--model", tiny_model_dir, "--grid", grid, "--ratios", "0.3", "--eval", "wiki,news",
                 "--bo-calls", "3", "--bo-windows", "1", "--out-json", str(out_json), "--out-md", str(out_md), *SMALL])
    assert code == 0
    report = json.loads(out_json.read_text())
    rows = report["rows"]
    expected = {(m, a, 0.3) for m, a in parse_grid(grid)}
    assert {(r["method"], r["allocation"], r["ratio"]) for r in rows} == expected and len(rows) == 5
    for r in rows:
        assert 0 <= r["ratio_realized"] - r["ratio"] <= 0.005
        assert set(r["ppl"]) == {"wiki", "news"} and all(math.isfinite(v) and v > 1 for v in r["ppl"].values())
        assert r["allocation_s"] >= 0
        assert (r.get("bo_calls") == 3) == (r["allocation"] == "bayes")
    assert set(report["original_ppl"]) == {"wiki", "news"}
    assert report["eval_tokens"] == {"wiki": 128, "news": 128}
    for key in ("statistics", "fisher", "factors/svd-llm", "factors/dipsvd", "factors/fwsvd"):
        assert key in report["timings_s"]
    md = out_md.read_text().strip().splitlines()
    assert md[0].startswith("| method | allocation |") and "ppl wiki" in md[0] and "ppl news" in md[0]
    assert len(md) == 2 + 1 + 5  # header, rule, original, rows
    assert md[2].startswith("| original |")
    assert sum(line.startswith("| dipsvd | bayes |") for line in md) == 1
    assert md == markdown(report).strip().splitlines()
    assert "svd-llm | uniform | SVD-LLM" in capsys.readouterr().out


def test_default_grid_covers_the_ablation_and_baselines():
    rows = parse_grid(None)
    assert rows == list(DEFAULT_GRID)
    for row in [("svd-llm", "uniform"), ("dipsvd", "uniform"), ("svd-llm", "heuristic"), ("dipsvd", "heuristic"),
                ("dipsvd", "bayes"), ("svd", "uniform"), ("fwsvd", "uniform"), ("asvd", "uniform"),
                ("dipsvd", "coupled")]:
        assert row in rows
    assert parse_ratios("0.1, 0.2") == [0.1, 0.2]
    for bad in ("svd-llm", "svd-llm:random", "foo:uniform", ","):
        with pytest.raises(DipSVDError, match="grid"):
            parse_grid(bad)
    for bad in ("0.1,x", "0.1,1.2", ""):
        with pytest.raises(DipSVDError, match="ratio"):
            parse_ratios(bad)


@pytest.mark.parametrize("argv, reason", [
    (["sweep", "--grid", "dipsvd:magic"], "bad grid entry"),
    (["sweep", "--ratios", "0.2,1.5"], "between 0 and 1"),
    (["sweep", "--beta", "3"], "beta must be in [0, 1]"),
    (["compress", "--allocation", "heuristic", "--tau", "0"], "tau must be in (0, 1]"),
    (["compress", "--allocation", "bayes", "--bo-calls", "1"], "bo_calls must be at least 2"),
    (["compress", "--energy", "entropy"], "invalid choice"),
    (["compress", "--bo-objective", "kl"], "invalid choice"),
    (["compress", "--allocation", "greedy"], "invalid choice"),
])
def test_bad_values_exit_2_with_one_line(argv, reason, capsys, tmp_path):
    # every check fires before the model is loaded, so a missing model path is never reached
    with pytest.raises(SystemExit) if "invalid choice" in reason else _no_raise():
        code = main([*argv, "--model", str(tmp_path / "missing")])
        assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and reason in err and len(err.splitlines()) == 1


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_sweep_puts_dobi_next_to_dipsvd(tiny_model_dir, tmp_path):
    out_json, out_md = tmp_path / "s.json", tmp_path / "s.md"
    grid = "svd-llm:uniform,dobi:trained,dobi-remap:trained"
    code = main(["sweep", "--model", tiny_model_dir, "--grid", grid, "--ratios", "0.2,0.4", "--eval", "wiki",
                 "--dobi-windows", "2", "--dobi-epochs", "1", "--out-json", str(out_json), "--out-md", str(out_md),
                 *SMALL])
    assert code == 0
    rows = json.loads(out_json.read_text())["rows"]
    assert sorted((r["method"], r["ratio"]) for r in rows) == sorted(
        (m, r) for m in ("svd-llm", "dobi", "dobi-remap") for r in (0.2, 0.4))
    for r in rows:
        assert 0 <= r["ratio_realized"] - r["ratio"] <= 0.005 and math.isfinite(r["ppl"]["wiki"])
        if r["method"].startswith("dobi"):
            assert r["storage"]["remap"] == (r["method"] == "dobi-remap") and len(r["dobi_task_loss"]) == 2
    md = out_md.read_text()
    assert "| dobi-remap | trained | Dobi-SVD + remap | 0.4 / 60% |" in md
