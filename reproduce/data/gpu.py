"""CIFAR-10 resident on the device (`data.loader=gpu`): each split is one uint8 tensor there,
and every batch is normalised, padded, cropped and flipped there by one gather.

No worker processes and no host-to-device copy per batch. The order is TrainBatches' (the
same permutation of the epoch, the same global-batch slices per rank); the augmentation of
the sample at position p of the epoch's permutation is drawn from the same per-(seed, epoch)
generator right after the permutation: a (row, column) crop offset uniform in 0..8 and a flip
bit. So a batch is a pure function of (seed, iteration, rank slice): a resumed run sees the
same batches bit for bit, and 1 and N processes see the same global batches. The semantics
are the torchvision path's (pad 4 with the mean colour, i.e. zeros after normalisation,
random 32x32 crop, flip with p = 0.5), but the random draws are not the same numbers.

It works on the CPU too (run.device=cpu), which is how it is tested.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from reproduce.config import Config
from reproduce.data import Data, DataError, epoch_generator, eval_indices, rank_slice
from reproduce.distributed import DistInfo

PAD = 4  # pixels of padding on each side before the random 32x32 crop (paper §4.2)


@dataclass(eq=False)
class ResidentSplit:
    """One CIFAR-10 split as tensors: kept on the CPU and copied to a device on first use."""

    images: torch.Tensor  # (N, 3, 32, 32) uint8
    labels: torch.Tensor  # (N,) int64
    mean: torch.Tensor  # (3, 32, 32) or (3, 1, 1) float32, on [0, 1] pixels
    std: torch.Tensor  # (3, 1, 1) float32
    _copies: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """(normalised image, label): the Dataset protocol, for tools that read single images."""
        return normalize(self.images[index], self.mean, self.std), int(self.labels[index])

    def on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(images, labels, mean, std) on `device`, copied once."""
        key = str(device)
        if key not in self._copies:
            self._copies[key] = tuple(t.to(device) for t in (self.images, self.labels, self.mean, self.std))
        return self._copies[key]


def build_data(images: torch.Tensor, labels: torch.Tensor, train_idx: np.ndarray, val_idx: np.ndarray | None,
               n_train: int, mean: torch.Tensor, std: torch.Tensor, fingerprint: str, description: str) -> Data:
    """The three splits of CIFAR-10 from all 60k images (train then test) and the fixed split."""

    def split(indices: np.ndarray) -> ResidentSplit:
        index = torch.from_numpy(np.asarray(indices, np.int64))
        return ResidentSplit(images[index].contiguous(), labels[index].contiguous(), mean, std)

    return Data(train=split(train_idx), val=split(val_idx) if val_idx is not None else None,
                test=split(np.arange(n_train, len(images))), num_classes=10, fingerprint=fingerprint,
                description=f"{description}; resident on the device (data.loader=gpu)")


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, 32, 32) -> float32: the same operations, in the same order, as the
    torchvision path, so evaluation batches agree bit for bit."""
    return (images.float().div(255) - mean) / std


def epoch_augmentation(seed: int, epoch: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(permutation (n,), crop offsets (n, 2) as (row, column) in 0..2*PAD, flip bits (n,)) of
    one epoch, indexed by position in the permutation. The permutation is TrainBatches'."""
    generator = epoch_generator(seed, epoch)
    perm = torch.randperm(n, generator=generator)
    offsets = torch.randint(0, 2 * PAD + 1, (n, 2), generator=generator)
    flips = torch.randint(0, 2, (n,), generator=generator).bool()
    return perm, offsets, flips


def pad_crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Normalised (B, C, H, W) -> (B, C, H, W): zero-pad PAD pixels on each side, take the crop
    at `offsets` (B, 2), mirror it where `flips` (B,) is set. One gather, no per-sample loop."""
    b, c, h, w = images.shape
    padded = F.pad(images, (PAD, PAD, PAD, PAD))  # zeros: the mean colour after normalisation
    rows = offsets[:, :1] + torch.arange(h, device=images.device)  # (B, H)
    across = torch.arange(w, device=images.device)
    cols = offsets[:, 1:] + torch.where(flips[:, None], w - 1 - across, across)  # (B, W), mirrored when flipped
    batch = torch.arange(b, device=images.device).view(b, 1, 1, 1)
    channel = torch.arange(c, device=images.device).view(1, c, 1, 1)
    return padded[batch, channel, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


def train_batches(split: ResidentSplit, cfg: Config, info: DistInfo, start: int):
    """This rank's (images, labels) for iterations start .. schedule.iterations, on info.device."""
    n, global_batch = len(split), cfg.optim.batch_size
    if n < global_batch:
        raise DataError(f"the training split has {n} images, fewer than one batch of {global_batch}")
    per_epoch = n // global_batch  # the last incomplete batch of an epoch is dropped, as in TrainBatches
    images, labels, mean, std = split.on(info.device)
    epoch = None
    for it in range(start, cfg.schedule.iterations):
        if it // per_epoch != epoch:
            epoch = it // per_epoch
            perm, offsets, flips = (t.to(info.device) for t in epoch_augmentation(cfg.seed, epoch, n))
        where = rank_slice(it, per_epoch, global_batch, info.rank, info.world_size)
        index = perm[where]
        batch = normalize(images[index], mean, std)
        if cfg.data.augment:
            batch = pad_crop_flip(batch, offsets[where], flips[where])
        yield batch, labels[index]


def eval_batches(split: ResidentSplit, cfg: Config, info: DistInfo):
    """This rank's share of `split` (as eval_loader picks it), normalised, in eval.batch_size batches."""
    images, labels, mean, std = split.on(info.device)
    picked = torch.from_numpy(eval_indices(len(split), cfg, info)).to(info.device)
    for index in picked.split(cfg.eval.batch_size):
        yield normalize(images[index], mean, std), labels[index]
