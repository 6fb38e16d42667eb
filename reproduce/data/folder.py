"""data.dataset=folder: any image-folder tree (train/<class>/*, val/<class>/*, any number of
classes) or a .tar(.gz) of one, for fine-tuning (model.init). A tarball is unpacked once into
the cache (~/.cache/reproduce or $REPRODUCE_CACHE), keyed by its path, size and mtime.

Transforms follow the model's family: a CIFAR network gets CIFAR-style input (the image resized
to data.crop x data.crop; for training, 4-pixel padding, a random crop and a flip, §4.2), an
ImageNet network the ImageNet ones (imagenet.py: data.train_crop / data.scale for training,
eval.protocol for the test split). Both normalise with the ImageNet channel statistics
(data.normalize=imagenet), as torchvision's and the public CIFAR-10 weights were trained. The
test split is val/; there is no separate validation split.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
from pathlib import Path

import torch
from torchvision.transforms import v2

from reproduce.config import Config
from reproduce.data.augment import PAD
from reproduce.data.base import Data, DataError, Split
from reproduce.data.imagenet import MEAN, STD, eval_transform, image_folder, train_transform
from reproduce.io import atomic_replace


def build_data(cfg: Config) -> Data:
    from reproduce.models import MODELS

    d = cfg.data
    root = unpacked(Path(d.path))
    train, val = image_folder(root, "train", None), image_folder(root, "val", None)
    if train.classes != val.classes:
        raise DataError(
            f"{d.path}: train/ and val/ have different class folders ({len(train.classes)} and {len(val.classes)})"
        )
    if MODELS[cfg.model.name].family == "cifar":
        augment, plain = cifar_style(d.crop, d.augment)
        style = f"CIFAR-style {d.crop}x{d.crop}"
    else:
        augment, plain = (
            train_transform(d.scale, d.crop, d.lighting, d.augment, d.train_crop),
            eval_transform(d.crop, cfg.eval.protocol.value),
        )
        style = f"ImageNet-style, crop {d.crop}, test protocol {cfg.eval.protocol.value}"
    listing = "\n".join(f"{Path(p).relative_to(root)}:{label}" for p, label in train.samples + val.samples).encode()
    return Data(
        train=Split(train, augment, seeded=True),
        val=None,
        test=Split(val, plain),
        num_classes=len(train.classes),
        fingerprint=hashlib.sha256(listing).hexdigest()[:16],
        description=f"image folder {d.path}: {len(train)} train / {len(val)} val (= test) images, "
        f"{len(train.classes)} classes; {style}",
    )


def cifar_style(size: int, augment: bool) -> tuple[v2.Compose, v2.Compose]:
    """(training, evaluation) transforms of a PIL image for a CIFAR network at size x size."""
    head = [
        v2.PILToTensor(),
        v2.Resize((size, size), antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ]
    plain = v2.Compose(head)
    if not augment:
        return plain, plain
    return v2.Compose(head + [v2.RandomCrop(size, padding=PAD), v2.RandomHorizontalFlip()]), plain


def unpacked(path: Path) -> Path:
    """A folder holding train/ and val/: `path` itself, or its archive unpacked into the cache."""
    if path.is_dir():
        return path
    if not path.name.endswith((".tar.gz", ".tgz", ".tar")):
        raise DataError(f"{path} is neither a folder nor a .tar/.tar.gz of train/<class>/* and val/<class>/*")
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("REPRODUCE_CACHE", Path.home() / ".cache" / "reproduce"))
    target = cache / f"folder-{key}"
    if target.is_dir():
        return _root_of(target, path)
    tmp = cache / f".folder-{key}.{os.getpid()}.tmp"
    try:
        with tarfile.open(path) as tf:
            tf.extractall(tmp, filter="data")  # "data": no absolute paths, links out or devices
        atomic_replace(tmp, target)  # a half-unpacked folder is never taken for the cache
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"cannot unpack {path}: {err} (truncated or not a tar file?)") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _root_of(target, path)


def _root_of(folder: Path, source: Path) -> Path:
    """The folder holding train/ and val/: the archive's top, or its single top-level folder."""
    if (folder / "train").is_dir() or (folder / "val").is_dir():
        return folder
    inner = [p for p in folder.iterdir() if p.is_dir()]
    if len(inner) == 1:
        return inner[0]
    raise DataError(f"{source} has no train/ and val/ folders at its top")
