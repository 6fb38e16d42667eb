"""Checkpoints: complete, atomic, rotated, found automatically on start.

A checkpoint holds everything a resumed run needs to continue exactly as if it had not
stopped: the unwrapped model, the optimizer, the AMP scaler, the iteration (which also
fixes the data position: the input order is a pure function of seed and iteration), every
RNG state, the MLflow run id, the resolved config and the git commit. It is written to a
temporary file, fsync'ed and renamed, so a crash mid-write never replaces a good file.
Files are read with `torch.load(weights_only=True)`: a checkpoint cannot run code.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("reproduce.checkpoint")
NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


def path_for(run_dir: Path, iteration: int) -> Path:
    return Path(run_dir) / f"ckpt-{iteration:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints in `run_dir`, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if NAME.match(p.name))


def save(run_dir: Path, iteration: int, state: dict[str, Any], keep: int) -> Path:
    """Write `state` atomically as ckpt-<iteration>.pt, then drop all but the newest `keep`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = path_for(run_dir, iteration)
    fd, tmp = tempfile.mkstemp(prefix=final.name + ".", suffix=".tmp", dir=run_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(run_dir)
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return final


def load_latest(run_dir: Path) -> dict[str, Any] | None:
    """The newest checkpoint in `run_dir`, or None when there is none."""
    found = list_checkpoints(run_dir)
    if not found:
        return None
    log.info("found checkpoint %s", found[-1])
    return torch.load(found[-1], map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
