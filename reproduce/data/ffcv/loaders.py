"""FFCV loaders: `data.loader=ffcv`, `data.path=DIR` written by `reproduce prepare` (prepare.py).

Order. A rank gives FFCV exactly the images of its slices of the global batches, in the
order every loader of the suite uses (TrainBatches: the epoch's permutation from (seed,
epoch), global batch k cut into world_size contiguous slices). So each rank reads its own
disjoint shard, 1 and N processes see the same global batches, and a run resumed at
iteration k starts FFCV at k's batch of its epoch: nothing consumed before is decoded again.
FFCV's own `OrderOption.RANDOM, distributed=True` is not used: it shards with a
DistributedSampler (every world_size-th position, padded by repeating images), so its
batches depend on the number of processes and a resumed epoch restarts from its beginning.

What is bitwise repeatable, and what is not:
- CIFAR-10. FFCV reads raw pixels; normalisation, pad-crop and flip run in torch with the gpu
  loader's per-position draws. The batches are the gpu loader's bit for bit: exact on
  resume, the same for 1 and N processes and for any number of FFCV threads.
- ImageNet. The decoder (JPEG decode, crop, resize, flip, in numba threads) draws its crop
  and flip from a hash of (seed, the rank's batch, image index), not from numba's per-thread
  generators, so they repeat run to run and on resume with the same number of processes;
  with another number of processes a rank's batches, and so the crops and flips, differ.
  The PCA lighting is drawn in torch per position from the epoch's generator (independent of
  the world size) and folded into the normalisation, one pass from uint8 to float.
  None of these are the torchvision path's numbers: the images were stored at most
  `max_side` pixels on a side (half of them as JPEG), and the crop region is resized in one
  step (FFCV's resize_crop, OpenCV INTER_AREA) where torchvision resizes the whole image
  (bilinear, antialiased) and then crops.
- Evaluation (CIFAR single view, center crop, 10-crop) draws nothing: always repeatable.

Importing this module does not import FFCV: the calls into FFCV are pipeline.py's, imported
on first use by `ffcv_library` (which keeps torch's thread count, and says how to install
FFCV when it is missing).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from reproduce.config import Config
from reproduce.data.augment import epoch_augmentation, normalize, pad_crop_flip
from reproduce.data.base import Data, DataError
from reproduce.data.cifar import describe
from reproduce.data.ffcv.manifest import BetonSplit, read_manifest, same_preparation
from reproduce.data.imagenet import MEAN, PCA_EIGVAL, PCA_EIGVEC, STD
from reproduce.data.order import batches_per_epoch, epoch_generator, eval_indices, rank_slice
from reproduce.distributed import DistInfo


def ffcv_library(needed_by: str = "data.loader=ffcv"):
    """reproduce.data.ffcv.pipeline, the module that calls FFCV, imported on first use:
    importing FFCV sets torch's thread count to 1 (ffcv.pipeline.compiler), put back here.
    DataError saying how to install FFCV when it is missing."""
    threads = torch.get_num_threads()
    try:
        from reproduce.data.ffcv import pipeline
    except ImportError as err:
        raise DataError(
            f"{needed_by} needs FFCV ({err}): apt-get install -y libturbojpeg0-dev libopencv-dev "
            "pkg-config, then pip install -e '.[ffcv]'"
        ) from None
    finally:
        torch.set_num_threads(threads)
    return pipeline


def build_data(cfg: Config) -> Data:
    """The splits of data.path (a `reproduce prepare` folder), checked against the config."""
    root, d = Path(cfg.data.path), cfg.data
    if not root.is_dir():
        raise DataError(
            f"data.loader=ffcv needs data.path to be a folder written by `reproduce prepare`; {root} is not a folder"
        )
    if d.dataset == "cifar10":
        train = _open(root / "train.beton", "train", cfg)
        m = train.manifest
        if m["val_split"] != d.val_split:
            raise DataError(
                f"{root} was prepared with a validation split of {m['val_split']} images but the config asks for "
                f"data.val_split={d.val_split}; prepare again with --val-split {d.val_split} "
                f"(or set data.val_split={m['val_split']})"
            )
        val = _open(root / "val.beton", "eval", cfg) if d.val_split else None
        test = _open(root / "test.beton", "eval", cfg)
        same_preparation(train, val, test, keys=("source_digest", "val_split"))
        return Data(
            train,
            val,
            test,
            num_classes=10,
            fingerprint=m["source_digest"],
            description=describe(
                len(train), d.val_split, len(test), f"FFCV files in {root} (prepared from {m['source']})", m["lossy"]
            ),
        )
    train = _open(root / "train.beton", "train", cfg)
    val = _open(root / "val.beton", "eval", cfg)
    same_preparation(train, val, keys=("classes", "source", "writer"))
    test = BetonSplit(val.path, val.manifest, "tencrop" if cfg.eval.protocol.value == "tencrop" else "eval")
    w = train.manifest["writer"]
    listing = (train.manifest["listing_sha256"] + val.manifest["listing_sha256"]).encode()
    return Data(
        train,
        val,
        test,
        num_classes=len(train.manifest["classes"]),
        fingerprint=hashlib.sha256(listing).hexdigest()[:16],
        description=f"ImageNet-style FFCV files in {root} (from {train.manifest['source']}; max side {w['max_side']}, "
        f"{w['compress_probability']:.0%} JPEG at quality {w['jpeg_quality']}): {len(train)} train / {len(val)} val "
        f"images, {len(train.manifest['classes'])} classes; test = val with protocol {cfg.eval.protocol.value}",
    )


def _open(beton: Path, role: str, cfg: Config) -> BetonSplit:
    """A split whose file and manifest agree with each other and with the config, or DataError."""
    manifest = read_manifest(beton, cfg)
    ffcv_library().check_beton(beton, manifest)
    return BetonSplit(beton, manifest, role)


# ---------------------------------------------------------------------------------------
# Batches


def train_batches(split: BetonSplit, cfg: Config, info: DistInfo, start: int):
    """This rank's (images, labels) for iterations start .. schedule.iterations, on info.device."""
    n, global_batch = len(split), cfg.optim.batch_size
    per_epoch, per_rank = batches_per_epoch(n, global_batch), global_batch // info.world_size
    lib = ffcv_library()
    loader = lib.loader_for(split, cfg, per_rank)
    it, stop = start, cfg.schedule.iterations
    while it < stop:
        epoch = it // per_epoch
        last = min(stop, (epoch + 1) * per_epoch)  # this pass ends with the epoch or the run
        draws = _epoch_draws(split, cfg, epoch, n)
        wheres = [rank_slice(i, per_epoch, global_batch, info.rank, info.world_size) for i in range(it, last)]
        order = np.concatenate([draws["perm"][w] for w in wheres])
        batches = lib.iterate(loader, order, split.path.name)
        try:
            for where in wheres:
                images, labels = next(batches)
                yield _finish_train(images, labels, where, draws, split, cfg, info.device)
        finally:  # also when the training loop stops early: ends FFCV's reader thread
            batches.close()
        it = last


def eval_batches(split: BetonSplit, cfg: Config, info: DistInfo):
    """This rank's share of `split` (as eval_loader picks it), in eval.batch_size batches."""
    lib = ffcv_library()
    loader = lib.loader_for(split, cfg, cfg.eval.batch_size)
    for images, labels in lib.iterate(loader, eval_indices(len(split), cfg, info), split.path.name):
        yield _finish_eval(images, labels, split, cfg, info.device)


def _epoch_draws(split: BetonSplit, cfg: Config, epoch: int, n: int) -> dict[str, np.ndarray | torch.Tensor]:
    """The epoch's permutation and per-position augmentation (see the module docstring)."""
    if split.dataset == "cifar10":
        perm, offsets, flips = epoch_augmentation(cfg.seed, epoch, n)
        return {"perm": perm.numpy(), "offsets": offsets, "flips": flips}
    generator = epoch_generator(cfg.seed, epoch)
    perm = torch.randperm(n, generator=generator)
    alphas = torch.randn(n, 3, generator=generator) * cfg.data.lighting
    return {"perm": perm.numpy(), "alphas": alphas}


def _finish_train(images, labels, where: slice, draws, split: BetonSplit, cfg: Config, device: torch.device):
    """FFCV's uint8 (B, H, W, 3) batch -> the model's float (B, 3, H, W), augmented per position.
    FFCV reuses its buffers: everything returned here is a new tensor."""
    labels = _on_device(labels.view(-1), device).clone()
    images = _on_device(images, device)  # (B, H, W, 3) uint8: a quarter of the float batch's bytes
    if split.dataset == "cifar10":
        batch = normalize(
            images.permute(0, 3, 1, 2).contiguous(), *_cifar_stats(split, cfg, device)
        )  # NCHW as the others
        if cfg.data.augment:
            batch = pad_crop_flip(batch, draws["offsets"][where].to(device), draws["flips"][where].to(device))
        return batch, labels
    shift = torch.zeros(len(labels), 3)
    if cfg.data.augment:  # crop and flip are the decoder's
        shift = (draws["alphas"][where] * PCA_EIGVAL) @ PCA_EIGVEC.T  # AlexNet PCA lighting, (B, 3) on [0, 1] pixels
    return _normalized(images, shift, device), labels


_COPY_STREAMS: dict = {}


def _on_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor`, which lives in one of FFCV's reused (pinned) buffers, on `device`; on the CPU
    it is still FFCV's buffer (every caller makes a new tensor from it at once). A CUDA copy
    runs on a side stream and is waited for here: FFCV writes into the same buffer again a few
    batches later, and a copy queued behind the training step's work could still be pending."""
    if device.type != "cuda":
        return tensor
    stream = _COPY_STREAMS.setdefault(str(device), torch.cuda.Stream(device))
    with torch.cuda.stream(stream):
        out = tensor.to(device, non_blocking=True)
    stream.synchronize()  # only this copy: the training stream's queue is not waited for
    out.record_stream(torch.cuda.current_stream(device))
    return out


def _normalized(images: torch.Tensor, shift: torch.Tensor, device: torch.device) -> torch.Tensor:
    """((uint8 / 255 + shift) - MEAN) / STD as one pass over FFCV's uint8 (B, [10,] H, W, 3)
    batch, float32 (B, [10,] 3, H, W) out, channels-last like FFCV's batches:
    images * 1 / (255 STD) + (shift - MEAN) / STD. On the CPU in numba's threads, on a GPU there."""
    mean, std = torch.tensor(MEAN), torch.tensor(STD)
    scale, bias = 1 / (255 * std), (shift - mean) / std
    views = images.shape[1:-3]  # the 10 views of a 10-crop batch share their image's bias
    nchw = (0, *range(1, len(views) + 1), images.dim() - 1, images.dim() - 3, images.dim() - 2)
    if device.type == "cpu":
        flat = bias.repeat_interleave(views.numel(), dim=0)
        return (
            ffcv_library()
            .affine_cpu(images.reshape(-1, *images.shape[-3:]), scale, flat)
            .view(images.shape)
            .permute(*nchw)
        )
    bias = bias.to(device).view(-1, *[1] * len(views), 1, 1, 3)
    return torch.addcmul(bias, images, scale.to(device)).permute(*nchw)


def _finish_eval(images, labels, split: BetonSplit, cfg: Config, device: torch.device):
    labels, images, shift = (
        _on_device(labels.view(-1), device).clone(),
        _on_device(images, device),
        torch.zeros(len(labels), 3),
    )
    if split.dataset == "cifar10":
        return normalize(images.permute(0, 3, 1, 2).contiguous(), *_cifar_stats(split, cfg, device)), labels
    return _normalized(images, shift, device), labels  # 10-crop: (B, 10, H, W, 3)


def _cifar_stats(split: BetonSplit, cfg: Config, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the training images, as `reproduce prepare` computed them (cifar_stats)
    and stored them in every manifest of the folder."""
    key = (cfg.data.normalize.value, str(device))
    if key not in split._stats:
        stored = split.manifest["normalization"][cfg.data.normalize.value]
        mean = torch.tensor(stored["mean"], dtype=torch.float32)
        std = torch.tensor(stored["std"], dtype=torch.float32).view(3, 1, 1)
        mean = mean.view(3, 32, 32) if mean.numel() == 3 * 32 * 32 else mean.view(3, 1, 1)
        split._stats[key] = (mean.to(device), std.to(device))
    return split._stats[key]
