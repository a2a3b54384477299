"""make gpu-check's script, run on the CPU with the tiny model: every step of the full path, each phase measured
beside the plan."""
import json
import subprocess
import sys

from devkit.scripts import ROOT, run_bench_script


def test_gpu_check_script_runs_the_full_path_and_sets_each_phase_beside_the_plan(tmp_path):
    out = tmp_path / "check.json"
    proc = run_bench_script("gpu_check", "--tiny", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rates, row, oom = json.loads(out.read_text())
    assert row["case"] == "tiny" and row["device"] == "cpu"
    # the plan's rates, measured (at small widths on the CPU): every eigh and Cholesky timed, the matmuls' FLOP/s
    assert rates["case"] == "rates" and len(rates["eigh_s"]) == len(rates["cholesky_s"]) == 2  # the CPU: host only
    stored = json.loads(open(rates["stored"]).read())  # kept for the device (plan.rates): later plans read them
    assert stored["source"] == "gpu_check" and rates["eigh_s"].items() <= stored["eigh_s"].items()
    assert all(0 < t < 10 for t in [*rates["eigh_s"].values(), *rates["cholesky_s"].values()]), rates
    assert rates["matmul_bfloat16_flops"] > 1e8 and rates["matmul_tf32_flops"] > 1e8
    # the out-of-memory case (simulated on the CPU: refine raises torch.OutOfMemoryError): one line, the phase named
    assert oom["case"] == "oom" and oom["returncode"] == 2 and oom["one_line"], oom
    assert "out of device memory (tried to allocate 2.00 GiB) in the refine phase" in oom["errors"][0]
    phases = row["phases"]
    assert {"load", "factors", "fisher", "type probe", "refine", "surgery", "evaluation",  # statistics: in factors
            "save"} <= set(phases), sorted(phases)
    for name in ("load", "factors", "fisher", "refine", "evaluation"):
        p = phases[name]
        assert p["host_peak_bytes"] > 100 * 2**20 and p["plan_host_bytes"] > 100 * 2**20, name
        assert 0.2 < p["plan_host_bytes"] / p["host_peak_bytes"] < 5, (name, p)  # same order: the runtime dominates
        assert p["device_peak_bytes"] == 0 and p["plan_device_bytes"] == 0
    assert row["ppl"]["loaded"]["wiki"] == __import__("pytest").approx(row["ppl"]["compressed"]["wiki"], rel=1e-4)
    assert row["generated"] == {"compress": 3, "loaded": 3}
    # without a GPU and without --tiny the script says what it needs, in one line
    proc = run_bench_script("gpu_check", "--out", str(tmp_path / "x.json"), timeout=300)
    import torch

    if not torch.cuda.is_available():
        assert proc.returncode != 0 and "gpu-check needs a CUDA device" in proc.stderr


def test_the_gpu_bundle_fits_a_device_call_and_its_run_script_refuses_without_cuda(tmp_path):
    """make gpu-bundle's folder: the tokenizer as a folder, the two text halves, run.sh, at most 60 MiB; run.sh on a
    machine without CUDA answers in one line and exits non-zero before installing or running anything."""
    import torch

    folder = tmp_path / ".gpu"
    proc = run_bench_script("gpu_bundle", "--folder", str(folder), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (folder / "tokenizer" / "tokenizer.json").is_file() and (folder / "run.sh").is_file()
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert 1 * 2**20 < size <= 60 * 2**20
    assert f"{size / 2**20:.1f} MiB" in proc.stdout
    for name in ("calib", "eval"):
        rows = [json.loads(ln) for ln in (folder / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) > 40 and sum(len(r["text"]) for r in rows) > 1_000_000  # the whole wiki extract's half
    if torch.cuda.is_available():
        return
    run = subprocess.run(["bash", str(folder / "run.sh")], capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "OUT": str(tmp_path / "out")})
    assert run.returncode == 3
    assert run.stderr.strip().splitlines() == [run.stderr.strip()] and "no CUDA device" in run.stderr
    assert not (tmp_path / "out").exists()


def test_the_tiny_path_runs_under_the_gpu_machines_transformers(tmp_path):
    """The GPU machine has transformers 5.17 (this venv: 5.23). The device check's tiny case (compress, refine, save,
    load, evaluate and generate, each phase beside the plan) runs with 5.17 and the huggingface_hub and httpx it
    imports first on the path (devkit/device_versions.py: their wheels, downloaded from PyPI once into the cache)."""
    from devkit.device_versions import TRANSFORMERS, env_with, site

    out = tmp_path / "check.json"
    proc = run_bench_script("gpu_check", "--tiny", "--cases", "tiny", "--out", str(out), env=env_with(site()))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert row["versions"]["transformers"] == TRANSFORMERS and row["versions"]["torch"].startswith("2.13")
    assert row["ppl"]["loaded"]["wiki"] == __import__("pytest").approx(row["ppl"]["compressed"]["wiki"], rel=1e-4)
    assert row["generated"] == {"compress": 3, "loaded": 3} and {"factors", "refine", "save"} <= set(row["phases"])


PLACEMENTS = """
import json, os, sys, tempfile
sys.path.insert(0, "bench")
import gpu_check as g
from transformers import LlamaConfig
from dipsvd_core import plan as P
from dipsvd_core.cli.args import build_parser
from dipsvd_core.cli.commands import _budgets, _run_of

out = {}
for name, (widths, device, dtype, (windows, seqlen), extra) in g.CASES.items():
    if "--offload" not in extra:
        continue
    folder = tempfile.mkdtemp()
    LlamaConfig(**g.WIDTHS[widths], max_position_embeddings=4096).save_pretrained(folder)
    os.environ.update(g.CASE_ENV.get(name, {}))
    args = build_parser().parse_args([*g._compress_args(folder, device, dtype, windows, seqlen), "--refine",
                                      "sequential", "--generate", "--out", folder + "/out", *extra])
    at = P.make_plan(args.model, args.device, _run_of(args), bench=False, budgets=_budgets(args)).placement
    out[name] = [at.device, at.host, at.disk]
print(json.dumps(out))
"""


def test_the_offloaded_cases_keep_blocks_on_the_gpu_in_host_memory_and_on_disk():
    """The GPU check's offloaded cases, planned here as their compress command plans them on the GPU machine (the
    runtime pinned): some blocks stay on the GPU, some stream from host memory and some from disk, so the case tests
    all three. (At 25 GiB, a budget that once kept 3 blocks on the GPU, the plan came to keep all 8 as its working
    set shrank, and the case offloaded nothing.)"""
    proc = subprocess.run([sys.executable, "-c", PLACEMENTS], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    placements = json.loads(proc.stdout.splitlines()[-1])
    assert set(placements) == {"Llama-3-8B x8 offload", "Llama-3-8B x8 offload tuned"}
    assert all(gpu > 0 and host > 0 and disk > 0 for gpu, host, disk in placements.values()), placements
