"""make gpu-check's script, run on the CPU with the tiny model: every step of the full path, each phase measured
beside the plan."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_script_runs_the_full_path_and_sets_each_phase_beside_the_plan(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert row["case"] == "tiny" and row["device"] == "cpu"
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
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out", str(tmp_path / "x.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    import torch

    if not torch.cuda.is_available():
        assert proc.returncode != 0 and "gpu-check needs a CUDA device" in proc.stderr
