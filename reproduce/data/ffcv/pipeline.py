"""The part of data.loader=ffcv that calls FFCV: a file's structural check, the Loader (decoding
pipeline) of a split, and the epoch thread that reads it.

Importing this module imports FFCV, which sets torch's thread count to 1; loaders.py imports
it through `ffcv_library`, which puts the count back. Building a Loader and iterating one set
it too (FFCV's Compiler.set_num_threads): `loader_for` and `iterate` put it back as well.

FFCV 1.0.2 internals used (the version is pinned): `EpochIterator`, subclassed so that an
exception in its thread reaches the consumer instead of leaving it waiting forever, and
`ResizedCropRGBImageDecoder` (decode.py).
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import numba
import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import SimpleRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.loader.epoch_iterator import IS_CUDA, EpochIterator
from ffcv.pipeline.compiler import Compiler
from ffcv.reader import Reader
from ffcv.transforms import ToTensor

from reproduce.config import Config
from reproduce.data.base import DataError
from reproduce.data.ffcv.decode import CENTER, RANDOM_RESIZED, SCALE, TENCROP, CropDecoder
from reproduce.data.ffcv.manifest import BetonSplit, check_size
from reproduce.data.imagenet import TEST_SHORT_SIDE

FIELDS = ("image", "label")
POLL_S = 1.0  # seconds between checks that FFCV's reader thread is still alive


def check_beton(beton: Path, manifest: dict) -> None:
    """Cheap structural checks, so that a damaged file fails here in one line and not as a
    crash or a hang inside FFCV: size, header, fields, allocation table, per-image metadata."""
    size = check_size(beton, manifest)
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


def loader_for(split: BetonSplit, cfg: Config, batch_size: int) -> Loader:
    """FFCV's Loader for `split` (compiled once per process and batch size; the first batch
    pays numba's JIT, several seconds)."""
    workers = min(max(1, cfg.data.workers), numba.config.NUMBA_NUM_THREADS)  # numba refuses more threads than it has
    key = (batch_size, workers, cfg.seed)
    if key not in split._loaders:
        threads = torch.get_num_threads()  # FFCV sets torch's thread count to its own
        try:
            split._loaders[key] = Loader(
                str(split.path),
                batch_size=batch_size,
                num_workers=workers,
                order=OrderOption.SEQUENTIAL,
                seed=0,
                drop_last=False,
                batches_ahead=2,
                pipelines={"image": [_decoder(split, cfg), ToTensor()], "label": [IntDecoder(), ToTensor()]},
            )
        except Exception as err:  # FFCV raises TypeError, ValueError, ... for a file it cannot decode this way
            raise DataError(
                f"FFCV cannot read {split.path}: {type(err).__name__}: {str(err).strip().splitlines()[0]}"
            ) from None
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


@numba.njit(parallel=True)
def _affine(images, scale, bias, out):
    """out[i, p, c] = images[i, p, c] * scale[c] + bias[i, c] for (N, P, 3) uint8 -> float32,
    images in parallel (torch's addcmul on these mixed types took 9 times as long on 2 cores)."""
    s0, s1, s2 = scale[0], scale[1], scale[2]
    for i in numba.prange(images.shape[0]):
        b0, b1, b2 = bias[i, 0], bias[i, 1], bias[i, 2]
        for px in range(images.shape[1]):
            out[i, px, 0] = images[i, px, 0] * s0 + b0
            out[i, px, 1] = images[i, px, 1] * s1 + b1
            out[i, px, 2] = images[i, px, 2] * s2 + b2


def affine_cpu(images: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A new float32 tensor of `images`' shape, (N, ..., 3) uint8 channels-last, holding
    images * scale + bias[n] per channel (scale (3,), bias (N, 3)), in numba's threads."""
    out = torch.empty(images.shape, dtype=torch.float32)
    n = images.shape[0]
    _affine(images.reshape(n, -1, 3).numpy(), scale.numpy(), bias.contiguous().numpy(), out.view(n, -1, 3).numpy())
    return out


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
