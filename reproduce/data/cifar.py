"""CIFAR-10 sources, all decoded once into uint8 arrays (N, 32, 32, 3) and int64 labels.

Accepted `data.path` values:
  null                       $REPRODUCE_CIFAR10 if set, else torchvision's download into ./data (needs network)
  .../cifar-10-batches-py    the original python batches (or the folder that holds it)
  .../tree                   an image-folder tree: train/<class>/*, test/<class>/*
  .../cifar.tar.gz           a .tar(.gz) of such a tree, read without unpacking
  .../subset.npz             the first N original images of each batch (<batch>_data_prefix, <batch>_labels)
Image trees are decoded once and cached as .npz under ~/.cache/reproduce (or
$REPRODUCE_CACHE), keyed by the source's path, size and modification time.

Also the CIFAR-10 protocol that every loader and `reproduce prepare` share: the fixed
train/validation split, the normalisation statistics and the data's fingerprint.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from reproduce.config import Config
from reproduce.data.base import DataError
from reproduce.io import atomic_replace

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # data.normalize=imagenet
LOSSY = " (lossy JPEG copy: errors are not comparable to the paper's to the decimal)"


@dataclass(frozen=True)
class CifarArrays:
    train_x: np.ndarray  # (50000, 32, 32, 3) uint8, HWC
    train_y: np.ndarray  # (50000,) int64
    test_x: np.ndarray
    test_y: np.ndarray
    source: str  # what was read, for the run's description
    lossy: bool = False  # decoded from JPEG files: not the original CIFAR-10 pixels

    def digest(self) -> str:
        """The data's fingerprint: of its pixels and labels, whatever the source's format."""
        h = hashlib.sha256()
        for a in (self.train_x, self.train_y, self.test_x, self.test_y):
            h.update(np.ascontiguousarray(a).data)
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class Cifar10:
    """CIFAR-10 as a config asks for it: all 60k images, training then test, and what the
    loaders build their splits from."""

    images: torch.Tensor  # (60000, 3, 32, 32) uint8
    labels: torch.Tensor  # (60000,) int64
    train_idx: np.ndarray  # the fixed split (cifar_split) of the first n_train images
    val_idx: np.ndarray | None
    n_train: int  # images[n_train:] are the test split
    mean: torch.Tensor  # cifar_stats of the training images
    std: torch.Tensor
    fingerprint: str
    description: str


def cifar10(cfg: Config) -> Cifar10:
    """data.path read (load_cifar10), split (data.val_split) and its statistics (data.normalize)."""
    arrays = load_cifar10(cfg.data.path)
    images = torch.from_numpy(np.concatenate([arrays.train_x, arrays.test_x])).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(np.concatenate([arrays.train_y, arrays.test_y]))
    n_train = len(arrays.train_x)
    train_idx, val_idx = cifar_split(n_train, cfg.data.val_split)
    mean, std = cifar_stats(images[torch.from_numpy(train_idx)], cfg.data.normalize.value)
    description = describe(len(train_idx), cfg.data.val_split, len(arrays.test_x), arrays.source, arrays.lossy)
    return Cifar10(images, labels, train_idx, val_idx, n_train, mean, std, arrays.digest(), description)


def describe(n_train: int, n_val: int, n_test: int, source: str, lossy: bool) -> str:
    return f"CIFAR-10 {n_train} train / {n_val} val / {n_test} test from {source}{LOSSY if lossy else ''}"


def cifar_split(n_train: int, holdout: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(train indices, validation indices or None), both sorted. The split is fixed (seed 0),
    not drawn per run: every run, and every prepared .beton, validates on the same images."""
    if holdout < 0:
        raise DataError(
            f"a validation split of {holdout} images (data.val_split, --val-split) is negative; give 0 or more (the paper: 5000)"
        )
    if holdout >= n_train:
        raise DataError(f"data.val_split={holdout} leaves no training images out of {n_train}")
    if not holdout:
        return np.arange(n_train), None
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(0)).numpy()
    return np.sort(perm[: n_train - holdout]), np.sort(perm[n_train - holdout :])


def cifar_stats(train_images: torch.Tensor, normalize: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) on [0, 1] pixels from the training images (N, 3, 32, 32) uint8: the per-pixel
    mean image and std 1 (paper §4.2, `pixel_mean`), or per-channel mean and std (`channel`)."""
    if normalize == "pixel_mean":
        return train_images.double().mean(0).div(255).float(), torch.ones(3, 1, 1)
    if normalize == "imagenet":  # fixed: the statistics the public CIFAR-10 checkpoints were trained with
        return torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    flat = train_images.double().div(255)
    return flat.mean((0, 2, 3)).float().view(3, 1, 1), flat.std((0, 2, 3)).float().view(3, 1, 1)


def load_cifar10(path: Path | None, download_root: Path = Path("data")) -> CifarArrays:
    if path is None and os.environ.get("REPRODUCE_CIFAR10"):  # the machine's copy, as `reproduce study` reads it
        path = Path(os.environ["REPRODUCE_CIFAR10"])
    if path is None:
        return _torchvision(download_root, download=True)
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"CIFAR-10 source {path} does not exist; set data.path to a cifar-10-batches-py folder, an image tree or a .tar.gz"
        )
    if path.is_dir():
        if (path / "data_batch_1").exists():
            return _torchvision(path.parent, download=False)
        if (path / "cifar-10-batches-py").is_dir():
            return _torchvision(path, download=False)
        if (path / "train").is_dir() and (path / "test").is_dir():
            return _cached(path, _read_tree)
        hint = "; for your own images in train/ and val/ add data.dataset=folder" if (path / "val").is_dir() else ""
        raise DataError(f"{path} holds neither cifar-10-batches-py nor train/ and test/ class folders{hint}")
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        return _cached(path, _read_tar)
    if path.suffix == ".npz":
        return _read_prefix_npz(path)
    raise DataError(f"{path} is not a folder or a .tar/.tar.gz archive of CIFAR-10")


def _read_prefix_npz(path: Path) -> CifarArrays:
    """The original pixels of the first N images of each batch: `<batch>_data_prefix` (N, 32, 32, 3)
    uint8 and `<batch>_labels` (all 10,000) for data_batch_1..5 and test_batch."""
    try:
        with np.load(path) as z:
            parts = [
                (z[f"{b}_data_prefix"], z[f"{b}_labels"].astype(np.int64))
                for b in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
            ]
    except (OSError, ValueError, KeyError) as err:
        raise DataError(
            f"{path} is not a CIFAR-10 prefix .npz (<batch>_data_prefix and <batch>_labels): {err}"
        ) from None
    train_x = np.concatenate([x for x, _ in parts[:5]])
    train_y = np.concatenate([y[: len(x)] for x, y in parts[:5]])
    test_x, test_y = parts[5][0], parts[5][1][: len(parts[5][0])]
    return CifarArrays(
        train_x, train_y, test_x, test_y, f"{path} (original pixels, the first {len(test_x)} images of each batch)"
    )


def _torchvision(root: Path, download: bool) -> CifarArrays:
    from torchvision.datasets import CIFAR10

    try:
        train = CIFAR10(str(root), train=True, download=download)
        test = CIFAR10(str(root), train=False, download=download)
    except (RuntimeError, OSError) as err:  # torchvision: "Dataset not found or corrupted", URLError
        hint = "no network? set data.path to a local copy" if download else "the batches are missing or corrupt"
        raise DataError(f"CIFAR-10 in {root}: {str(err).splitlines()[0]} ({hint})") from None
    return CifarArrays(
        train.data,
        np.asarray(train.targets, np.int64),
        test.data,
        np.asarray(test.targets, np.int64),
        f"cifar-10-batches-py in {root}",
    )


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
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:  # a file, not a name: np.savez would add .npz to the name
            np.savez(
                f,
                train_x=arrays.train_x,
                train_y=arrays.train_y,
                test_x=arrays.test_x,
                test_y=arrays.test_y,
                lossy=arrays.lossy,
            )
        atomic_replace(tmp, cache)
    finally:
        tmp.unlink(missing_ok=True)
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
                    files.setdefault(hit[0], []).append(
                        (f"{archive}:{member.name}", _label(hit[1], str(archive)), blob)
                    )
    except DataError:
        raise
    except Exception as err:  # tarfile, gzip and zlib raise several types for a damaged archive
        reason = (
            "the file is empty" if archive.stat().st_size == 0 else (str(err).splitlines() or [type(err).__name__])[0]
        )
        raise DataError(f"cannot read archive {archive}: {reason} (truncated or not a tar file?)") from None
    return _assemble(files, str(archive))
