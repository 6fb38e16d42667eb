"""Faults of the tracking side: the MLflow server dying or unreachable, secrets in the environment.

Every test here injects one fault for real; its docstring's Fault / Injected / Suite / Lost lines
go into results/reliability.md (tools/reliability.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from reproduce import checkpoint, train
from tests.conftest import tiny_overrides
from tests.faults import CIFAR, TRAIN, _env, _steps, _wait_for


# --- 4. the tracking server ---------------------------------------------------------------
def _start_server(store: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{store}",
            "--default-artifact-root",
            str(store.parent / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    import urllib.request

    def healthy():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                return r.read().strip() == b"OK"
        except OSError:
            return proc.poll() is not None and pytest.fail("mlflow server exited")

    _wait_for(healthy, 90, "the MLflow server", poll=0.5)
    return proc


def _stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("returns", ["during the run", "never"])
def test_tracking_server_dies_mid_run(returns, cifar_tar, tmp_path):
    """Fault: the MLflow server goes away mid-run (restart, network partition).
    Injected: SIGTERM to a real `mlflow server` after the first checkpoint; restarted 5 s later, or never.
    Suite: training goes on; metrics queue and are sent when the server is back; if it never is, they and the final status go to <run dir>/unsent-metrics.json and `reproduce sync` delivers them.
    Lost: nothing: every step's metrics reach the run, which ends FINISHED."""
    port, store = _free_port(), tmp_path / "server.db"
    uri = f"http://127.0.0.1:{port}"
    server = _start_server(store, port)
    iterations = 60
    overrides = tiny_overrides(
        cifar_tar,
        iterations,
        **{
            "run.dir": tmp_path / "run",
            "run.checkpoint_every": 5,
            "eval.every": 100,
            "run.tracking_flush_s": 60 if returns != "never" else 5,
        },
    )
    job = subprocess.Popen(
        [sys.executable, TRAIN, "--config", str(CIFAR), *overrides],
        env=_env(MLFLOW_TRACKING_URI=uri),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for(lambda: checkpoint.list_checkpoints(tmp_path / "run"), 240, "the first checkpoint")
        _stop_server(server)
        if returns == "never":
            out, _ = job.communicate(timeout=300)
            assert job.returncode == 0, out
            assert "send them with `reproduce sync" in out
            server = _start_server(store, port)
            result = subprocess.run(
                [sys.executable, "-m", "reproduce.cli", "sync", str(tmp_path / "run")],
                env=_env(MLFLOW_TRACKING_URI=uri),
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert result.returncode == 0, result.stderr
            assert not (tmp_path / "run" / "unsent-metrics.json").exists()
        else:
            time.sleep(5)
            server = _start_server(store, port)
            out, _ = job.communicate(timeout=300)
            assert job.returncode == 0, out
        os.environ["MLFLOW_TRACKING_URI"] = uri  # read at each call; the autouse fixture restores it
        (run,) = mlflow.search_runs(experiment_names=["cifar10"], output_format="list")
        assert run.info.status == "FINISHED"
        assert _steps(run.info.run_id, "train_loss") == list(range(1, iterations + 1))
        assert _steps(run.info.run_id, "test_top1_err") == [iterations]
    finally:
        job.kill()
        _stop_server(server)


def test_unreachable_tracking_server_is_refused_before_training(cifar_tar, tmp_path):
    """Fault: MLFLOW_TRACKING_URI points at a server that is not there.
    Injected: a URI on a closed local port.
    Suite: one line naming the URI and the fixes, exit status 2, before any training or checkpoint.
    Lost: nothing."""
    uri = f"http://127.0.0.1:{_free_port()}"
    overrides = tiny_overrides(cifar_tar, 4, **{"run.dir": tmp_path / "run"})
    result = subprocess.run(
        [sys.executable, TRAIN, "--config", str(CIFAR), *overrides],
        env=_env(MLFLOW_TRACKING_URI=uri),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"error: MLflow tracking server {uri} is unreachable"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not checkpoint.list_checkpoints(tmp_path / "run")


# --- 8. secrets ---------------------------------------------------------------------------
def test_secrets_in_the_environment_never_reach_mlflow(cifar_tar, tmp_path, monkeypatch):
    """Fault: credentials in the environment of the job (tokens, keys, passwords).
    Injected: MY_API_TOKEN, AWS_SECRET_ACCESS_KEY, DB_PASSWORD and HF_TOKEN set to marker values.
    Suite: no param, tag, metric name, artifact or run-directory file contains them (the suite logs the config, never the environment).
    Lost: nothing."""
    secrets = {
        "MY_API_TOKEN": "tok-8f3a1c",
        "AWS_SECRET_ACCESS_KEY": "aws-5e7d2b",
        "DB_PASSWORD": "pw-91c4e0",
        "HF_TOKEN": "hf-0b6f3d",
    }
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)
    overrides = tiny_overrides(cifar_tar, 4, **{"run.dir": tmp_path / "run"})
    assert train.main(["--config", str(CIFAR), *overrides]) == 0
    (run,) = mlflow.search_runs(experiment_names=["cifar10"], output_format="list")
    texts = [json.dumps(run.data.params), json.dumps(run.data.tags), json.dumps(list(run.data.metrics))]
    artifacts = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "artifacts")))
    texts += [p.read_bytes().decode(errors="replace") for p in artifacts.rglob("*") if p.is_file()]
    texts += [p.read_bytes().decode(errors="replace") for p in (tmp_path / "run").rglob("*") if p.is_file()]
    for value in secrets.values():
        assert not any(value in text for text in texts), value
