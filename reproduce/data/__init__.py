"""Input for training and evaluation, behind one interface for every dataset and loader.

`build_data(cfg)` returns the three splits; `train_loader` streams the training batches of
one rank from a given iteration on; `eval_loader` gives a rank its share of an evaluation
split. The input order and every random augmentation are pure functions of (seed,
iteration, sample): a run resumed at iteration k sees exactly the batches an uninterrupted
run sees, whatever the number of workers, and the processes of a job split each global
batch between them (so 1 and N processes see the same global batches).

`data.loader` picks the backend behind this interface (BACKENDS): `torchvision` (DataLoader
workers, PIL decode; torchvision_loader.py), `ffcv` (.beton files written by `reproduce
prepare`; ffcv/), `gpu` (CIFAR-10 resident on the device; gpu.py) or `device` (ImageNet JPEGs
decoded in batches on the device; device_decode.py); `data.synthetic` replaces
the data with random tensors (synthetic.py). Each backend module has build_data(cfg),
train_batches(split, cfg, info, start) and eval_batches(split, cfg, info), and is imported on
first use. All use the same order (order.py) and, for CIFAR-10, the same split, statistics
(cifar.py) and augmentation semantics (augment.py).

Layers, each importing only those below it: base.py (Data, Split, DataError) < order.py <
augment.py, cifar.py, imagenet.py < the backends < this face.
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType
from typing import Callable

from reproduce.config import Config
from reproduce.data.base import Data, DataError, Split
from reproduce.data.cifar import cifar_split, cifar_stats
from reproduce.data.ffcv import load as _load_ffcv
from reproduce.data.order import TrainBatches
from reproduce.distributed import DistInfo

__all__ = [
    "Data",
    "DataError",
    "Split",
    "TrainBatches",
    "build_data",
    "train_loader",
    "eval_loader",
    "cifar_split",
    "cifar_stats",
    "ffcv_module",
    "BACKENDS",
]


def ffcv_module(needed_by: str = "data.loader=ffcv") -> ModuleType:
    """reproduce.data.ffcv.loaders with FFCV imported, or DataError saying how to install FFCV."""
    return _load_ffcv(needed_by)


def _module(name: str) -> Callable[[], ModuleType]:
    return lambda: import_module(name)


BACKENDS: dict[str, Callable[[], ModuleType]] = {  # data.loader (or "synthetic") -> its module, imported on first use
    "torchvision": _module("reproduce.data.torchvision_loader"),
    "gpu": _module("reproduce.data.gpu"),
    "device": _module("reproduce.data.device_decode"),
    "ffcv": ffcv_module,
    "synthetic": _module("reproduce.data.synthetic"),
}


def backend(cfg: Config) -> ModuleType:
    """The module behind cfg's data: data.synthetic's whatever the loader, else data.loader's."""
    return BACKENDS["synthetic" if cfg.data.synthetic else cfg.data.loader]()


def build_data(cfg: Config) -> Data:
    return backend(cfg).build_data(cfg)


def train_loader(data: Data, cfg: Config, info: DistInfo, start: int):
    """(images, labels) batches of this rank for iterations start .. schedule.iterations."""
    return backend(cfg).train_batches(data.train, cfg, info, start)


def eval_loader(split: Split, cfg: Config, info: DistInfo):
    """This rank's share (every world_size-th image) of `split`, optionally an evenly spread
    subset of eval.max_images images. Shares are disjoint: counts summed over ranks are exact."""
    return backend(cfg).eval_batches(split, cfg, info)
