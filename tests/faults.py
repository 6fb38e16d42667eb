"""Helpers shared by the fault-injection tests (tests/test_faults_*.py).

Each fault test's docstring has four lines that `python tools/reliability.py` copies into
results/reliability.md: Fault / Injected / Suite / Lost.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import torch

from reproduce import checkpoint
from tests.conftest import REPO

CIFAR = REPO / "configs" / "cifar10" / "resnet20.yaml"
TRAIN = str(REPO / "reproduce" / "train.py")


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def _weights(run_dir: Path) -> dict:
    return torch.load(checkpoint.list_checkpoints(run_dir)[-1], weights_only=True)["model"]


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _steps(run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in mlflow.MlflowClient().get_metric_history(run_id, key))


def _torchrun(overrides: list[str], *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            *extra,
            TRAIN,
            "--config",
            str(CIFAR),
            *overrides,
        ],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _worker(parent: subprocess.Popen, rank: int) -> psutil.Process | None:
    """The training process of `rank` among torchrun's children (read from its environment)."""
    for child in psutil.Process(parent.pid).children(recursive=True):
        try:
            env = child.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if env.get("RANK") == str(rank) and "LOCAL_RANK" in env:
            return child
    return None
