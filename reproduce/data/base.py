"""What every dataset and backend of reproduce.data shares: the error type, the splits and
the Data that build_data returns. Imports nothing of the package."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from reproduce.errors import Refused


class DataError(Refused, RuntimeError):
    """A dataset that cannot be used; the message is one line for the user."""


class Split(Dataset):
    """`base[i] -> (raw, label)` with `transform` applied. A training split is indexed by
    (index, seed) pairs and runs its transform under that seed, so augmentation does not
    depend on which worker process draws the sample."""

    def __init__(self, base, transform: Callable | None, indices: np.ndarray | None = None, seeded: bool = False):
        self.base, self.transform, self.seeded = base, transform, seeded
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.base)

    def __getitem__(self, key):
        index, seed = key if self.seeded else (key, None)
        raw, label = self.base[int(self.indices[index]) if self.indices is not None else index]
        if self.transform is None:
            return raw, label
        if seed is None:
            return self.transform(raw), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(raw), label


class Pairs:
    """(image, label) from tensors; `length` > len(images) cycles them (synthetic data)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, length: int | None = None):
        self.images, self.labels = images, labels
        self.length = length or len(images)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        index %= len(self.images)
        return self.images[index], int(self.labels[index])


@dataclass(frozen=True)
class Data:
    train: Split
    val: Split | None
    test: Split
    num_classes: int
    fingerprint: str  # identifies the exact images and labels used
    description: str  # what a reader of the results needs to know about the data
