"""The <split>.manifest.json beside each .beton file, written and read here: `reproduce prepare`
(prepare.py) puts a finished file and its manifest in place with `install_beton`; the loaders
(loaders.py) check a file's manifest against the config (`read_manifest`), the file against its
manifest (`check_size`, then FFCV's structural check in pipeline.py) and the splits of a folder
against each other (`same_preparation`). A BetonSplit is a file with its manifest. What a
manifest holds is listed in prepare.py's docstring.

Importing this module imports neither FFCV nor another module of this package.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from reproduce.config import Config
from reproduce.data.base import DataError
from reproduce.io import atomic_replace, atomic_write_text

MANIFEST_FORMAT = "reproduce-beton-1"


def manifest_path(beton: Path) -> Path:
    return beton.with_name(beton.name.removesuffix(".beton") + ".manifest.json")


def ffcv_version() -> str:
    from importlib.metadata import version

    return version("ffcv")


@dataclass(eq=False)
class BetonSplit:
    """One prepared split: its .beton file, its manifest and how to decode it."""

    path: Path
    manifest: dict
    role: str  # "train", "eval" or "tencrop"
    _loaders: dict = field(default_factory=dict, repr=False)
    _stats: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return int(self.manifest["images"])

    @property
    def dataset(self) -> str:
        return self.manifest["dataset"]


# ---------------------------------------------------------------------------------------
# Reading


def read_manifest(beton: Path, cfg: Config) -> dict:
    """The manifest of `beton`, which exists, is of this format and holds data.dataset; or
    DataError saying how to write the file again."""
    how = f"write it with: reproduce prepare {cfg.data.dataset} --source SOURCE --out {beton.parent}"
    if not beton.is_file():
        raise DataError(f"{beton} not found; {how}")
    try:
        manifest = json.loads(manifest_path(beton).read_text())
    except FileNotFoundError:
        raise DataError(f"{manifest_path(beton)} not found (every .beton needs its manifest); {how}") from None
    except (OSError, ValueError) as err:
        raise DataError(f"{manifest_path(beton)} is unreadable ({err}); {how}") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{manifest_path(beton)} is not a manifest of format {MANIFEST_FORMAT}; {how}")
    if manifest["dataset"] != cfg.data.dataset:
        raise DataError(f"{beton} holds {manifest['dataset']} but data.dataset is {cfg.data.dataset}")
    return manifest


def check_size(beton: Path, manifest: dict) -> int:
    """The size of `beton` in bytes, which is the size its manifest records; or DataError."""
    size = beton.stat().st_size
    if size != manifest["bytes"]:
        raise DataError(
            f"{beton} has {size} bytes but was written with {manifest['bytes']} (truncated or overwritten?); "
            f"prepare it again"
        )
    return size


def same_preparation(first: BetonSplit, *others: BetonSplit | None, keys: tuple[str, ...]) -> None:
    """DataError unless the manifests of `others` (None skipped) agree with `first`'s on `keys`
    (the writer's settings apart from how many images it stored as JPEG)."""
    for other in filter(None, others):
        for key in keys:
            if key == "writer":
                differ = {k: v for k, v in other.manifest[key].items() if k != "stored_jpeg"} != {
                    k: v for k, v in first.manifest[key].items() if k != "stored_jpeg"
                }
            else:
                differ = other.manifest[key] != first.manifest[key]
            if differ:
                raise DataError(
                    f"{first.path.parent}: {first.path.name} and {other.path.name} come from different "
                    f"preparations ({key} differs); prepare the folder again"
                )


# ---------------------------------------------------------------------------------------
# Writing


def install_beton(tmp: Path, beton: Path, fields: dict) -> None:
    """Move the finished file `tmp` to `beton` and write its manifest: the format, `fields` (what
    the file holds and how it was written), the FFCV version, the file's size and sha256. The old
    manifest is removed first: never a new file beside an old manifest."""
    manifest = {
        "format": MANIFEST_FORMAT,
        **fields,
        "ffcv": ffcv_version(),
        "bytes": tmp.stat().st_size,
        "sha256": _sha256(tmp),
    }
    manifest_path(beton).unlink(missing_ok=True)
    atomic_replace(tmp, beton)
    atomic_write_text(
        manifest_path(beton),
        "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in manifest.items()) + "\n}\n",
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(partial(f.read, 1 << 24), b""):
            h.update(block)
    return h.hexdigest()
