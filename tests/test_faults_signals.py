"""Stop signals sent to the whole job, as `timeout`, systemd, `scancel` and SLURM preemption
send them: every process of the process group gets SIGTERM at once, the loader's workers too.

Every test here injects one fault for real; its docstring's Fault / Injected / Suite / Lost lines
go into results/reliability.md (tools/reliability.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import mlflow
import pytest

from reproduce import checkpoint
from tests.conftest import tiny_overrides
from tests.faults import CIFAR, TRAIN, _env, _wait_for

STOPPED = 128 + signal.SIGTERM
ITERATIONS = 300  # long enough that the signal lands mid-run, short enough to resume to the end in seconds


def _start(command: list[str]) -> subprocess.Popen:
    """`command` as the leader of its own process group (as a batch job step is)."""
    return subprocess.Popen(
        command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _group_sigterm_then_resume(command: list[str], run_dir, iterations: int) -> None:
    """Start, SIGTERM the whole group once the first checkpoint is written, then start again:
    the first ends KILLED with 143 and a newer checkpoint; the second resumes it to FINISHED."""
    proc = _start(command)
    try:
        _wait_for(lambda: checkpoint.list_checkpoints(run_dir), 300, "the first checkpoint")
        first = checkpoint.list_checkpoints(run_dir)[-1]
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == STOPPED, out[-3000:]
    assert "killed by signal" not in out and "Traceback" not in out, out[-3000:]
    saved = checkpoint.list_checkpoints(run_dir)
    assert saved and saved[-1] > first, (first, saved)  # the stop wrote its own checkpoint
    (run,) = mlflow.search_runs(experiment_names=["cifar10"], output_format="list")
    assert run.info.status == "KILLED"

    again = _start(command)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out[-3000:]
    (run,) = mlflow.search_runs(experiment_names=["cifar10"], output_format="list")
    assert run.info.status == "FINISHED" and run.data.tags.get("reproduce.resumes") == "1"
    assert checkpoint.list_checkpoints(run_dir)[-1].name == f"ckpt-{iterations:08d}.pt"


def _overrides(data, run_dir, **extra) -> list[str]:
    return tiny_overrides(
        data,
        ITERATIONS,
        **{"run.dir": run_dir, "run.checkpoint_every": 20, "eval.every": 100_000, "run.log_every": 20, **extra},
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_group_sigterm_with_loader_workers_checkpoints_and_resumes(launcher, cifar_tar, tmp_path):
    """Fault: the job's whole process group gets SIGTERM (scancel, timeout, preemption), DataLoader workers included.
    Injected: SIGTERM to the process group of `python reproduce/train.py` or of `python -m reproduce.torchrun --nproc_per_node 2` (torchrun's agent gets it and passes it on), data.workers=2, after the first checkpoint.
    Suite: the workers leave the signal to the trainer; each rank checkpoints, the run ends KILLED, the exit status is 143; starting the same command again resumes it to FINISHED.
    Lost: nothing: the stop writes a checkpoint at the iteration it stops at."""
    overrides = _overrides(cifar_tar, tmp_path / "run", **{"data.workers": 2})
    if launcher == "python":
        command = [sys.executable, TRAIN, "--config", str(CIFAR), *overrides]
    else:
        command = [
            sys.executable,
            "-m",
            "reproduce.torchrun",
            "--standalone",
            "--nproc_per_node",
            "2",
            TRAIN,
            "--config",
            str(CIFAR),
            *overrides,
        ]
    # Under torchrun the agent gets the signal too (its workers run in sessions of their own) and passes it on.
    _group_sigterm_then_resume(command, tmp_path / "run", ITERATIONS)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_group_sigterm_with_the_ffcv_loader_checkpoints_and_resumes(cifar_tar, tmp_path):
    """Fault: the job's whole process group gets SIGTERM while the FFCV loader's threads read ahead.
    Injected: SIGTERM to the process group of `python reproduce/train.py` with data.loader=ffcv (2 reader threads), after the first checkpoint.
    Suite: the trainer checkpoints, the run ends KILLED with exit status 143; the same command resumes it to FINISHED.
    Lost: nothing: the stop writes a checkpoint at the iteration it stops at."""
    pytest.importorskip("ffcv", reason="FFCV is not installed (pip install -e '.[ffcv]'; .ci/run does)")
    from reproduce.data.ffcv.prepare import prepare_cifar10

    prepare_cifar10(cifar_tar, tmp_path / "ffcv", val_split=40)
    overrides = _overrides(tmp_path / "ffcv", tmp_path / "run", **{"data.loader": "ffcv", "data.workers": 2})
    _group_sigterm_then_resume(
        [sys.executable, TRAIN, "--config", str(CIFAR), *overrides], tmp_path / "run", ITERATIONS
    )
