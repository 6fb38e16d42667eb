"""Faults of a multi-process job: a rank killed, a rank that stalls.

Every test here injects one fault for real; its docstring's Fault / Injected / Suite / Lost lines
go into results/reliability.md (tools/reliability.py)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import mlflow
import pytest

from reproduce import checkpoint
from tests.conftest import tiny_overrides
from tests.faults import CIFAR, TRAIN, _env, _same_weights, _steps, _torchrun, _wait_for, _worker


# --- 1. a rank killed ---------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_of_a_rank_restarts_from_the_last_checkpoint(cifar_tar, tmp_path):
    """Fault: a training process dies (SIGKILL, OOM killer, node failure).
    Injected: SIGKILL to rank 1 of a 2-process torchrun job (--max-restarts 2) after its first checkpoint.
    Suite: torchrun restarts both ranks; they resume from the newest checkpoint into the same MLflow run.
    Lost: the iterations since the last checkpoint, recomputed identically; final weights equal an uninterrupted run's."""
    iterations = 40
    straight = tiny_overrides(
        cifar_tar, iterations, **{"run.dir": tmp_path / "straight", "run.checkpoint_every": 10, "eval.every": 20}
    )
    proc = _torchrun(straight)
    assert proc.wait(300) == 0, proc.stdout.read()

    faulty = tiny_overrides(
        cifar_tar, iterations, **{"run.dir": tmp_path / "faulty", "run.checkpoint_every": 10, "eval.every": 20}
    )
    proc = _torchrun(faulty, "--max-restarts", "2")
    _wait_for(lambda: checkpoint.list_checkpoints(tmp_path / "faulty"), 240, "the first checkpoint")
    victim = _wait_for(lambda: _worker(proc, 1), 30, "rank 1")
    victim.kill()
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out
    runs = mlflow.search_runs(experiment_names=["cifar10"], output_format="list")
    faulty_runs = [r for r in runs if r.data.tags["reproduce.run_dir"] == str((tmp_path / "faulty").resolve())]
    assert len(faulty_runs) == 1 and faulty_runs[0].info.status == "FINISHED"
    assert faulty_runs[0].data.tags.get("reproduce.resumes") == "1"  # it really restarted
    assert _steps(faulty_runs[0].info.run_id, "train_loss") == list(range(1, iterations + 1))  # no step twice
    assert _same_weights(tmp_path / "straight", tmp_path / "faulty")


# --- 2. a rank that stalls ----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stalled_rank_fails_the_job_naming_it(cifar_tar, tmp_path):
    """Fault: a process hangs (stuck I/O, a frozen GPU, a debugger attached).
    Injected: SIGSTOP to rank 1 of a 2-process torchrun job after its first checkpoint; run.collective_timeout_s=20.
    Suite: rank 0 gives up after the timeout with one line naming rank 1 (pid, host, last iteration); the run is FAILED.
    Lost: nothing before the last checkpoint, which stays intact; the job ends instead of hanging."""
    overrides = tiny_overrides(
        cifar_tar,
        2000,
        **{
            "run.dir": tmp_path / "stall",
            "run.checkpoint_every": 10,
            "eval.every": 5000,
            "run.collective_timeout_s": 20,
        },
    )
    proc = _torchrun(overrides)
    victim = None
    try:
        _wait_for(lambda: checkpoint.list_checkpoints(tmp_path / "stall"), 240, "the first checkpoint")
        victim = _wait_for(lambda: _worker(proc, 1), 30, "rank 1")
        victim.suspend()
        stalled_at = time.monotonic()
        out, _ = proc.communicate(timeout=240)
    finally:
        if victim is not None and victim.is_running():
            victim.kill()
        proc.kill()
    assert proc.returncode != 0
    assert time.monotonic() - stalled_at < 200  # the timeout (20 s) plus torchrun's shutdown grace, not forever
    line = next((l for l in out.splitlines() if "stopped answering" in l), None)
    assert line, out
    assert f"rank 1 (pid {victim.pid} on" in line, line
    (run,) = mlflow.search_runs(experiment_names=["cifar10"], output_format="list")
    assert run.info.status == "FAILED"
    for path in checkpoint.list_checkpoints(tmp_path / "stall"):
        assert checkpoint.verify(path) is None


@pytest.mark.parametrize(
    "text",
    [
        "Application timeout caused pair closure",  # gloo, in DDP's buffer broadcast (CI, 2026-12-08)
        "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500",
        "Timed out waiting 20000ms for recv operation to complete",
        "NCCL communicator was aborted on rank 0.",
    ],
)
def test_every_way_a_backend_words_a_lost_peer_is_recognised(text):
    """Fault: a peer stops answering inside a collective, and the backend words it in one of its several ways.
    Injected: the exact texts gloo and NCCL raise (as RuntimeError), given to the classifier the training loop uses.
    Suite: each is taken as a lost peer, so the job ends with the one line naming the stalled rank, not a traceback.
    Lost: nothing (the classifier only chooses the message)."""
    from reproduce import distributed

    assert distributed.looks_like_lost_peer(RuntimeError(text))
    assert not distributed.looks_like_lost_peer(
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x64 and 10x10)")
    )


# --- 3. a rank that cannot join -----------------------------------------------------------
@pytest.mark.timeout(120)
def test_a_rank_that_cannot_join_fails_in_one_line_not_as_a_bad_config(cifar_tar, tmp_path):
    """Fault: the process group cannot form (rank 0 never started, a wrong MASTER_ADDR/PORT, a firewall).
    Injected: rank 1 of 2 started alone, its MASTER_PORT on 127.0.0.1 with nothing listening; run.collective_timeout_s=3.
    Suite: after the timeout it exits 1 (failed, as SLURM's launcher reports it), not 2 (bad config), with one line naming rank, backend, address and what to check.
    Lost: nothing: no run directory and no MLflow run are made."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = tiny_overrides(cifar_tar, 4, **{"run.dir": tmp_path / "run", "run.collective_timeout_s": 3})
    env = _env(
        RANK="1",
        LOCAL_RANK="1",
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    proc = subprocess.run(
        [sys.executable, TRAIN, "--config", str(CIFAR), *overrides],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"rank 1 of 2 could not join the gloo process group at 127.0.0.1:{port} (" in errors[0]
    assert "timed out after 3000ms" in errors[0]  # torch's own reason, first line
    assert "MASTER_ADDR/MASTER_PORT" in errors[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "mlflow.db").exists()
