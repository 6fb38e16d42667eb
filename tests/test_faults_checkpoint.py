"""Faults of the run directory: damaged and interrupted checkpoints, a checkpoint carrying code,
a non-finite loss (the last good checkpoint kept), two jobs on one run directory.

Every test here injects one fault for real; its docstring's Fault / Injected / Suite / Lost lines
go into results/reliability.md (tools/reliability.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from reproduce import checkpoint, train
from tests.conftest import make_cifar_tree, sigterm_during, tiny_overrides
from tests.faults import CIFAR, TRAIN, _env, _same_weights, _wait_for


# --- 3. damaged checkpoints ---------------------------------------------------------------
def _resumable_run(cifar_tar, run_dir: Path, monkeypatch, stop_at: int, iterations: int = 8) -> list[str]:
    """Run `iterations` tiny steps with checkpoints every 2, stopped by SIGTERM at `stop_at`."""
    overrides = tiny_overrides(
        cifar_tar,
        iterations,
        **{"run.dir": run_dir, "run.checkpoint_every": 2, "eval.every": 100, "run.keep_checkpoints": 3},
    )
    real_lr_at = train.lr_at

    def lr_then_sigterm(iteration, *args):
        if iteration == stop_at - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_lr_at(iteration, *args)

    monkeypatch.setattr(train, "lr_at", lr_then_sigterm)
    assert train.main(["--config", str(CIFAR), *overrides]) == 128 + signal.SIGTERM
    monkeypatch.setattr(train, "lr_at", real_lr_at)
    return overrides


@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_damaged_latest_checkpoint_is_set_aside_and_the_previous_used(damage, cifar_tar, tmp_path, monkeypatch, caplog):
    """Fault: the newest checkpoint is damaged on disk (full disk, a node dying mid-copy, bit rot).
    Injected: the newest checkpoint truncated to half, or one byte flipped, before resuming.
    Suite: the sha256 check fails; the file is renamed *.corrupt (kept), a warning names it, the previous checkpoint is used.
    Lost: the iterations since the previous checkpoint, recomputed; final weights equal an uninterrupted run's."""
    straight = tiny_overrides(
        cifar_tar, 8, **{"run.dir": tmp_path / "straight", "run.checkpoint_every": 100, "eval.every": 100}
    )
    assert train.main(["--config", str(CIFAR), *straight]) == 0
    overrides = _resumable_run(cifar_tar, tmp_path / "run", monkeypatch, stop_at=5)
    saved = checkpoint.list_checkpoints(tmp_path / "run")
    assert [p.name for p in saved] == ["ckpt-00000002.pt", "ckpt-00000004.pt", "ckpt-00000005.pt"]
    blob = bytearray(saved[-1].read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    else:
        blob[len(blob) // 2] ^= 0x01
    saved[-1].write_bytes(bytes(blob))

    assert train.main(["--config", str(CIFAR), *overrides]) == 0
    assert (tmp_path / "run" / "ckpt-00000005.pt.corrupt").exists()
    assert "ckpt-00000005.pt is damaged" in caplog.text and "set aside" in caplog.text
    assert _same_weights(tmp_path / "straight", tmp_path / "run")


def test_interrupted_checkpoint_write_never_replaces_a_good_one(tmp_path, monkeypatch):
    """Fault: the job dies while writing a checkpoint.
    Injected: the write of checkpoint 2 fails half-way (an exception from inside the write).
    Suite: the temporary file is removed; checkpoint 1 and its digest are untouched and still verify.
    Lost: nothing that was saved before."""
    checkpoint.save(tmp_path, 1, {"iteration": 1, "w": torch.ones(1000)}, keep=2)
    good = (tmp_path / "ckpt-00000001.pt").read_bytes()
    real_replace = os.replace

    def fail_on_checkpoint(src, dst):
        if str(dst).endswith("ckpt-00000002.pt"):
            raise OSError("disk full (injected)")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_checkpoint)
    with pytest.raises(OSError, match="injected"):
        checkpoint.save(tmp_path, 2, {"iteration": 2, "w": torch.zeros(1000)}, keep=2)
    monkeypatch.setattr(os, "replace", real_replace)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt-00000001.pt"]
    assert (tmp_path / "ckpt-00000001.pt").read_bytes() == good
    assert checkpoint.find_latest(tmp_path) == tmp_path / "ckpt-00000001.pt"
    assert not list(tmp_path.glob("*.tmp"))


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoint_cannot_run_code(cifar_tar, tmp_path, capsys):
    """Fault: a checkpoint file from elsewhere carries a pickled payload.
    Injected: a ckpt-*.pt (with a matching digest) whose pickle calls os.system when unpickled.
    Suite: torch.load(weights_only=True) refuses it; the job stops before training with one line and status 2.
    Lost: nothing; the code is never run."""
    run_dir = tmp_path / "run"
    checkpoint.save(run_dir, 3, {"iteration": 3, "evil": _Payload()}, keep=2)
    overrides = tiny_overrides(cifar_tar, 6, **{"run.dir": run_dir})
    assert train.main(["--config", str(CIFAR), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: checkpoint {run_dir}/ckpt-00000003.pt cannot be loaded safely"), err
    assert not Path("pwned").exists()


# --- 5. a non-finite loss -----------------------------------------------------------------
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(cifar_tar, tmp_path, capsys):
    """Fault: training diverges (a bad learning rate, a bad batch).
    Injected: the learning rate multiplied by 1e30 from iteration 5 on (the first 4 iterations are sane).
    Suite: the run stops at the next check with one line (iteration, lr), is FAILED, and writes no checkpoint of broken weights.
    Lost: nothing before the divergence: the checkpoints of iterations 2 and 4 are intact and finite."""
    overrides = tiny_overrides(
        cifar_tar,
        30,
        **{
            "run.dir": tmp_path / "run",
            "run.checkpoint_every": 2,
            "eval.every": 100,
            "schedule.milestones": "[]",
            "optim.lr": 1e-3,
            "run.keep_checkpoints": 5,
        },
    )
    real_lr_at = train.lr_at
    try:
        train.lr_at = lambda it, base, schedule: real_lr_at(it, base, schedule) * (1e30 if it >= 4 else 1)
        assert train.main(["--config", str(CIFAR), *overrides]) == 1
    finally:
        train.lr_at = real_lr_at
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and ("non-finite" in err or "loss is" in err), err
    assert "iteration" in err and "(lr 1e+27)" in err, err
    (run,) = mlflow.search_runs(experiment_names=["cifar10"], output_format="list")
    assert run.info.status == "FAILED"
    saved = checkpoint.list_checkpoints(tmp_path / "run")
    assert saved and saved[0].name == "ckpt-00000002.pt"
    for path in saved:
        assert checkpoint.verify(path) is None
        assert all(torch.isfinite(t).all() for t in torch.load(path, weights_only=True)["model"].values())


# --- 7. two jobs, one run directory -------------------------------------------------------
def test_second_job_on_the_same_run_directory_is_refused(cifar_tar, tmp_path):
    """Fault: the same job submitted twice (a double sbatch, a requeue racing the original).
    Injected: a second training started on the run directory of a running one.
    Suite: the second is refused in one line naming the holder (pid, host), exit status 2; the first goes on.
    Lost: nothing; the two never write the same checkpoints."""
    overrides = tiny_overrides(
        cifar_tar, 3000, **{"run.dir": tmp_path / "run", "eval.every": 5000, "run.checkpoint_every": 5000}
    )
    first = subprocess.Popen(
        [sys.executable, TRAIN, "--config", str(CIFAR), *overrides],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(
            lambda: (tmp_path / "run" / ".lock").exists() and (tmp_path / "run" / ".lock").read_text(), 120, "the lock"
        )
        second = subprocess.run(
            [sys.executable, TRAIN, "--config", str(CIFAR), *overrides],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2
        assert second.stderr.strip() == (
            f"error: run directory {tmp_path / 'run'} is in use by pid {first.pid} on "
            f"{os.uname().nodename}; wait for it, stop it, or set run.dir (or seed) to start "
            "a separate run"
        )
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()


# --- 4. resuming: the end of a run, and resumes the tracking store cannot take -------------
def _only_run():
    (run,) = mlflow.search_runs(experiment_names=["cifar10"], output_format="list")
    return run


def test_stop_during_the_last_iteration_still_finishes_the_run(cifar_tar, tmp_path, monkeypatch):
    """Fault: a stop request during a run's last iteration (SLURM's warning signal, a shutdown, Ctrl-C).
    Injected: SIGTERM from the process itself during the last of 4 iterations.
    Suite: not a stop: the run makes its final evaluation, logs it and ends FINISHED with exit status 0.
    Lost: nothing (before, the run was left KILLED for good: a resume found it trained to the end and did nothing)."""
    overrides = tiny_overrides(cifar_tar, 4, **{"run.dir": tmp_path / "run"})
    sigterm_during(monkeypatch, 3)
    assert train.main(["--config", str(CIFAR), *overrides]) == 0
    run = _only_run()
    assert run.info.status == "FINISHED" and "test_top1_err" in run.data.metrics
    assert (tmp_path / "run" / "final_metrics.json").exists()


def test_a_run_killed_after_its_last_checkpoint_is_finished_by_the_same_command(cifar_tar, tmp_path, caplog):
    """Fault: the job dies (SIGKILL, a node failure) after its last checkpoint but before MLflow marked the run
    FINISHED: while it logged the network or waited for a slow server to take its last metrics.
    Injected: a finished run's MLflow status set back to RUNNING (what such a death leaves), then the same command.
    Suite: the run is not called complete: the final checkpoint is evaluated and logged again and the same MLflow run
    ends FINISHED; a third start finds it complete and does nothing.
    Lost: nothing; the final evaluation is repeated."""
    overrides = tiny_overrides(cifar_tar, 4, **{"run.dir": tmp_path / "run"})
    assert train.main(["--config", str(CIFAR), *overrides]) == 0
    first = _only_run()
    mlflow.MlflowClient().update_run(first.info.run_id, status="RUNNING")
    caplog.set_level("INFO")
    assert train.main(["--config", str(CIFAR), *overrides]) == 0
    assert f"MLflow run {first.info.run_id} is not FINISHED; evaluating and finishing it" in caplog.text
    again = _only_run()
    assert again.info.run_id == first.info.run_id and again.info.status == "FINISHED"
    assert again.data.metrics["test_top1_err"] == first.data.metrics["test_top1_err"]
    caplog.clear()
    assert train.main(["--config", str(CIFAR), *overrides]) == 0
    assert "is already complete" in caplog.text and "finishing it" not in caplog.text


@pytest.mark.parametrize("change", ["another tracking store", "run deleted", "other data"])
def test_a_resume_that_would_log_elsewhere_or_mix_data_is_refused(change, cifar_tar, tmp_path, monkeypatch, capsys):
    """Fault: a stopped run resumed against another tracking store (MLFLOW_TRACKING_URI changed between SLURM
    requeues, the job started from another folder), after its MLflow run was deleted, or on other data
    (data.path changed while run.dir stays).
    Injected: a run stopped by SIGTERM at iteration 3 of 6, then the same command with that change.
    Suite: refused before training, in one line that names the run and the store or both data sets, and the fix;
    exit status 2. Before, the first two were a traceback from MLflow and the third trained on, mixing data sets in one run.
    Lost: nothing: the checkpoint stays, and resumed as the run began it finishes into its own MLflow run."""
    overrides = tiny_overrides(cifar_tar, 6, **{"run.dir": tmp_path / "run", "run.checkpoint_every": 100})
    real_lr_at = sigterm_during(monkeypatch, 2)
    assert train.main(["--config", str(CIFAR), *overrides]) == 128 + signal.SIGTERM
    monkeypatch.setattr(train, "lr_at", real_lr_at)
    stopped = _only_run()
    resume, store = overrides, os.environ["MLFLOW_TRACKING_URI"]
    if change == "another tracking store":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
        expected = f"which the tracking store sqlite:///{tmp_path / 'other.db'} does not hold; set MLFLOW_TRACKING_URI"
    elif change == "run deleted":
        mlflow.MlflowClient().delete_run(stopped.info.run_id)
        expected = f"MLflow run {stopped.info.run_id}, which is deleted in {store}; restore it"
    else:
        other = make_cifar_tree(tmp_path / "other", seed=1)
        resume = tiny_overrides(other, 6, **{"run.dir": tmp_path / "run", "run.checkpoint_every": 100})
        expected = f"trained on other data (fingerprint {stopped.data.tags['reproduce.data_fingerprint']}"
    capsys.readouterr()
    assert train.main(["--config", str(CIFAR), *resume]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the checkpoints in ") and expected in err and "\n" not in err, err
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "run")] == ["ckpt-00000003.pt"]
    assert not (tmp_path / "other.db").exists()  # no empty store made where the run was never logged

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    if change == "run deleted":
        mlflow.MlflowClient().restore_run(stopped.info.run_id)
    assert train.main(["--config", str(CIFAR), *overrides]) == 0
    assert (_only_run().info.run_id, _only_run().info.status) == (stopped.info.run_id, "FINISHED")
