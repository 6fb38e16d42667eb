"""Atomic writes: the one way the suite puts a file on disk that a reader may depend on.

Each writes to a temporary file in the target's folder, fsyncs it, renames it over the
target and fsyncs the folder, so a crash or a signal mid-write leaves either the old file or
the new one, never a torn one, and a completed write survives a power cut.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | Path, data: bytes | memoryview) -> Path:
    """Write `data` to `path` atomically (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # what open() would give; mkstemp's 0600 would hide results from others
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any, **dump_kwargs) -> Path:
    return atomic_write_text(path, json.dumps(obj, **dump_kwargs) + ("\n" if dump_kwargs.get("indent") else ""))


def atomic_replace(tmp: str | Path, path: str | Path) -> Path:
    """Move a finished temporary file written by someone else (FFCV's writer, np.savez) into
    place: fsync it, rename it, fsync the folder."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)
    return Path(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder: str | Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
