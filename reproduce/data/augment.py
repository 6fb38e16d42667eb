"""The CIFAR-10 input of the paper (§4.2), for all three backends: normalise (per-pixel mean,
or per-channel mean and std), then pad 4 pixels on each side, take a random 32x32 crop and
flip it horizontally with p = 0.5.

The torchvision loader augments one image at a time with torchvision's transforms, under the
sample's seed (`cifar_transforms`). The gpu and ffcv loaders augment a whole batch with one
gather (`pad_crop_flip`), the crop offset and flip of the sample at position p of the epoch's
permutation drawn from the epoch's generator right after the permutation
(`epoch_augmentation`). The semantics are the same (padding comes after mean subtraction, so
the padded pixels are the mean colour, i.e. zero input); the random numbers are not.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from reproduce.data.order import epoch_generator

PAD = 4  # pixels of padding on each side before the random 32x32 crop (paper §4.2)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, 32, 32) -> float32 on normalised pixels. Every backend uses this one, so
    evaluation batches agree bit for bit."""
    return (images.float().div(255) - mean) / std


def cifar_transforms(mean: torch.Tensor, std: torch.Tensor, augment: bool) -> tuple[Callable, Callable]:
    """(training transform, evaluation transform) of one (3, 32, 32) uint8 image, for the
    torchvision loader."""
    from torchvision.transforms import v2

    plain = partial(normalize, mean=mean, std=std)
    if not augment:
        return plain, plain
    return v2.Compose([plain, v2.RandomCrop(32, padding=PAD), v2.RandomHorizontalFlip()]), plain


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
