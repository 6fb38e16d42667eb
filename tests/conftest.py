"""Shared fixtures: isolated MLflow store and cache, a tiny generated CIFAR-10 tree, the
real data in ../shared/data when present, and helpers to run the CLI for real."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import hypothesis  # noqa: F401  (see below)
import numpy as np
import pytest
import torch
from PIL import Image

# hypothesis is imported here, at start-up, while the process has one thread. Otherwise its pytest
# plugin imports it in the terminal summary of a session that did not use it, and pytest's
# assertion rewriting then parses its modules beside the background threads earlier tests left
# (numba, MLflow): there CPython 3.11.7 has failed with "SystemError: AST constructor recursion
# depth mismatch" (a CPython bug, fixed in later 3.11 releases), failing a run whose tests passed.

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def shared_file(name: str) -> Path:
    """A file of ../shared/data, or skip the test saying what is missing."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent (real data lives in ../shared/data; see its README)")
    return path


# Skips that must not pass unnoticed where everything can run. `.ci/run` installs FFCV, SLURM,
# shellcheck and headless Chromium itself, so it sets REPRODUCE_REQUIRE="ffcv slurm data browser":
# a test skipped for one of these reasons then fails instead (FFCV installed but failing to import
# would otherwise skip 20 tests in silence). "data" applies only when ../shared/data exists: a
# clone without it skips.
REQUIRED_SKIPS = {
    "ffcv": ("FFCV is not installed", "could not import 'ffcv'"),
    "slurm": ("apt-get install slurmctld", "shellcheck is absent", "runs its daemons as root"),
    "data": ("is absent (real data lives in ../shared/data",),
    "browser": ("apt-get install -y --no-install-recommends chromium chromium-driver", "could not import 'selenium'"),
}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped:
        return
    reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
    for need in os.environ.get("REPRODUCE_REQUIRE", "").split():
        if need == "data" and not SHARED_DATA.is_dir():
            continue
        if any(marker in reason for marker in REQUIRED_SKIPS.get(need, ())):
            report.outcome = "failed"
            report.longrepr = f"skipped, but REPRODUCE_REQUIRE includes {need!r}: {reason}"


# One thread per process: the suite also runs 2-process DDP jobs and shares 2 cores; with
# two threads each, a process waiting for the other core's work spins and runs 10-100x slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Every test runs in its own folder with its own MLflow store; the decoded-data cache
    is shared by the session so real data is decoded once."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv(
        "REPRODUCE_CACHE", str(Path(os.environ.get("REPRODUCE_TEST_CACHE", tmp_path.parent / "reproduce-cache")))
    )
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    yield


def make_cifar_tree(root: Path, train_per_class: int = 24, test_per_class: int = 6, seed: int = 0) -> Path:
    """A CIFAR-shaped image tree whose classes differ in colour, so a net can learn it."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for label, cls in enumerate(CLASSES):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            base = np.array([(label * 25) % 256, (label * 70) % 256, (255 - label * 25) % 256])
            for i in range(count):
                pixels = np.clip(base + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return root


@pytest.fixture(scope="session")
def cifar_tree(tmp_path_factory) -> Path:
    return make_cifar_tree(tmp_path_factory.mktemp("cifar") / "tree")


@pytest.fixture(scope="session")
def cifar_tar(cifar_tree) -> Path:
    archive = cifar_tree.parent / "cifar-tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for split in ("train", "test"):
            tf.add(cifar_tree / split, arcname=split)
    return archive


def tiny_overrides(data: Path, iterations: int = 6, **extra) -> list[str]:
    """A ResNet-20 run small enough for a few seconds on one CPU core."""
    values = {
        "data.path": str(data),
        "data.val_split": 40,
        "data.workers": 0,
        "optim.batch_size": 16,
        "schedule.iterations": iterations,
        "schedule.milestones": f"[{iterations // 2}]",
        "eval.every": max(1, iterations // 2),
        "eval.batch_size": 64,
        "run.checkpoint_every": max(1, iterations // 2),
        "run.log_every": 1,
        "run.deterministic": "true",
        "run.progress": "false",
        "run.device": "cpu",
        "run.log_model": "false",  # 3 s per run; the MLflow model has tests of its own (test_tracking.py)
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def sigterm_during(monkeypatch, iteration: int):
    """From now on, train.py gets SIGTERM from itself during `iteration` (0-based), as a
    scheduler's signal would arrive mid-run. Returns the real lr_at, to put back for the resume."""
    import signal

    from reproduce import train

    real_lr_at = train.lr_at

    def lr_then_sigterm(it, *args):
        if it == iteration:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_lr_at(it, *args)

    monkeypatch.setattr(train, "lr_at", lr_then_sigterm)
    return real_lr_at


def stop_and_resume_matches_straight(data: Path, tmp_path: Path, monkeypatch, **extra) -> None:
    """8 iterations straight against 4, SIGTERM (as a scheduler's, during the 4th iteration),
    resume 4 more: asserts the exit statuses and bitwise-identical final weights."""
    import signal

    from reproduce import checkpoint, train

    config = str(REPO / "configs" / "cifar10" / "resnet20.yaml")
    straight = tiny_overrides(
        data, iterations=8, **{"run.dir": tmp_path / "straight", "run.checkpoint_every": 100, **extra}
    )
    assert train.main(["--config", config, *straight]) == 0
    resumed = tiny_overrides(
        data, iterations=8, **{"run.dir": tmp_path / "resumed", "run.checkpoint_every": 100, **extra}
    )
    real_lr_at = sigterm_during(monkeypatch, 3)
    assert train.main(["--config", config, *resumed]) == 128 + signal.SIGTERM
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "resumed")] == ["ckpt-00000004.pt"]
    monkeypatch.setattr(train, "lr_at", real_lr_at)
    assert train.main(["--config", config, *resumed]) == 0
    a, b = (
        torch.load(checkpoint.list_checkpoints(tmp_path / d)[-1], weights_only=True)["model"]
        for d in ("straight", "resumed")
    )
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def run_cli(
    *args: str, env: dict | None = None, timeout: float = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """`python -m reproduce.cli ARGS` in a fresh process, as a user would run it."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "reproduce.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=cwd,
    )
