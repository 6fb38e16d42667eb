"""Input for training and evaluation, behind one interface for every dataset and loader.

`build_data(cfg)` returns the three splits; `train_loader` streams the training batches of
one rank from a given iteration on; `eval_loader` gives a rank its share of an evaluation
split. The input order and every random augmentation are pure functions of (seed,
iteration, sample): a run resumed at iteration k sees exactly the batches an uninterrupted
run sees, whatever the number of workers, and the processes of a job split each global
batch between them (so 1 and N processes see the same global batches).

`data.loader` picks what sits behind this interface: `torchvision` (DataLoader workers, PIL
decode; this file), `ffcv` (.beton files written by `reproduce prepare`; ffcv_loaders.py) or
`gpu` (CIFAR-10 resident on the device; gpu.py). All three use the same order: the epoch's
permutation from `epoch_generator` and the global-batch slices of `rank_slice`.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from reproduce.config import Config, Protocol
from reproduce.data.cifar import DataError, load_cifar10
from reproduce.distributed import DistInfo

log = logging.getLogger("reproduce.data")
__all__ = ["Data", "DataError", "build_data", "train_loader", "eval_loader", "cifar_split", "cifar_stats"]


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


@dataclass(frozen=True)
class Data:
    train: Split
    val: Split | None
    test: Split
    num_classes: int
    fingerprint: str  # identifies the exact images and labels used
    description: str  # what a reader of the results needs to know about the data


class TrainBatches:
    """Batch sampler: for iteration i, epoch = i // per_epoch; the epoch's permutation comes
    from (seed, epoch); global batch k of it is split into world_size contiguous slices."""

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int, start: int, stop: int):
        if n < global_batch:
            raise DataError(f"the training split has {n} images, fewer than one batch of {global_batch}")
        self.n, self.global_batch, self.rank, self.world = n, global_batch, rank, world
        self.seed, self.start, self.stop = seed, start, stop
        self.per_epoch = n // global_batch  # the last incomplete batch of an epoch is dropped

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        per_rank = self.global_batch // self.world
        epoch, perm = None, None
        for it in range(self.start, self.stop):
            if it // self.per_epoch != epoch:
                epoch = it // self.per_epoch
                perm = torch.randperm(self.n, generator=epoch_generator(self.seed, epoch))
            first = (it % self.per_epoch) * self.global_batch + self.rank * per_rank
            yield [(int(i), _sample_seed(self.seed, epoch, int(i))) for i in perm[first:first + per_rank]]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of one epoch: its first draw is the epoch's permutation (randperm(n)); the
    gpu and ffcv loaders then draw their per-position augmentation from it."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def rank_slice(iteration: int, per_epoch: int, global_batch: int, rank: int, world: int) -> slice:
    """Positions in the epoch's permutation that this rank trains on at `iteration`."""
    per_rank = global_batch // world
    first = (iteration % per_epoch) * global_batch + rank * per_rank
    return slice(first, first + per_rank)


def eval_indices(n: int, cfg: Config, info: DistInfo) -> np.ndarray:
    """This rank's images of an n-image evaluation split: every world_size-th of all of them,
    or of an evenly spread subset of eval.max_images."""
    picked = np.arange(n) if cfg.eval.max_images is None or cfg.eval.max_images >= n else \
        np.linspace(0, n - 1, cfg.eval.max_images).round().astype(np.int64)
    return picked[info.rank::info.world_size]


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 16_777_259 + index) % (2**63)


def train_loader(data: Data, cfg: Config, info: DistInfo, start: int):
    """(images, labels) batches of this rank for iterations start .. schedule.iterations."""
    if cfg.data.loader == "gpu" and not cfg.data.synthetic:
        from reproduce.data import gpu

        return gpu.train_batches(data.train, cfg, info, start)
    if cfg.data.loader == "ffcv" and not cfg.data.synthetic:
        return ffcv_module().train_batches(data.train, cfg, info, start)
    batches = TrainBatches(len(data.train), cfg.optim.batch_size, info.rank, info.world_size, cfg.seed, start,
                           cfg.schedule.iterations)
    return DataLoader(data.train, batch_sampler=batches, num_workers=cfg.data.workers,
                      pin_memory=info.device.type == "cuda", persistent_workers=False)


def eval_loader(split: Split, cfg: Config, info: DistInfo):
    """This rank's share (every world_size-th image) of `split`, optionally an evenly spread
    subset of eval.max_images images. Shares are disjoint: counts summed over ranks are exact."""
    if cfg.data.loader == "gpu" and not cfg.data.synthetic:
        from reproduce.data import gpu

        return gpu.eval_batches(split, cfg, info)
    if cfg.data.loader == "ffcv" and not cfg.data.synthetic:
        return ffcv_module().eval_batches(split, cfg, info)
    share = torch.utils.data.Subset(split, eval_indices(len(split), cfg, info).tolist())
    return DataLoader(share, batch_size=cfg.eval.batch_size, num_workers=cfg.data.workers,
                      pin_memory=info.device.type == "cuda")


def build_data(cfg: Config) -> Data:
    if cfg.data.synthetic:
        return _synthetic(cfg)
    if cfg.data.loader == "ffcv":
        return ffcv_module().build_data(cfg)
    if cfg.data.dataset == "cifar10":
        return _cifar10(cfg)
    return _imagenet(cfg)


def ffcv_module(needed_by: str = "data.loader=ffcv"):
    """reproduce.data.ffcv_loaders (importing it imports FFCV), or DataError saying how to install FFCV."""
    try:
        from reproduce.data import ffcv_loaders
    except ImportError as err:
        raise DataError(f"{needed_by} needs FFCV ({err}): apt-get install -y libturbojpeg0-dev libopencv-dev "
                        "pkg-config, then pip install -e '.[ffcv]'") from None
    return ffcv_loaders


def _cifar10(cfg: Config) -> Data:
    from torchvision.transforms import v2

    arrays = load_cifar10(cfg.data.path)
    images = torch.from_numpy(np.concatenate([arrays.train_x, arrays.test_x])).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(np.concatenate([arrays.train_y, arrays.test_y]))
    n_train = len(arrays.train_x)
    holdout = cfg.data.val_split
    train_idx, val_idx = cifar_split(n_train, holdout)
    fingerprint = _digest(arrays.train_x, arrays.train_y, arrays.test_x, arrays.test_y)
    lossy = " (lossy JPEG copy: errors are not comparable to the paper's to the decimal)" if arrays.lossy else ""
    description = f"CIFAR-10 {len(train_idx)} train / {holdout} val / {len(arrays.test_x)} test from {arrays.source}{lossy}"
    mean, std = cifar_stats(images[torch.from_numpy(train_idx)], cfg.data.normalize.value)
    if cfg.data.loader == "gpu":
        from reproduce.data import gpu

        return gpu.build_data(images, labels, train_idx, val_idx, n_train, mean, std, fingerprint, description)

    def normalize(img: torch.Tensor) -> torch.Tensor:
        return (img.float().div(255) - mean) / std

    # Padding comes after mean subtraction, so the 4 padded pixels are the mean colour (zero input).
    augment = v2.Compose([normalize, v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()]) if cfg.data.augment else normalize
    base = _Pairs(images, labels)
    return Data(
        train=Split(base, augment, train_idx, seeded=True),
        val=Split(base, normalize, val_idx) if val_idx is not None else None,
        test=Split(base, normalize, np.arange(n_train, len(images))),
        num_classes=10,
        fingerprint=fingerprint,
        description=description,
    )


def cifar_split(n_train: int, holdout: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(train indices, validation indices or None), both sorted. The split is fixed (seed 0),
    not drawn per run: every run, and every prepared .beton, validates on the same images."""
    if holdout >= n_train:
        raise DataError(f"data.val_split={holdout} leaves no training images out of {n_train}")
    if not holdout:
        return np.arange(n_train), None
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(0)).numpy()
    return np.sort(perm[: n_train - holdout]), np.sort(perm[n_train - holdout:])


def cifar_stats(train_images: torch.Tensor, normalize: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) on [0, 1] pixels from the training images (N, 3, 32, 32) uint8: the per-pixel
    mean image and std 1 (paper §4.2, `pixel_mean`), or per-channel mean and std (`channel`)."""
    if normalize == "pixel_mean":
        return train_images.double().mean(0).div(255).float(), torch.ones(3, 1, 1)
    flat = train_images.double().div(255)
    return flat.mean((0, 2, 3)).float().view(3, 1, 1), flat.std((0, 2, 3)).float().view(3, 1, 1)


def _imagenet(cfg: Config) -> Data:
    from reproduce.data import imagenet

    d = cfg.data
    train = imagenet.image_folder(d.path, "train", None)
    val = imagenet.image_folder(d.path, "val", None)
    if train.classes != val.classes:
        raise DataError(f"{d.path}: train/ and val/ have different class folders")
    listing = "\n".join(p for p, _ in train.samples + val.samples).encode()
    center = imagenet.eval_transform(d.crop, "center224")
    augment = imagenet.train_transform(d.scale, d.crop, d.lighting, d.augment)
    if d.augment and d.train_crop == "random_resized":  # the scale augmentation's resize + crop replaced
        from torchvision.transforms import v2

        rest = [t for t in augment.transforms[1:] if not isinstance(t, (v2.RandomShortestSize, v2.RandomCrop))]
        augment = v2.Compose([augment.transforms[0], v2.RandomResizedCrop(d.crop, antialias=True), *rest])
    return Data(
        train=Split(train, augment, seeded=True),
        val=Split(val, center),
        test=Split(val, imagenet.eval_transform(d.crop, cfg.eval.protocol.value)),
        num_classes=len(train.classes),
        fingerprint=hashlib.sha256(listing).hexdigest()[:16],
        description=f"ImageNet-style folders at {d.path}: {len(train)} train / {len(val)} val images, "
        f"{len(train.classes)} classes; test = val with protocol {cfg.eval.protocol.value}",
    )


def _synthetic(cfg: Config) -> Data:
    """Random images of the dataset's shapes, for benchmarks only; errors on it mean nothing."""
    cifar = cfg.data.dataset == "cifar10"
    size, classes = (32, 10) if cifar else (cfg.data.crop, 1000)
    n_train, n_test = (50_000, 10_000) if cifar else (1_281_167, 50_000)
    gen = torch.Generator().manual_seed(cfg.seed)
    pool = torch.randn(64, 3, size, size, generator=gen)  # cycled: no per-sample generation cost
    views = 10 if cfg.eval.protocol == Protocol.TENCROP else 0
    train = _Pairs(pool, torch.randint(classes, (64,), generator=gen), n_train)
    test = _Pairs(pool.unsqueeze(1).expand(-1, views, -1, -1, -1) if views else pool, train.labels, n_test)
    return Data(Split(train, None, seeded=True), Split(_Pairs(pool, train.labels, n_test), None), Split(test, None),
                classes, f"synthetic-{cfg.seed}", f"synthetic {size}x{size} tensors (benchmark input: errors are meaningless)")


class _Pairs:
    """(image, label) from tensors; `length` > len(images) cycles them (synthetic data)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, length: int | None = None):
        self.images, self.labels = images, labels
        self.length = length or len(images)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        index %= len(self.images)
        return self.images[index], int(self.labels[index])


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()[:16]
