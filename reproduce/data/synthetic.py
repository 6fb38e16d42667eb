"""data.synthetic=true: random tensors of the dataset's shapes, for benchmarks only (errors
on them mean nothing), through the torchvision loader's DataLoader whatever data.loader is."""

from __future__ import annotations

import torch

from reproduce.config import Config, Protocol
from reproduce.data.base import Data, Pairs, Split
from reproduce.data.torchvision_loader import eval_batches, train_batches

__all__ = ["build_data", "train_batches", "eval_batches"]


def build_data(cfg: Config) -> Data:
    cifar = cfg.data.dataset == "cifar10"
    size, classes = (32, 10) if cifar else (cfg.data.crop, 1000)
    n_train, n_test = (50_000, 10_000) if cifar else (1_281_167, 50_000)
    gen = torch.Generator().manual_seed(cfg.seed)
    pool = torch.randn(64, 3, size, size, generator=gen)  # cycled: no per-sample generation cost
    views = 10 if cfg.eval.protocol == Protocol.TENCROP else 0
    train = Pairs(pool, torch.randint(classes, (64,), generator=gen), n_train)
    test = Pairs(pool.unsqueeze(1).expand(-1, views, -1, -1, -1) if views else pool, train.labels, n_test)
    return Data(
        Split(train, None, seeded=True),
        Split(Pairs(pool, train.labels, n_test), None),
        Split(test, None),
        classes,
        f"synthetic-{cfg.seed}",
        f"synthetic {size}x{size} tensors (benchmark input: errors are meaningless)",
    )
