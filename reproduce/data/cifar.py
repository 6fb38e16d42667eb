"""CIFAR-10 sources, all decoded once into uint8 arrays (N, 32, 32, 3) and int64 labels.

Accepted `data.path` values:
  null                       torchvision's download into ./data (needs network)
  .../cifar-10-batches-py    the original python batches (or the folder that holds it)
  .../tree                   an image-folder tree: train/<class>/*, test/<class>/*
  .../cifar.tar.gz           a .tar(.gz) of such a tree, read without unpacking
Image trees are decoded once and cached as .npz under ~/.cache/reproduce (or
$REPRODUCE_CACHE), keyed by the source's path, size and modification time.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp")


class DataError(RuntimeError):
    """A dataset that cannot be used; the message is one line for the user."""


@dataclass(frozen=True)
class CifarArrays:
    train_x: np.ndarray  # (50000, 32, 32, 3) uint8, HWC
    train_y: np.ndarray  # (50000,) int64
    test_x: np.ndarray
    test_y: np.ndarray
    source: str  # what was read, for the run's description
    lossy: bool = False  # decoded from JPEG files: not the original CIFAR-10 pixels


def load_cifar10(path: Path | None, download_root: Path = Path("data")) -> CifarArrays:
    if path is None:
        return _torchvision(download_root, download=True)
    path = Path(path)
    if not path.exists():
        raise DataError(f"CIFAR-10 source {path} does not exist; set data.path to a cifar-10-batches-py folder, an image tree or a .tar.gz")
    if path.is_dir():
        if (path / "data_batch_1").exists():
            return _torchvision(path.parent, download=False)
        if (path / "cifar-10-batches-py").is_dir():
            return _torchvision(path, download=False)
        if (path / "train").is_dir() and (path / "test").is_dir():
            return _cached(path, _read_tree)
        raise DataError(f"{path} holds neither cifar-10-batches-py nor train/ and test/ class folders")
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        return _cached(path, _read_tar)
    raise DataError(f"{path} is not a folder or a .tar/.tar.gz archive of CIFAR-10")


def _torchvision(root: Path, download: bool) -> CifarArrays:
    from torchvision.datasets import CIFAR10

    try:
        train = CIFAR10(str(root), train=True, download=download)
        test = CIFAR10(str(root), train=False, download=download)
    except (RuntimeError, OSError) as err:  # torchvision: "Dataset not found or corrupted", URLError
        hint = "no network? set data.path to a local copy" if download else "the batches are missing or corrupt"
        raise DataError(f"CIFAR-10 in {root}: {str(err).splitlines()[0]} ({hint})") from None
    return CifarArrays(train.data, np.asarray(train.targets, np.int64), test.data, np.asarray(test.targets, np.int64),
                       f"cifar-10-batches-py in {root}")


def _cached(path: Path, reader) -> CifarArrays:
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache_dir = Path(os.environ.get("REPRODUCE_CACHE", Path.home() / ".cache" / "reproduce"))
    cache = cache_dir / f"cifar10-v2-{key}.npz"
    if cache.exists():
        try:
            with np.load(cache) as z:
                return CifarArrays(z["train_x"], z["train_y"], z["test_x"], z["test_y"], str(path), bool(z["lossy"]))
        except (OSError, ValueError, KeyError, EOFError):
            cache.unlink(missing_ok=True)  # a damaged cache is rebuilt from the source
    arrays = reader(path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=cache_dir)
    with os.fdopen(fd, "wb") as f:
        np.savez(f, train_x=arrays.train_x, train_y=arrays.train_y, test_x=arrays.test_x, test_y=arrays.test_y,
                 lossy=arrays.lossy)
    os.replace(tmp, cache)
    return arrays


def _decode(name: str, blob: bytes) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(blob)) as img:
            arr = np.asarray(img.convert("RGB"))
    except Exception as err:  # PIL raises many types for a bad file
        raise DataError(f"cannot decode image {name}: {err}") from None
    if arr.shape != (32, 32, 3):
        raise DataError(f"image {name} is {arr.shape[1]}x{arr.shape[0]}, CIFAR-10 images are 32x32")
    return arr


def _assemble(files: dict[str, list[tuple[str, int, bytes]]], source: str) -> CifarArrays:
    out = []
    for split in ("train", "test"):
        items = sorted(files.get(split, []))
        if not items:
            raise DataError(f"{source} has no {split}/<class>/ images")
        out.append(np.stack([_decode(name, blob) for name, _, blob in items]))
        out.append(np.array([label for _, label, _ in items], np.int64))
    lossy = any(name.lower().endswith((".jpg", ".jpeg")) for items in files.values() for name, _, _ in items)
    return CifarArrays(out[0], out[1], out[2], out[3], source, lossy)


def _split_name(name: str) -> tuple[str, str] | None:
    """('train', class) for 'train/<class>/<file>' (any leading folders), else None."""
    parts = Path(name).parts
    for i, part in enumerate(parts[:-2]):
        if part in ("train", "test") and len(parts) == i + 3 and name.lower().endswith(IMAGE_SUFFIXES):
            return part, parts[i + 1]
    return None


def _label(cls: str, source: str) -> int:
    if cls not in CLASSES:
        raise DataError(f"{source}: class folder '{cls}' is not a CIFAR-10 class ({', '.join(CLASSES)})")
    return CLASSES.index(cls)


def _read_tree(root: Path) -> CifarArrays:
    files: dict[str, list] = {}
    for split in ("train", "test"):
        for f in (root / split).rglob("*"):
            hit = _split_name(str(f.relative_to(root)))
            if hit:
                files.setdefault(split, []).append((str(f), _label(hit[1], str(root)), f.read_bytes()))
    return _assemble(files, str(root))


def _read_tar(archive: Path) -> CifarArrays:
    files: dict[str, list] = {}
    try:
        with tarfile.open(archive) as tf:
            for member in tf:
                hit = _split_name(member.name) if member.isfile() else None
                if hit:
                    blob = tf.extractfile(member).read()
                    files.setdefault(hit[0], []).append((f"{archive}:{member.name}", _label(hit[1], str(archive)), blob))
    except DataError:
        raise
    except Exception as err:  # tarfile, gzip and zlib raise several types for a damaged archive
        reason = "the file is empty" if archive.stat().st_size == 0 else (str(err).splitlines() or [type(err).__name__])[0]
        raise DataError(f"cannot read archive {archive}: {reason} (truncated or not a tar file?)") from None
    return _assemble(files, str(archive))
