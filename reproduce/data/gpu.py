"""CIFAR-10 resident on the device (`data.loader=gpu`): each split is one uint8 tensor there,
and every batch is normalised, padded, cropped and flipped there by one gather.

No worker processes and no host-to-device copy per batch. The order is TrainBatches' (the
same permutation of the epoch, the same global-batch slices per rank); the augmentation of
the sample at position p of the epoch's permutation is drawn from the same per-(seed, epoch)
generator right after the permutation (augment.py): a (row, column) crop offset uniform in
0..8 and a flip bit. So a batch is a pure function of (seed, iteration, rank slice): a
resumed run sees the same batches bit for bit, and 1 and N processes see the same global
batches. The semantics are the torchvision path's (pad 4 with the mean colour, i.e. zeros
after normalisation, random 32x32 crop, flip with p = 0.5), but the random draws are not the
same numbers as torchvision's; the FFCV CIFAR loader draws exactly these (its batches equal
this loader's bit for bit, tests/test_ffcv.py).

It works on the CPU too (run.device=cpu), which is how it is tested.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from reproduce.config import Config
from reproduce.data.augment import epoch_augmentation, normalize, pad_crop_flip
from reproduce.data.base import Data
from reproduce.data.cifar import cifar10
from reproduce.data.order import batches_per_epoch, eval_indices, rank_slice
from reproduce.distributed import DistInfo


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


def build_data(cfg: Config) -> Data:
    """The three splits of CIFAR-10 (the fixed split of cifar10(cfg))."""
    c = cifar10(cfg)

    def split(indices: np.ndarray) -> ResidentSplit:
        index = torch.from_numpy(np.asarray(indices, np.int64))
        return ResidentSplit(c.images[index].contiguous(), c.labels[index].contiguous(), c.mean, c.std)

    return Data(
        train=split(c.train_idx),
        val=split(c.val_idx) if c.val_idx is not None else None,
        test=split(np.arange(c.n_train, len(c.images))),
        num_classes=10,
        fingerprint=c.fingerprint,
        description=f"{c.description}; resident on the device (data.loader=gpu)",
    )


def train_batches(split: ResidentSplit, cfg: Config, info: DistInfo, start: int):
    """This rank's (images, labels) for iterations start .. schedule.iterations, on info.device."""
    n, global_batch = len(split), cfg.optim.batch_size
    per_epoch = batches_per_epoch(n, global_batch)
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
