"""Sharing the cores among the machine's compute jobs (cores.py): each takes torch's default thread count divided by
the jobs running, at least 1; ended jobs are not counted; a count the user fixed is kept."""
import os
import subprocess
import sys

import torch

from dipsvd_core.common import cores


def test_jobs_share_the_cores_and_ended_ones_do_not_count(machine, tmp_path, monkeypatch):
    machine.with_cores(4)
    assert cores.running() == 0 and cores.share() == 4
    other = machine.other_job()  # another process's job
    with cores.job():
        assert cores.running() == 2 and torch.get_num_threads() == 2
        with cores.job():  # a second job in this process (the app serving two sessions)
            assert cores.running() == 3 and cores.share() == 1
        assert cores.share() == 2
    for process in machine.others:
        process.kill()
        process.wait()
    assert other.exists() and cores.running() == 0  # the ended process's file is removed
    assert not list((tmp_path / "jobs").iterdir())
    assert cores.share() == 4
    monkeypatch.setenv("DIPSVD_STUDIO_THREADS", "3")
    with cores.job():
        assert torch.get_num_threads() == 3  # fixed by the user


def test_a_cli_run_registers_while_it_runs(tmp_path, tiny_model_dir):
    """`python -m dipsvd_core` runs its command as one job: its file is there while it runs, gone after."""
    env = dict(os.environ, DIPSVD_STUDIO_JOBS=str(tmp_path / "jobs"))
    code = ("import sys; from dipsvd_core import cli; from dipsvd_core.common import cores\n"
            "cli.COMMANDS['plan'] = lambda args: str(cores.running())\n"
            "sys.exit(cli.main(['plan', '--model', sys.argv[1], '--no-bench']))")
    out = subprocess.run([sys.executable, "-c", code, tiny_model_dir], env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    assert out.stdout.strip() == "1"
    assert not list((tmp_path / "jobs").iterdir())
