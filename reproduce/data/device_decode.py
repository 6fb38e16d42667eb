"""data.loader=device: ImageNet-style JPEGs decoded in batches on the training device.

DataLoader worker processes only read each image's bytes; the main process decodes a whole
batch at once with torchvision.io.decode_jpeg on run.device (nvJPEG on a CUDA GPU, libjpeg-turbo
on the CPU: the same code path) and augments it there, image by image on the device: the
paper's scale augmentation (shorter side resized to s ~ U{data.scale}, a random crop) or
RandomResizedCrop, a flip, the PCA lighting and the normalisation, as the torchvision loader
does. Every draw of a sample comes from a generator seeded with that sample's seed
(TrainBatches), so batches do not depend on the workers and a resumed run sees the same ones.
Evaluation: shorter side to 256 (at crop 224), then the centre crop or the ten crops.

It frees the CPU cores of a GPU node from decoding, which bounds data.loader=torchvision
(results/loaders.md); on a CPU-only machine it runs the same code, to test it, not to be fast
(one process decodes).
"""

from __future__ import annotations

import math
from contextlib import closing

import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from reproduce.config import Config
from reproduce.data.base import Data, DataError, Split
from reproduce.data.imagenet import MEAN, PCA_EIGVAL, PCA_EIGVEC, STD, TEST_SHORT_SIDE
from reproduce.data.imagenet import build_data as build_imagenet
from reproduce.data.order import TrainBatches, eval_indices
from reproduce.data.workers import Batches
from reproduce.distributed import DistInfo


class _Bytes(Dataset):
    """(the file's bytes as a uint8 tensor, label, seed, index) of an ImageFolder split; a
    training split is indexed by (index, seed) pairs."""

    def __init__(self, split: Split):
        self.folder, self.seeded = split.base, split.seeded

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key):
        index, seed = key if self.seeded else (key, 0)
        path, label = self.folder.samples[index]
        try:
            with open(path, "rb") as f:
                blob = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
        except OSError as err:  # vanished, unreadable: one line naming the file
            raise DataError(f"cannot read image {path}: {err.strerror or err}") from None
        return blob, label, seed, index


def _collate(samples: list) -> tuple[list, torch.Tensor, list, list]:
    blobs, labels, seeds, indices = zip(*samples)
    return list(blobs), torch.tensor(labels), list(seeds), list(indices)


def build_data(cfg: Config) -> Data:
    """The torchvision loader's splits (same folders, fingerprint and description); only the
    decoding and the transforms move to the device."""
    if cfg.data.dataset != "imagenet":
        raise DataError("data.loader=device decodes ImageNet-style JPEG folders; for CIFAR-10 use data.loader=gpu")
    data = build_imagenet(cfg)
    return Data(
        train=data.train,
        val=data.val,
        test=data.test,
        num_classes=data.num_classes,
        fingerprint=data.fingerprint,
        description=data.description + "; decoded on the device",
    )


def decode(blobs: list[torch.Tensor], indices: list[int], split: Split, device: torch.device) -> list[torch.Tensor]:
    """RGB uint8 (3, H, W) images on `device`, decoded as one batch; a file that is no JPEG is
    named in one line (DataError)."""
    try:
        return decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        for blob, index in zip(blobs, indices):  # which one: decode them one by one
            try:
                decode_jpeg(blob, mode=ImageReadMode.RGB, device=device)
            except RuntimeError as err:
                path = split.base.samples[index][0]
                raise DataError(
                    f"cannot decode image {path} on {device} ({str(err).splitlines()[0][:120]}); "
                    "data.loader=device reads JPEG only: use data.loader=torchvision for other formats"
                ) from None
        raise


def _window(image: torch.Tensor, cfg: Config, g: torch.Generator) -> torch.Tensor:
    """The training crop of one image: scale augmentation or RandomResizedCrop, to data.crop."""
    crop, (height, width) = cfg.data.crop, image.shape[-2:]
    if cfg.data.train_crop == "random_resized":
        area = height * width
        for _ in range(10):
            target = area * (0.08 + 0.92 * torch.rand((), generator=g).item())
            log_lo, log_hi = math.log(3 / 4), math.log(4 / 3)
            aspect = math.exp(log_lo + (log_hi - log_lo) * torch.rand((), generator=g).item())
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (), generator=g))
                left = int(torch.randint(0, width - w + 1, (), generator=g))
                return v2.functional.resized_crop(image, top, left, h, w, [crop, crop], antialias=True)
        return v2.functional.resize(v2.functional.center_crop(image, min(height, width)), [crop, crop], antialias=True)
    lo, hi = cfg.data.scale
    side = int(torch.randint(lo, hi + 1, (), generator=g))
    image = v2.functional.resize(image, side, antialias=True)  # the shorter side to s
    height, width = image.shape[-2:]
    top = int(torch.randint(0, height - crop + 1, (), generator=g))
    left = int(torch.randint(0, width - crop + 1, (), generator=g))
    return image[:, top : top + crop, left : left + crop]


def _normalise(batch: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=batch.device).view(1, 3, 1, 1)
    return (batch - mean) / std


def augment(images: list[torch.Tensor], seeds: list[int], cfg: Config) -> torch.Tensor:
    """(B, 3, crop, crop) float32 training batch on the images' device."""
    if not cfg.data.augment:
        return center(images, cfg.data.crop)
    out, shifts = [], []
    for image, seed in zip(images, seeds):
        g = torch.Generator().manual_seed(int(seed))
        view = _window(image, cfg, g)
        if torch.rand((), generator=g).item() < 0.5:
            view = view.flip(-1)
        out.append(view)
        alpha = torch.randn(3, generator=g) * cfg.data.lighting
        shifts.append(PCA_EIGVEC @ (alpha * PCA_EIGVAL))
    batch = torch.stack(out).float().div_(255)
    batch += torch.stack(shifts).to(batch.device).view(-1, 3, 1, 1)
    return _normalise(batch)


def center(images: list[torch.Tensor], crop: int) -> torch.Tensor:
    short = round(crop * TEST_SHORT_SIDE / 224)
    views = [v2.functional.center_crop(v2.functional.resize(i, short, antialias=True), crop) for i in images]
    return _normalise(torch.stack(views).float().div_(255))


def ten(images: list[torch.Tensor], crop: int) -> torch.Tensor:
    short = round(crop * TEST_SHORT_SIDE / 224)
    views = [torch.stack(v2.functional.ten_crop(v2.functional.resize(i, short, antialias=True), crop)) for i in images]
    batch = torch.stack(views).float().div_(255)  # (B, 10, 3, crop, crop)
    return _normalise(batch.flatten(0, 1)).view(batch.shape)


def train_batches(split: Split, cfg: Config, info: DistInfo, start: int):
    """This rank's (images, labels) for iterations start .. schedule.iterations, on info.device."""
    batches = TrainBatches(
        len(split), cfg.optim.batch_size, info.rank, info.world_size, cfg.seed, start, cfg.schedule.iterations
    )
    loader = Batches(_Bytes(split), batch_sampler=batches, num_workers=cfg.data.workers, collate_fn=_collate)
    with closing(iter(loader)) as batches:  # the workers end here, also when decode or augment fails
        for blobs, labels, seeds, indices in batches:
            yield (
                augment(decode(blobs, indices, split, info.device), seeds, cfg),
                labels.to(info.device, non_blocking=True),
            )


def eval_batches(split: Split, cfg: Config, info: DistInfo):
    share = torch.utils.data.Subset(_Bytes(split), eval_indices(len(split), cfg, info).tolist())
    loader = Batches(share, batch_size=cfg.eval.batch_size, num_workers=cfg.data.workers, collate_fn=_collate)
    views = ten if cfg.eval.protocol.value == "tencrop" else center
    with closing(iter(loader)) as batches:
        for blobs, labels, _, indices in batches:
            yield (
                views(decode(blobs, indices, split, info.device), cfg.data.crop),
                labels.to(info.device, non_blocking=True),
            )
