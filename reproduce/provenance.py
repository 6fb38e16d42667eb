"""Where a number came from: the repository, its git state, the host and the device.

The one place that computes the repository root and reads git. The suite's code records
`code_state()`: the checkout's git state read once per process, at its first use, so that the
runs a sweep or study trains one after another in one process all carry the commit of the code
that process loaded, not HEAD as it was when each started.
"""

from __future__ import annotations

import functools
import platform
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent  # the checkout: configs/, results/, slurm/, tests/
CONFIGS = REPO / "configs"
RESULTS = REPO / "results"
# Untracked files here change what runs, so they make a checkout dirty; elsewhere (runs/,
# mlflow.db, data) they do not.
CODE_PATHS = ("reproduce", "configs", "slurm", "tests", "tools", "pyproject.toml")


@dataclass(frozen=True)
class GitState:
    commit: str  # "unknown" outside a git checkout
    dirty: bool  # modified tracked files, or untracked files under CODE_PATHS

    def __str__(self) -> str:
        return self.commit + ("+dirty" if self.dirty else "")


def git_state(repo: Path = REPO) -> GitState:
    """The commit this code runs from and whether the working tree differs from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=all", "--", *CODE_PATHS],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return GitState("unknown", False)
    return GitState(commit, bool(status.strip()))


@functools.cache
def code_state() -> GitState:
    """git_state of this checkout, read once per process (see the module docstring)."""
    return git_state(REPO)


def host() -> str:
    return socket.gethostname()


def machine() -> str:
    """One line for beside a number: CPU model and cores, OS; the GPU when there is one."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    text = f"{cpu}, {os.cpu_count()} CPUs, {platform.platform()}"
    if torch.cuda.is_available():
        text += f"; {device_name(torch.device('cuda'))}"
    return text


def driver_version() -> str:
    """The NVIDIA driver (from nvidia-smi), or "none" without a CUDA GPU."""
    import subprocess

    if not torch.cuda.is_available():
        return "none"
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown (nvidia-smi failed)"


def device_name(device: torch.device) -> str:
    """The GPU's name for a CUDA device, else "none"."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "none"
