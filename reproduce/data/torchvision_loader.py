"""data.loader=torchvision: DataLoader worker processes, PIL decode, torchvision transforms.

A training sample is an (index, seed) pair of TrainBatches and its augmentation runs under
that seed, so a batch does not depend on which worker draws which sample. The DataLoaders are
workers.Batches: a worker's error is one line, the workers end with the iteration.
"""

from __future__ import annotations

import numpy as np
import torch

from reproduce.config import Config
from reproduce.data.augment import cifar_transforms
from reproduce.data.base import Data, Pairs, Split
from reproduce.data.cifar import cifar10
from reproduce.data.imagenet import MultiScale
from reproduce.data.imagenet import build_data as build_imagenet
from reproduce.data.order import TrainBatches, eval_indices
from reproduce.data.workers import Batches
from reproduce.distributed import DistInfo


def build_data(cfg: Config) -> Data:
    if cfg.data.dataset == "folder":
        from reproduce.data.folder import build_data as build_folder

        return build_folder(cfg)
    if cfg.data.dataset != "cifar10":
        return build_imagenet(cfg)
    c = cifar10(cfg)
    augment, plain = cifar_transforms(c.mean, c.std, cfg.data.augment)
    base = Pairs(c.images, c.labels)
    return Data(
        train=Split(base, augment, c.train_idx, seeded=True),
        val=Split(base, plain, c.val_idx) if c.val_idx is not None else None,
        test=Split(base, plain, np.arange(c.n_train, len(c.images))),
        num_classes=10,
        fingerprint=c.fingerprint,
        description=c.description,
    )


def train_batches(split: Split, cfg: Config, info: DistInfo, start: int) -> Batches:
    """This rank's (images, labels) for iterations start .. schedule.iterations."""
    batches = TrainBatches(
        len(split), cfg.optim.batch_size, info.rank, info.world_size, cfg.seed, start, cfg.schedule.iterations
    )
    return Batches(
        split,
        batch_sampler=batches,
        num_workers=cfg.data.workers,
        pin_memory=info.device.type == "cuda",
        persistent_workers=False,
    )


def eval_batches(split: Split, cfg: Config, info: DistInfo) -> Batches:
    """This rank's share of `split` (eval_indices), in eval.batch_size batches; multiscale in batches
    of as many pixels as eval.batch_size crops (at least one image), collated per scale."""
    share = torch.utils.data.Subset(split, eval_indices(len(split), cfg, info).tolist())
    batch, collate = cfg.eval.batch_size, None
    if isinstance(split.transform, MultiScale):
        batch, collate = max(1, int(batch // split.transform.pixels(cfg.data.crop))), collate_scales
    return Batches(
        share,
        batch_size=batch,
        num_workers=cfg.data.workers,
        collate_fn=collate,
        pin_memory=info.device.type == "cuda",
    )


def collate_scales(samples: list) -> tuple[list, torch.Tensor]:
    """[(per-scale tuple, label)] -> ([per scale: (B, V, C, H, W), or a list of (V, C, H, W) where the
    images' sizes differ], labels)."""
    images, labels = zip(*samples)
    scales = [torch.stack(views) if len({v.shape for v in views}) == 1 else list(views) for views in zip(*images)]
    return scales, torch.tensor(labels)
