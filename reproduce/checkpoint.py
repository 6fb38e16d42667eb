"""Checkpoints: complete, atomic, checksummed, rotated, found automatically on start.

A checkpoint holds everything a resumed run needs to continue exactly as if it had not
stopped: the unwrapped model, the optimizer, the iteration (which also fixes the data
position: the input order is a pure function of seed and iteration), every RNG state, the
MLflow run id, the resolved config and the git commit.

On disk: `ckpt-<iteration>.pt` (a plain torch.save file) and `ckpt-<iteration>.pt.sha256`
(its digest). Each is written to a temporary file, fsync'ed and renamed, digest first, so
a crash mid-write never replaces a good checkpoint. On resume a checkpoint whose digest is
missing or wrong (truncated, bit-flipped) is set aside as `*.corrupt` (never deleted) and
the previous one is used. Files are read with `torch.load(weights_only=True)`: a
checkpoint file from elsewhere cannot run code.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from reproduce import distributed
from reproduce.errors import Refused
from reproduce.io import atomic_write_bytes
from reproduce.models import Arch

log = logging.getLogger("reproduce.checkpoint")
NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


class RunDirBusy(Refused, RuntimeError):
    """Another live job holds the run directory."""


class CheckpointError(Refused, RuntimeError):
    """A checkpoint that cannot be used; the message is one line."""


def path_for(run_dir: Path, iteration: int) -> Path:
    return Path(run_dir) / f"ckpt-{iteration:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints in `run_dir`, oldest first (set-aside `.corrupt` files are not listed)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if NAME.match(p.name))


def save(run_dir: Path, iteration: int, state: dict[str, Any], keep: int) -> Path:
    """Write `state` atomically as ckpt-<iteration>.pt with its digest, then drop all but the
    newest `keep` checkpoints."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    blob = buffer.getbuffer()
    final = path_for(run_dir, iteration)
    atomic_write_bytes(final.with_name(final.name + ".sha256"), hashlib.sha256(blob).hexdigest().encode() + b"\n")
    atomic_write_bytes(final, blob)
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
        old.with_name(old.name + ".sha256").unlink(missing_ok=True)
    return final


def verify(path: Path, actual: str | None = None) -> str | None:
    """None if `path` matches its digest, else what is wrong with it. `actual`: the file's sha256
    where the caller has already computed it (the file is then not read again)."""
    digest_file = path.with_name(path.name + ".sha256")
    if not digest_file.exists():
        return "its .sha256 digest file is missing"
    expected = digest_file.read_text().strip()
    actual = actual or hashlib.sha256(path.read_bytes()).hexdigest()
    return None if actual == expected else f"sha256 {actual[:12]}... does not match the recorded {expected[:12]}..."


def find_latest(run_dir: Path) -> Path | None:
    """The newest intact checkpoint in `run_dir`, or None. Damaged ones are renamed to
    `*.corrupt` with a warning, and the next older one is tried. Call on one rank only."""
    for path in reversed(list_checkpoints(run_dir)):
        problem = verify(path)
        if problem is None:
            return path
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        log.warning("checkpoint %s is damaged (%s); set aside as %s, using the previous one", path, problem, aside.name)
    return None


def load(path: Path, verified: bool = False) -> dict[str, Any]:
    """Tensors and plain containers only (weights_only): loading cannot run code. With
    verified=False the digest is checked here (find_latest has already checked its pick)."""
    path = Path(path)
    if not verified:
        problem = verify(path) if path.exists() else "it does not exist"
        if problem:
            raise CheckpointError(f"checkpoint {path} cannot be used: {problem}")
    state = _torch_load(path, path)
    log.info("resuming from %s (iteration %d)", path, state["iteration"])
    return state


def read(path: Path) -> tuple[dict[str, Any], str]:
    """(state, sha256) of a checkpoint from one read of the file, for those that only read a run
    directory (`reproduce evaluate`, model.init): its digest checked, then loaded as `load` loads
    it. CheckpointError in one line otherwise; nothing is renamed or changed."""
    path = Path(path)
    blob, digest, problem = _read_checked(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} cannot be used: {problem}")
    return _torch_load(io.BytesIO(blob), path), digest


def read_latest(run_dir: Path) -> tuple[Path, dict[str, Any], str] | None:
    """(path, state, sha256) of the newest intact checkpoint in `run_dir`, each file read once, or
    None. A damaged one is named in a warning and left as it is (unlike find_latest, which sets
    it aside for the run that resumes): a reader never changes the folder it reads."""
    for path in reversed(list_checkpoints(run_dir)):
        blob, digest, problem = _read_checked(path)
        if problem is None:
            return path, _torch_load(io.BytesIO(blob), path), digest
        log.warning("checkpoint %s is damaged (%s); left as it is, using the previous one", path, problem)
    return None


def _read_checked(path: Path) -> tuple[bytes, str, str | None]:
    """The bytes of `path`, their sha256, and what is wrong with them (None: they match the digest)."""
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        return b"", "", "it does not exist"
    digest = hashlib.sha256(blob).hexdigest()
    return blob, digest, verify(path, digest)


def _torch_load(source, path: Path) -> dict[str, Any]:
    """torch.load of `source` (the file `path`, or its bytes), tensors and plain containers only."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for foreign objects, RuntimeError for a damaged zip
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]  # EOFError of a 0-byte file: ''
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded safely ({first}); "
            "move it out of the run directory to start over from the previous one"
        ) from None


def contents(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    iteration: int,
    mlflow_run_id: str | None,
    cfg,
    git,
    numerics,
) -> dict[str, Any]:
    """Everything a resumed run needs, from the unwrapped model (never a DDP or compiled
    wrapper, whose key names differ). bf16 autocast needs no loss scaling, so there is no
    GradScaler state to keep. `cfg` is the run's Config, `git` its provenance.GitState,
    `numerics` its engine.Numerics (a resumed run keeps what `auto` chose)."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "iteration": iteration,
        "rng": rng_state(),
        "mlflow_run_id": mlflow_run_id,
        "config": cfg.model_dump(mode="json"),
        "git_commit": git.commit,
        "architecture": architecture(cfg.model),
        "numerics": {"amp": numerics.amp, "channels_last": numerics.channels_last, "how": numerics.how},
    }


@dataclass(frozen=True)
class Resume:
    """Where a run directory's newest intact checkpoint leaves a run: what a resumed run restores."""

    path: Path
    state: dict[str, Any]

    @property
    def iteration(self) -> int:
        return self.state["iteration"]

    @property
    def run_id(self) -> str | None:
        """The MLflow run the checkpoints continue."""
        return self.state.get("mlflow_run_id")

    @property
    def numerics(self) -> dict[str, Any] | None:
        """run.amp / run.channels_last as decided when the run began (older checkpoints: None)."""
        return self.state.get("numerics")

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
        """Weights, optimizer state and every RNG as they were; the iteration to go on from."""
        model.load_state_dict(self.state["model"])
        optimizer.load_state_dict(self.state["optimizer"])
        set_rng_state(self.state["rng"])
        return self.iteration


def resume_point(cfg, info) -> Resume | None:
    """The checkpoint `cfg`'s run directory resumes from (rank 0 finds it and checks its digest; every
    rank loads it), or None for a new run. CheckpointError when it was made for another network or
    recipe: never load weights into another network, nor continue a run with another recipe."""
    latest = distributed.broadcast_object(find_latest(cfg.run_dir()) if info.is_main else None, info)
    if latest is None:
        return None
    state = load(latest, verified=True)
    check_architecture(state, cfg.model, latest)
    check_recipe(state, cfg, latest)
    return Resume(latest, state)


def architecture(model_cfg) -> dict[str, Any]:
    """What a config's network is: {name, shortcut as resolved (None for plain nets), variant}, the
    stored form of models.Arch (its as_dict; Arch.from_dict reads it back)."""
    return Arch.of(model_cfg.name, model_cfg.shortcut, model_cfg.variant).as_dict()


def architecture_of(state: dict[str, Any]) -> dict[str, Any]:
    """The architecture a checkpoint was made for (older checkpoints: from their config)."""
    if "architecture" in state:
        return state["architecture"]
    from reproduce.config import ModelConfig

    return architecture(ModelConfig(**state["config"]["model"]))


def check_architecture(state: dict[str, Any], model_cfg, path: Path) -> None:
    """CheckpointError, in one line naming both, when `state` was made for another network."""
    found, want = architecture_of(state), architecture(model_cfg)
    if found != want:
        show = lambda a: f"{a['name']} (shortcut {a['shortcut']}, {a['variant']})"  # noqa: E731
        raise CheckpointError(
            f"checkpoint {path} holds {show(found)} but the config asks for {show(want)}; "
            "set run.dir to another folder or model.* to the checkpoint's"
        )


# Config keys a resume may change -- the ones Config.recipe_hash leaves out, less the experiment
# (the MLflow run lives in one): where the data lies, how fast it loads, how often the run is
# evaluated, the errors it watches for, and kept. Of run.*, the numerics (amp, deterministic) are part of the recipe.
RESUME_MAY_CHANGE = ("run.", "data.path", "data.workers", "eval.batch_size", "eval.every", "eval.target_top1_err")
RECIPE_RUN_KEYS = ("run.amp", "run.deterministic")


def _may_change(key: str) -> bool:
    return key.startswith(RESUME_MAY_CHANGE) and key not in RECIPE_RUN_KEYS


def check_recipe(state: dict[str, Any], cfg, path: Path) -> None:
    """CheckpointError, in one line naming each changed key with both values, when `state` was
    trained with another recipe or seed than `cfg` (possible under an explicit run.dir: the default
    one is named after the recipe hash). Resuming would mix two recipes in one MLflow run whose
    params keep the first. Keys an older checkpoint does not know are not compared."""
    from reproduce.config import _flatten

    then = dict(_flatten(state.get("config") or {}))
    now = dict(_flatten(cfg.model_dump(mode="json")))
    changed = [k for k in now if k in then and now[k] != then[k] and not _may_change(k)]
    if changed:
        pairs = ", ".join(f"{k} {then[k]!r} -> {now[k]!r}" for k in changed)
        raise CheckpointError(
            f"checkpoint {path} was trained with another recipe ({pairs}); resume with the same "
            "settings, or set run.dir to another folder to start a new run"
        )


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def lock_run_dir(run_dir: Path):
    """Hold an exclusive lock on `run_dir` for the life of the process (released by the OS
    when it exits, however it exits). Raises RunDirBusy naming the holder when another job
    has it, so two jobs never write the same checkpoints."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunDirBusy(
            f"run directory {run_dir} is in use by {holder}; wait for it, stop it, or set run.dir "
            "(or seed) to start a separate run"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle
