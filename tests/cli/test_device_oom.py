"""A device out-of-memory error (torch.OutOfMemoryError, what CUDA raises) anywhere in compress, evaluate or plan
answers in one line: what ran out, the phase, the plan's advice; and the report's lifetime device peak survives the
per-phase resets (memwatch)."""
import pytest
import torch

from dipsvd_core import cli
from dipsvd_core.engine import memwatch
from dipsvd_core.run.pipeline import Workbench

CUDA_MESSAGE = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.57 GiB of which "
                "1.19 GiB is free. Of the allocated memory 20.1 GiB is allocated by PyTorch")


def _oom(*args, **kwargs):
    raise torch.OutOfMemoryError(CUDA_MESSAGE)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


EVAL = ["--seqlen", "32", "--eval", "wiki", "--eval-tokens", "128", "--quiet"]
CALIB = ["--calib", "wiki", "--calib-windows", "2"]


@pytest.mark.parametrize("command,target,phase", [
    (["compress", "--method", "dipsvd", "--allocation", "uniform", "--refine", "sequential", "--ratio", "0.3",
      "--no-eval-original", *CALIB], (Workbench, "refine"), "in the refine phase"),
    (["compress", "--method", "dipsvd", "--allocation", "nested", "--ratio", "0.3", "--no-eval-original", *CALIB],
     ("dipsvd_core.run.calibration.cached_fisher", None), "in the fisher phase"),
    (["evaluate"], ("dipsvd_core.cli.commands._perplexities", None), "in the evaluation phase"),
])
def test_a_device_out_of_memory_error_answers_in_one_line_with_the_phase_and_the_advice(
        tiny_model_dir, monkeypatch, capsys, command, target, phase):
    obj, attr = target
    if attr is None:
        monkeypatch.setattr(obj, _oom)
    else:
        monkeypatch.setattr(obj, attr, _oom)
    rc = cli.main([command[0], "--model", tiny_model_dir, *command[1:], *EVAL])
    line = _error_line(capsys)
    assert rc == 2
    assert line.startswith("error: out of device memory (tried to allocate 2.00 GiB) " + phase), line
    for advice in ("--device-memory", "--offload", "--calib-windows"):
        assert advice in line, line


def test_plan_out_of_memory_names_the_plans_measurement(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr("dipsvd_core.plan.plan.microbenchmark", _oom)
    assert cli.main(["plan", "--model", tiny_model_dir]) == 2
    assert "out of device memory (tried to allocate 2.00 GiB) in the plan's measurement phase" in _error_line(capsys)


def test_the_lifetime_device_peak_outlives_the_per_phase_resets(monkeypatch):
    """Two phases peaking at 5 GiB then 1 GiB on a simulated device: each phase keeps its own peak, the counter ends
    at the last phase's 1 GiB, and the lifetime peak (the report's memory.device_peak_bytes) is the 5 GiB."""
    counter = {"peak": 0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: counter["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: counter.update(peak=0))
    monkeypatch.setattr(memwatch, "_lifetime_device", [0])
    w = memwatch.PhaseMemory()
    with w.phase("factors"):
        counter["peak"] = 5 * 2**30
    with w.phase("evaluation"):
        counter["peak"] = 1 * 2**30
    assert w.phases["factors"]["device_peak_bytes"] == 5 * 2**30
    assert w.phases["evaluation"]["device_peak_bytes"] == 1 * 2**30
    assert memwatch._device_peak() == 1 * 2**30  # what the old report read: the last phase's
    assert memwatch.lifetime_device_peak() == 5 * 2**30
