"""FFCV loaders: `data.loader=ffcv`, `data.path=DIR` written by `reproduce prepare`.

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

FFCV 1.0.2 internals used (the version is pinned): `EpochIterator`, subclassed so that an
exception in its thread reaches the consumer instead of leaving it waiting forever, and
`ResizedCropRGBImageDecoder` (ffcv_decode.py).
"""
from __future__ import annotations

import hashlib
import json
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numba
import numpy as np
import torch

_threads = torch.get_num_threads()
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import SimpleRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.loader.epoch_iterator import IS_CUDA, EpochIterator
from ffcv.pipeline.compiler import Compiler
from ffcv.reader import Reader
from ffcv.transforms import ToTensor

torch.set_num_threads(_threads)  # importing FFCV sets torch's thread count to 1 (ffcv.pipeline.compiler)
from reproduce.config import Config
from reproduce.data import Data, DataError, epoch_generator, eval_indices, rank_slice
from reproduce.data.ffcv_decode import CENTER, RANDOM_RESIZED, SCALE, TENCROP, CropDecoder
from reproduce.data.gpu import epoch_augmentation, normalize, pad_crop_flip
from reproduce.data.imagenet import MEAN, PCA_EIGVAL, PCA_EIGVEC, STD, TEST_SHORT_SIDE
from reproduce.distributed import DistInfo

MANIFEST_FORMAT = "reproduce-beton-1"
FIELDS = ("image", "label")
POLL_S = 1.0  # seconds between checks that FFCV's reader thread is still alive


def manifest_path(beton: Path) -> Path:
    return beton.with_name(beton.name.removesuffix(".beton") + ".manifest.json")


@dataclass(eq=False)
class BetonSplit:
    """One prepared split: its .beton file, its manifest and how to decode it."""

    path: Path
    manifest: dict
    role: str  # "train", "eval" or "tencrop"
    _loaders: dict = field(default_factory=dict, repr=False)
    _stats: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return int(self.manifest["images"])

    @property
    def dataset(self) -> str:
        return self.manifest["dataset"]


def build_data(cfg: Config) -> Data:
    """The splits of data.path (a `reproduce prepare` folder), checked against the config."""
    root, d = Path(cfg.data.path), cfg.data
    if not root.is_dir():
        raise DataError(f"data.loader=ffcv needs data.path to be a folder written by `reproduce prepare`; {root} is not a folder")
    if d.dataset == "cifar10":
        train = _open(root / "train.beton", "train", cfg)
        m = train.manifest
        if m["val_split"] != d.val_split:
            raise DataError(f"{root} was prepared with a validation split of {m['val_split']} images but the config asks for "
                            f"data.val_split={d.val_split}; prepare again with --val-split {d.val_split} (or set data.val_split={m['val_split']})")
        val = _open(root / "val.beton", "eval", cfg) if d.val_split else None
        test = _open(root / "test.beton", "eval", cfg)
        _same_preparation(train, val, test, keys=("source_digest", "val_split"))
        lossy = " (lossy JPEG copy: errors are not comparable to the paper's to the decimal)" if m["lossy"] else ""
        return Data(train, val, test, num_classes=10, fingerprint=m["source_digest"],
                    description=f"CIFAR-10 {len(train)} train / {d.val_split} val / {len(test)} test from FFCV files in "
                    f"{root} (prepared from {m['source']}){lossy}")
    train = _open(root / "train.beton", "train", cfg)
    val = _open(root / "val.beton", "eval", cfg)
    _same_preparation(train, val, keys=("classes", "source", "writer"))
    test = BetonSplit(val.path, val.manifest, "tencrop" if cfg.eval.protocol.value == "tencrop" else "eval")
    w = train.manifest["writer"]
    listing = (train.manifest["listing_sha256"] + val.manifest["listing_sha256"]).encode()
    return Data(train, val, test, num_classes=len(train.manifest["classes"]),
                fingerprint=hashlib.sha256(listing).hexdigest()[:16],
                description=f"ImageNet-style FFCV files in {root} (from {train.manifest['source']}; max side {w['max_side']}, "
                f"{w['compress_probability']:.0%} JPEG at quality {w['jpeg_quality']}): {len(train)} train / {len(val)} val "
                f"images, {len(train.manifest['classes'])} classes; test = val with protocol {cfg.eval.protocol.value}")


def _same_preparation(first: BetonSplit, *others: BetonSplit | None, keys: tuple[str, ...]) -> None:
    for other in filter(None, others):
        for key in keys:
            if key == "writer":
                differ = {k: v for k, v in other.manifest[key].items() if k != "stored_jpeg"} != \
                    {k: v for k, v in first.manifest[key].items() if k != "stored_jpeg"}
            else:
                differ = other.manifest[key] != first.manifest[key]
            if differ:
                raise DataError(f"{first.path.parent}: {first.path.name} and {other.path.name} come from different "
                                f"preparations ({key} differs); prepare the folder again")


def _open(beton: Path, role: str, cfg: Config) -> BetonSplit:
    """A split whose file and manifest agree with each other and with the config, or DataError."""
    how = f"write it with: reproduce prepare {cfg.data.dataset} --source SOURCE --out {beton.parent}"
    if not beton.is_file():
        raise DataError(f"{beton} not found; {how}")
    try:
        manifest = json.loads(manifest_path(beton).read_text())
    except FileNotFoundError:
        raise DataError(f"{manifest_path(beton)} not found (every .beton needs its manifest); {how}") from None
    except (OSError, ValueError) as err:
        raise DataError(f"{manifest_path(beton)} is unreadable ({err}); {how}") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{manifest_path(beton)} is not a manifest of format {MANIFEST_FORMAT}; {how}")
    if manifest["dataset"] != cfg.data.dataset:
        raise DataError(f"{beton} holds {manifest['dataset']} but data.dataset is {cfg.data.dataset}")
    check_beton(beton, manifest)
    return BetonSplit(beton, manifest, role)


def check_beton(beton: Path, manifest: dict) -> None:
    """Cheap structural checks, so that a damaged file fails here in one line and not as a
    crash or a hang inside FFCV: size, header, fields, allocation table, per-image metadata."""
    size = beton.stat().st_size
    if size != manifest["bytes"]:
        raise DataError(f"{beton} has {size} bytes but was written with {manifest['bytes']} (truncated or overwritten?); "
                        f"prepare it again")
    try:
        reader = Reader(str(beton))
    except Exception as err:  # numpy and FFCV raise several types for a damaged header
        raise DataError(f"{beton} is not a readable FFCV file: {err}") from None
    problem = None
    if tuple(reader.field_names) != FIELDS:
        problem = f"its fields are {reader.field_names}, expected {list(FIELDS)}"
    elif reader.num_samples != manifest["images"]:
        problem = f"it holds {reader.num_samples} images, its manifest says {manifest['images']}"
    else:
        table = reader.alloc_table
        image = reader.metadata["f0"]
        if len(table) == 0 or int((table["ptr"] + table["size"]).max()) > size:
            problem = "its allocation table points past the end of the file"
        elif len(np.unique(table["sample_id"])) != reader.num_samples:
            problem = "some images have no data"
        elif (image["width"] == 0).any() or (image["height"] == 0).any() or (image["mode"] > 1).any():
            problem = "its image metadata is damaged"
    if problem:
        raise DataError(f"{beton}: {problem}; prepare it again")


# ---------------------------------------------------------------------------------------
# Batches


def train_batches(split: BetonSplit, cfg: Config, info: DistInfo, start: int):
    """This rank's (images, labels) for iterations start .. schedule.iterations, on info.device."""
    n, global_batch = len(split), cfg.optim.batch_size
    if n < global_batch:
        raise DataError(f"the training split has {n} images, fewer than one batch of {global_batch}")
    per_epoch, per_rank = n // global_batch, global_batch // info.world_size
    loader = _loader(split, cfg, per_rank)
    it, stop = start, cfg.schedule.iterations
    while it < stop:
        epoch = it // per_epoch
        last = min(stop, (epoch + 1) * per_epoch)  # this pass ends with the epoch or the run
        draws = _epoch_draws(split, cfg, epoch, n)
        wheres = [rank_slice(i, per_epoch, global_batch, info.rank, info.world_size) for i in range(it, last)]
        order = np.concatenate([draws["perm"][w] for w in wheres])
        batches = iterate(loader, order, split.path.name)
        try:
            for where in wheres:
                images, labels = next(batches)
                yield _finish_train(images, labels, where, draws, split, cfg, info.device)
        finally:  # also when the training loop stops early: ends FFCV's reader thread
            batches.close()
        it = last


def eval_batches(split: BetonSplit, cfg: Config, info: DistInfo):
    """This rank's share of `split` (as eval_loader picks it), in eval.batch_size batches."""
    loader = _loader(split, cfg, cfg.eval.batch_size)
    for images, labels in iterate(loader, eval_indices(len(split), cfg, info), split.path.name):
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
        batch = normalize(images.permute(0, 3, 1, 2).contiguous(), *_cifar_stats(split, cfg, device))  # NCHW as the others
        if cfg.data.augment:
            batch = pad_crop_flip(batch, draws["offsets"][where].to(device), draws["flips"][where].to(device))
        return batch, labels
    shift = torch.zeros(len(labels), 3)
    if cfg.data.augment:  # crop and flip are the decoder's
        shift = (draws["alphas"][where] * PCA_EIGVAL) @ PCA_EIGVEC.T  # AlexNet PCA lighting, (B, 3) on [0, 1] pixels
    return _normalized(images.permute(0, 3, 1, 2), shift, device), labels


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
    """((uint8 / 255 + shift) - MEAN) / STD as one pass over the images (uint8 in, float32 out,
    channels-last like FFCV's batches): images * 1 / (255 STD) + (shift - MEAN) / STD."""
    mean, std = torch.tensor(MEAN), torch.tensor(STD)
    scale = (1 / (255 * std)).to(device)
    bias = ((shift - mean) / std).to(device)
    views = [1] * (images.dim() - 4)  # the 10 views of a 10-crop batch share their image's bias
    return torch.addcmul(bias.view(-1, *views, 3, 1, 1), images, scale.view(3, 1, 1))


def _finish_eval(images, labels, split: BetonSplit, cfg: Config, device: torch.device):
    labels, images, shift = _on_device(labels.view(-1), device).clone(), _on_device(images, device), torch.zeros(len(labels), 3)
    if split.dataset == "cifar10":
        return normalize(images.permute(0, 3, 1, 2).contiguous(), *_cifar_stats(split, cfg, device)), labels
    if split.role == "tencrop":  # (B, 10, H, W, 3)
        return _normalized(images.permute(0, 1, 4, 2, 3), shift, device), labels
    return _normalized(images.permute(0, 3, 1, 2), shift, device), labels


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


# ---------------------------------------------------------------------------------------
# FFCV loaders and their reader thread


def _loader(split: BetonSplit, cfg: Config, batch_size: int) -> Loader:
    """FFCV's Loader for `split` (compiled once per process and batch size; the first batch
    pays numba's JIT, several seconds)."""
    workers = min(max(1, cfg.data.workers), numba.config.NUMBA_NUM_THREADS)  # numba refuses more threads than it has
    key = (batch_size, workers, cfg.seed)
    if key not in split._loaders:
        threads = torch.get_num_threads()  # FFCV sets torch's thread count to its own
        try:
            split._loaders[key] = Loader(str(split.path), batch_size=batch_size, num_workers=workers,
                                         order=OrderOption.SEQUENTIAL, seed=0, drop_last=False, batches_ahead=2,
                                         pipelines={"image": [_decoder(split, cfg), ToTensor()],
                                                    "label": [IntDecoder(), ToTensor()]})
        except Exception as err:  # FFCV raises TypeError, ValueError, ... for a file it cannot decode this way
            raise DataError(f"FFCV cannot read {split.path}: {type(err).__name__}: {str(err).strip().splitlines()[0]}") from None
        finally:
            torch.set_num_threads(threads)
    return split._loaders[key]


def _decoder(split: BetonSplit, cfg: Config):
    if split.dataset == "cifar10":
        return SimpleRGBImageDecoder()
    d = cfg.data
    resize_short = round(d.crop * TEST_SHORT_SIDE / 224)  # evaluation: shorter side resized to this, then cropped
    if split.role == "tencrop":
        return CropDecoder(TENCROP, d.crop, resize_short=resize_short)
    if split.role == "eval" or not d.augment:
        return CropDecoder(CENTER, d.crop, resize_short=resize_short)
    return CropDecoder(SCALE if d.train_crop == "scale" else RANDOM_RESIZED, d.crop, scale=d.scale, seed=cfg.seed)


_FAILED = object()


class _Epoch(EpochIterator):
    """FFCV's epoch thread, with its exceptions handed to the consumer: FFCV's own thread dies
    with them and leaves `next()` waiting forever."""

    def __init__(self, loader: Loader, order: np.ndarray, what: str):
        self.what, self.failure = what, None
        super().__init__(loader, order)  # starts the thread

    def run(self):
        try:
            super().run()
        except BaseException as err:
            self.failure = err
            while not self.terminate_event.is_set():
                try:
                    self.output_queue.put(_FAILED, timeout=0.5)
                    return
                except queue.Full:
                    pass

    def __next__(self):
        while True:
            try:
                item = self.output_queue.get(timeout=POLL_S)
                break
            except queue.Empty:
                if not self.is_alive() and self.output_queue.empty():
                    item = _FAILED
                    break
        if item is None:
            self.close()
            raise StopIteration
        if item is _FAILED:
            self.close()
            err = self.failure or RuntimeError("its reader thread ended without a result")
            message = (str(err).strip().splitlines() or [""])[0]
            raise DataError(f"FFCV failed reading {self.what}: {type(err).__name__}: {message}") from err
        slot, result = item
        if IS_CUDA:  # as FFCV's own iterator: wait for the batch's stream
            self.current_stream.wait_stream(self.cuda_streams[slot])
        return result

    def close(self):
        """Stop the thread and wait for it to end. FFCV's own close only sets the flag: a thread
        whose batches were not all taken, or that is putting its end-of-epoch marker into a full
        queue, would wait forever, holding the epoch's batch buffers."""
        self.terminate_event.set()
        if threading.current_thread() is not self:
            while self.is_alive():
                try:
                    self.output_queue.get(timeout=0.1)  # room for a put that does not look at the flag
                except queue.Empty:
                    pass
        if not self.closed:
            self.closed = True
            self.memory_context.__exit__(None, None, None)


def iterate(loader: Loader, order: np.ndarray, what: str):
    """(images, labels) of `loader` for the sample indices `order`, cut into loader.batch_size
    batches (the last may be short). Errors of FFCV's thread arrive here as DataError."""
    threads = torch.get_num_threads()
    Compiler.set_num_threads(loader.num_workers)  # numba's threads for this process (FFCV's __iter__ does the same)
    epoch = None
    try:
        epoch = _Epoch(loader, np.ascontiguousarray(order, dtype=np.uint64), what)
        for i, batch in enumerate(epoch):
            if i == 0:  # the thread has set torch's thread count to FFCV's by now: put it back
                torch.set_num_threads(threads)
            yield batch
    except MemoryError as err:
        raise DataError(f"FFCV ran out of memory reading {what}: {err}") from None
    finally:
        if epoch is not None:
            epoch.close()
        torch.set_num_threads(threads)


def ffcv_version() -> str:
    from importlib.metadata import version

    return version("ffcv")


