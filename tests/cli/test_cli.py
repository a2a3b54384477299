"""The command line: error exits with one-line reasons, and a full run on the tiny model."""
import json
import subprocess
import sys

import pytest


def run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "dipsvd_core", *args], capture_output=True, text=True,
                          timeout=timeout)


def run_here(capsys, *args):
    """`python -m dipsvd_core *args` in this process (no interpreter start-up: the checks of bad input that never
    reach a model), as a finished process: returncode, stdout, stderr."""
    from types import SimpleNamespace

    from dipsvd_core.cli import main

    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize("args,needle", [
    (["compress", "--ratio", "0"], "ratio must be strictly between 0 and 1"),
    (["compress", "--ratio", "1"], "ratio must be strictly between 0 and 1"),
    (["compress", "--ratio", "1.5"], "ratio must be strictly between 0 and 1"),
    (["compress", "--ratio", "abc"], "ratio must be a number"),
    (["compress", "--method", "magic"], "invalid choice: 'magic'"),
    (["compress", "--calib-windows", "0"], "positive whole number"),
    (["compress", "--model", "./missing/model"], "model path not found: ./missing/model"),
    (["evaluate", "--model", "/nope/model.gguf"], "GGUF file not found"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["compress", "--device-memory", "abc"], "expected a memory size like 24GiB"),
    (["compress", "--host-memory=-2GiB"], "expected a memory size like 24GiB"),
    (["compress", "--device-memory", "0"], "expected a positive memory size"),
    (["compress", "--host-memory", "64KiB"], "--host-memory 64.0 KiB cannot hold one decoder block"),
    (["compress", "--device-memory", "-1GiB"], "expected a memory size like 24GiB, 22GB or 512MiB, got '-1GiB'"),
    (["plan", "--host-memory", "-0.5GiB"], "expected a memory size like 24GiB, 22GB or 512MiB, got '-0.5GiB'"),
    (["compress", "--device-memory", "1MiB"], "--device-memory 1.0 MiB cannot hold one decoder block"),
    (["compress", "--export", "dense"], "--export dense writes next to the saved model; give --out DIR too"),
    (["evaluate", "--tasks", ",", "--eval-tokens", "64", "--seqlen", "32"], "--tasks names no task"),
])
def test_bad_input_exits_with_one_line(args, needle, capsys):
    proc = run_here(capsys, *args, "--quiet")
    assert proc.returncode == 2
    assert needle in error_line(proc)
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["compress", "plan"])
@pytest.mark.parametrize("config", ["{}", "not json"])
def test_a_config_that_is_not_a_models_gets_one_line(tmp_path, command, config, capsys):
    """A folder whose config.json has no model_type (or is not JSON) is named, not a ValueError traceback."""
    (tmp_path / "config.json").write_text(config)
    proc = run_here(capsys, command, "--model", str(tmp_path), *(["--quiet"] if command == "compress" else []))
    assert proc.returncode == 2
    assert "config.json is not a transformers model config" in error_line(proc)
    assert "Traceback" not in proc.stderr


def test_calibration_text_too_short(tiny_model_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words of calibration text.")
    proc = run("compress", "--model", tiny_model_dir, "--calib", str(short), "--calib-windows", "4",
               "--seqlen", "64", "--quiet")
    assert proc.returncode == 2
    assert "calibration text" in error_line(proc) and "too short" in error_line(proc)


def test_out_folder_is_never_overwritten_without_force(tiny_model_dir, tmp_path):
    out = tmp_path / "keep"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    proc = run("compress", "--model", tiny_model_dir, "--out", str(out), "--quiet")
    assert proc.returncode == 2 and "--force" in error_line(proc)
    assert (out / "mine.txt").read_text() == "precious"


def test_compress_then_evaluate_the_saved_model(tiny_model_dir, tmp_path):
    report, out = tmp_path / "r.json", tmp_path / "model"
    proc = run("compress", "--model", tiny_model_dir, "--method", "dipsvd", "--allocation", "uniform",
               "--ratio", "0.3", "--weight", "30", "--bar", "0.05", "--calib", "wiki", "--calib-windows", "4",
               "--seqlen", "64", "--eval", "wiki,news", "--eval-tokens", "256", "--out", str(out),
               "--export", "dense", "--report", str(report))
    assert proc.returncode == 0, proc.stderr
    r = json.loads(report.read_text())
    for key in ("model", "method", "allocation", "ratio_target", "ratio_realized", "params", "ranks", "ppl",
                "timings_s", "peak_memory_mb"):
        assert key in r
    assert r["method"] == "dipsvd" and r["allocation"] == "uniform" and r["ratio_target"] == 0.3
    assert abs(r["ratio_realized"] - 0.3) <= 0.005
    p = r["params"]
    assert p["targeted_after"] / p["targeted_before"] == pytest.approx(1 - r["ratio_realized"])
    assert p["total_before"] - p["total_after"] == p["targeted_before"] - p["targeted_after"]
    assert len(r["ranks"]) == 14 and all(isinstance(k, int) for k in r["ranks"].values())
    assert set(r["ppl"]["original"]) == set(r["ppl"]["compressed"]) == {"wiki", "news"}
    assert all(v > 1 for v in r["ppl"]["compressed"].values())
    assert {"load_model", "statistics", "factors", "surgery", "evaluation", "save"} <= set(r["timings_s"])
    import torch
    import transformers

    assert r["versions"]["torch"] == torch.__version__ and r["versions"]["transformers"] == transformers.__version__
    # each phase's measured peaks: the host's at least the runtime and at most the run's own peak, none on a CPU
    phases = r["memory"]["phases"]
    assert {"load", "factors", "surgery", "evaluation", "save"} <= set(phases)
    for name, ph in phases.items():
        assert 100 * 2**20 < ph["host_peak_bytes"] <= r["peak_memory_mb"] * 2**20 + 2**20, name
        assert ph["device_peak_bytes"] == 0 and ph["seconds"] >= 0
    assert max(ph["host_peak_bytes"] for ph in phases.values()) >= 0.8 * r["peak_memory_mb"] * 2**20
    assert "100%" in proc.stderr  # progress bars were drawn
    # The saved model evaluates to the same perplexity through `evaluate`.
    report2 = tmp_path / "r2.json"
    proc = run("evaluate", "--model", str(out), "--eval", "wiki,news", "--eval-tokens", "256", "--seqlen", "64",
               "--report", str(report2))
    assert proc.returncode == 0, proc.stderr
    r2 = json.loads(report2.read_text())
    assert r2["ppl"]["wiki"] == pytest.approx(r["ppl"]["compressed"]["wiki"], rel=1e-5)
    assert r2["compression"]["ranks"] == r["ranks"]
    # --export dense: OUT-dense is a plain folder of ordinary Linears (the products u v), the original's size
    dense = tmp_path / "model-dense"
    assert r["saved_dense_to"] == str(dense)
    config = json.loads((dense / "config.json").read_text())
    assert "dipsvd_compression" not in config and "auto_map" not in config
    assert not (dense / "modeling_dipsvd.py").exists()
    proc = run("evaluate", "--model", str(dense), "--eval", "wiki,news", "--eval-tokens", "256", "--seqlen", "64",
               "--report", str(report2))
    assert proc.returncode == 0, proc.stderr
    r3 = json.loads(report2.read_text())
    assert r3["params"]["total"] == p["total_before"] and "compression" not in r3
    assert r3["ppl"]["wiki"] == pytest.approx(r["ppl"]["compressed"]["wiki"], rel=1e-4)


def test_dobi_remap_compress_then_evaluate(tiny_model_dir, tmp_path):
    report, out = tmp_path / "r.json", tmp_path / "dobi"
    proc = run("compress", "--model", tiny_model_dir, "--method", "dobi", "--remap", "--ratio", "0.3",
               "--calib", "wiki", "--calib-windows", "4", "--seqlen", "64", "--dobi-windows", "2", "--dobi-epochs", "2",
               "--eval", "wiki", "--eval-tokens", "256", "--out", str(out), "--report", str(report), "--quiet")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(report.read_text())
    assert r["method"] == "dobi" and r["allocation"] == "trained"
    assert r["storage"]["remap"] and abs(r["storage"]["storage_ratio"] - 0.3) <= 0.005
    assert r["ratio_realized"] == r["storage"]["storage_ratio"]  # counted in bytes against 16-bit weights
    assert len(r["dobi"]["history"]) == 4 and abs(r["dobi"]["ratio_trained"] - 0.3) < 0.01
    # 8-bit factors: more parameters are kept than a 16-bit budget of 70% would allow
    assert r["params"]["targeted_after"] > 0.7 * r["params"]["targeted_before"]
    report2 = tmp_path / "r2.json"
    proc = run("evaluate", "--model", str(out), "--eval", "wiki", "--eval-tokens", "256", "--seqlen", "64",
               "--report", str(report2))
    assert proc.returncode == 0, proc.stderr
    r2 = json.loads(report2.read_text())
    assert r2["ppl"]["wiki"] == pytest.approx(r["ppl"]["compressed"]["wiki"], rel=1e-4)
    assert r2["compression"]["remap"] is True


@pytest.mark.parametrize("args,needle", [
    (["compress", "--method", "dobi", "--allocation", "uniform"], "use allocation 'trained'"),
    (["compress", "--method", "svd-llm", "--remap"], "use it with method dobi"),
])
def test_dobi_bad_combinations(args, needle):
    proc = run(*args, "--quiet")
    assert proc.returncode == 2 and needle in error_line(proc)


@pytest.mark.parametrize("argv,allocation,refine", [
    (["compress"], "nested", "sequential"),  # dipsvd's own: the best path of the quality panel
    (["plan"], "nested", "sequential"),  # the plan is of the run compress makes
    (["compress", "--method", "svd-llm"], "uniform", "none"),  # a baseline as published
    (["compress", "--method", "dobi"], "trained", "none"),
    (["compress", "--allocation", "heuristic", "--refine", "none"], "heuristic", "none"),  # named: as named
    (["sweep"], "nested", "none"),  # a sweep refines the rows its grid names (method:allocation+refine)
])
def test_an_allocation_or_refine_not_given_is_the_methods_own(argv, allocation, refine):
    from dipsvd_core.cli.args import build_parser, settings_from

    args = build_parser().parse_args(argv)
    over = {"method": args.method, "ratio": args.ratio} if hasattr(args, "method") else {"ratio": 0.2}
    settings = settings_from(args, **over)
    assert (settings.allocation, settings.refine) == (allocation, refine)


def test_an_option_groups_own_knobs_come_before_the_schedule_it_shares(capsys):
    """Block tuning's and distillation's epochs are listed (in --help, as in the app's box) before the AdamW schedule
    both inherit; the inherited knobs still reach the settings."""
    from dipsvd_core.common.knobs import knobs_in_order
    from dipsvd_core.refine.choices import DistillConfig, TuneConfig

    assert [f.name for f in knobs_in_order(TuneConfig)] == ["epochs", "error", "scope", "lr", "weight_decay",
                                                            "warmup", "clip"]
    assert [f.name for f in knobs_in_order(DistillConfig)][:1] == ["epochs"]
    text = run_here(capsys, "compress", "--help").stdout
    for group in ("tune", "distill"):
        assert text.index(f"--{group}-epochs") < text.index(f"--{group}-lr") < text.index(f"--{group}-clip")
