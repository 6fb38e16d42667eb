"""The input order every backend uses: an iteration's global batch, a rank's share of it,
the epoch's generator and the per-sample seeds, and a rank's share of an evaluation split.

For iteration i, epoch = i // batches_per_epoch; the epoch's permutation is the first draw of
epoch_generator(seed, epoch); global batch k of it is cut into world_size contiguous slices
(rank_slice). So the order is a pure function of (seed, iteration), and 1 and N processes
see the same global batches.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from reproduce.config import Config
from reproduce.data.base import DataError
from reproduce.distributed import DistInfo


def batches_per_epoch(n: int, global_batch: int) -> int:
    """Global batches in an epoch of an n-image training split (the last incomplete batch of
    an epoch is dropped); DataError if there is not even one."""
    if n < global_batch:
        raise DataError(
            f"the training split has {n} images, fewer than one global batch of {global_batch}; "
            "lower optim.batch_size (or data.val_split)"
        )
    return n // global_batch


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of one epoch: its first draw is the epoch's permutation (randperm(n)); the
    gpu and ffcv loaders then draw their per-position augmentation from it."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def rank_slice(iteration: int, per_epoch: int, global_batch: int, rank: int, world: int) -> slice:
    """Positions in the epoch's permutation that this rank trains on at `iteration`."""
    per_rank = global_batch // world
    first = (iteration % per_epoch) * global_batch + rank * per_rank
    return slice(first, first + per_rank)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample `index`'s augmentation in `epoch` (torchvision loader)."""
    return ((seed * 1_000_003 + epoch) * 16_777_259 + index) % (2**63)


class TrainBatches:
    """Batch sampler of the torchvision loader: per iteration, this rank's slice of the global
    batch as (index, sample seed) pairs."""

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int, start: int, stop: int):
        self.per_epoch = batches_per_epoch(n, global_batch)
        self.n, self.global_batch, self.rank, self.world = n, global_batch, rank, world
        self.seed, self.start, self.stop = seed, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, perm = None, None
        for it in range(self.start, self.stop):
            if it // self.per_epoch != epoch:
                epoch = it // self.per_epoch
                perm = torch.randperm(self.n, generator=epoch_generator(self.seed, epoch))
            where = rank_slice(it, self.per_epoch, self.global_batch, self.rank, self.world)
            yield [(int(i), sample_seed(self.seed, epoch, int(i))) for i in perm[where]]


def eval_indices(n: int, cfg: Config, info: DistInfo) -> np.ndarray:
    """This rank's images of an n-image evaluation split: every world_size-th of all of them,
    or of an evenly spread subset of eval.max_images."""
    picked = (
        np.arange(n)
        if cfg.eval.max_images is None or cfg.eval.max_images >= n
        else np.linspace(0, n - 1, cfg.eval.max_images).round().astype(np.int64)
    )
    return picked[info.rank :: info.world_size]
