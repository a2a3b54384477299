"""The plan's eigh times at the real widths (issue 39, item 3): measured once per device and stored in the cache
under the device's name, interpolated between measured widths, scaled by width cubed beyond them, and the plan says
which it used."""
from __future__ import annotations

import json
import math

import pytest
import torch

import dipsvd_core.plan as P
from dipsvd_core.plan import rates as R


def test_eigh_times_interpolate_in_log_log_and_scale_by_width_cubed_beyond():
    times = R.EighTimes({512: 1.0, 4096: 100.0}, {512: "measured now", 4096: "stored"})
    assert times(512) == 1.0 and times(4096) == 100.0
    slope = math.log(100.0) / math.log(8.0)  # 2.2146
    assert times(2048) == pytest.approx(4 ** slope, rel=1e-12) == pytest.approx(21.544, abs=1e-3)
    assert times(8192) == pytest.approx(800.0) and times(256) == pytest.approx(0.125)
    words = times.words([512, 2048, 14336])
    assert "512 wide measured now" in words and "2048 wide interpolated" in words
    assert "14336 wide scaled by width cubed from 4096 wide (stored)" in words


def test_rates_are_stored_per_device_name_and_merged():
    name = "NVIDIA Test Card 80GB"
    assert R.stored(name) is None
    R.store(name, {"device 4096 float64": 2.5}, "test")
    R.store(name, {"host 4096 float64": 9.0}, "test")
    data = R.stored(name)
    assert data["device"] == name and data["eigh_s"] == {"device 4096 float64": 2.5, "host 4096 float64": 9.0}
    assert R._path(name).name == "nvidia-test-card-80gb.json" and R._path(name).parent.name == "rates"
    assert R.device_name(torch.device("cpu")).startswith("CPU ")


def test_a_stored_eigh_time_sets_the_plans_factor_time(tiny_model_dir, capsys):
    """The tiny model's widths: with a stored float64 eigh time at its widest matrix the factors phase takes it,
    and the plan's note names it; `plan --measure-rates` measures and stores them."""
    from dipsvd_core.cli import main

    config, _ = P.load_config(str(tiny_model_dir))
    sh = P.shapes_of(config)
    run = P.run_of(compute_dtype="float64")
    name = R.device_name(torch.device("cpu"))
    widths = sorted({*sh.groups, sh.hidden, *(min(o, i) for _, o, i in sh.matrices)})
    base = P.Rates(1.0, 1.0, 1.0, 1e-3, 1e12, 1e9)
    slow = P.Rates(1.0, 1.0, 1.0, 1e-3, 1e12, 1e9, R.eigh_times(torch.device("cpu"), "float64", {512: 1e-3}))
    R.store(name, {f"host {w} float64": 100.0 for w in widths}, "test")
    stored = P.Rates(1.0, 1.0, 1.0, 1e-3, 1e12, 1e9, R.eigh_times(torch.device("cpu"), "float64", {512: 1e-3}))
    a, b, c = (P.memory(sh, run, False, 0) for _ in range(3))
    P.timing(a, sh, run, base)
    P.timing(b, sh, run, slow)
    P.timing(c, sh, run, stored)
    assert b["factors"].seconds == pytest.approx(a["factors"].seconds)  # the same 512-wide figure, cubed: no change
    per_block = sum(100.0 for b, _, _ in sh.matrices if b == 0)  # one stored eigh per matrix of a block
    assert c["factors"].seconds > sh.n_blocks * per_block > 100 * a["factors"].seconds
    assert main(["plan", "--model", str(tiny_model_dir), "--device", "cpu", "--compute-dtype", "float64", "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert any("stored" in n and "(test)" in n for n in notes), notes
    assert main(["plan", "--model", str(tiny_model_dir), "--device", "cpu", "--compute-dtype", "float64", "--json",
                 "--measure-rates"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert any("(plan --measure-rates)" in n for n in notes), notes
    data = R.stored(name)
    assert main(["plan", "--model", str(tiny_model_dir), "--measure-rates", "--no-bench"]) == 2
    assert "drop one of them" in capsys.readouterr().err
    assert data["source"] == "plan --measure-rates" and all(0 < data["eigh_s"][f"host {w} float64"] < 10
                                                             for w in widths)
