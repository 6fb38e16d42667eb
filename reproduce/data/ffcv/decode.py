"""The ImageNet decoder of data.loader=ffcv: decode, crop, resize and flip in one step, in
FFCV's numba threads, with every random choice drawn from a hash instead of numba's
per-thread generators (whose draws depend on which thread decodes which image).

The hash is splitmix64 of (seed, the indices of the batch in order, the image's index): a
pure function of the rank's batch, so it repeats run to run and on resume, and differs from
epoch to epoch because the batches do.
"""

from __future__ import annotations

from dataclasses import replace

import numba
import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler

SCALE, RANDOM_RESIZED, CENTER, TENCROP = 0, 1, 2, 3  # crop modes of CropDecoder

_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)


@numba.njit(inline="always")
def _mix(x):
    """splitmix64: a well-spread 64-bit hash of a 64-bit key."""
    x = x + _GOLDEN
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    return x ^ (x >> _S31)


@numba.njit(inline="always")
def _uniform(key, k):
    """The k-th uniform draw on [0, 1) of `key`."""
    return np.float64(_mix(key + np.uint64(k)) >> _S11) * (1.0 / 9007199254740992.0)


@numba.njit(inline="always")
def _batch_key(seed, batch_indices):
    key = _mix(seed)
    for i in range(len(batch_indices)):
        key = _mix(key ^ np.uint64(batch_indices[i]))
    return key


@numba.njit(inline="always")
def _below(u, n):
    """An integer uniform in 0 .. n-1 from u in [0, 1)."""
    return min(int(u * n), n - 1)


@numba.njit(inline="always")
def _mirror(source, target):
    """target[:, ::-1] = source for (H, W, 3) images (may be the same array)."""
    width = source.shape[1]
    for row in range(source.shape[0]):
        for col in range((width + 1) // 2):
            for ch in range(3):
                left, right = source[row, col, ch], source[row, width - 1 - col, ch]
                target[row, col, ch], target[row, width - 1 - col, ch] = right, left


@numba.njit(inline="always")
def _crop_box(mode, height, width, crop, lo, hi, resize_short, key):
    """(top, left, height, width) of the source region that becomes the crop x crop output."""
    short = min(height, width)
    if mode == SCALE:  # shorter side resized to s ~ U{lo..hi}, then a random crop x crop window
        s = lo + _below(_uniform(key, 0), hi - lo + 1)
        side = max(1, min(short, int(round(crop * short / s))))
        return _below(_uniform(key, 1), height - side + 1), _below(_uniform(key, 2), width - side + 1), side, side
    if mode == RANDOM_RESIZED:  # torchvision's RandomResizedCrop: area 8-100%, aspect 3/4-4/3, 10 tries
        area, log_lo, log_hi = height * width, np.log(3.0 / 4.0), np.log(4.0 / 3.0)
        for attempt in range(10):
            target = area * (0.08 + 0.92 * _uniform(key, 4 * attempt))
            aspect = np.exp(log_lo + (log_hi - log_lo) * _uniform(key, 4 * attempt + 1))
            w = int(round(np.sqrt(target * aspect)))
            h = int(round(np.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return (
                    _below(_uniform(key, 4 * attempt + 2), height - h + 1),
                    _below(_uniform(key, 4 * attempt + 3), width - w + 1),
                    h,
                    w,
                )
        ratio = width / height  # fallback: the whole image, clamped to the aspect range, centred
        if ratio < 3.0 / 4.0:
            w, h = width, int(round(width / (3.0 / 4.0)))
        elif ratio > 4.0 / 3.0:
            h, w = height, int(round(height * (4.0 / 3.0)))
        else:
            h, w = height, width
        return (height - h) // 2, (width - w) // 2, h, w
    side = max(1, min(short, int(round(crop * short / resize_short))))  # CENTER
    return (height - side) // 2, (width - side) // 2, side, side


class CropDecoder(ResizedCropRGBImageDecoder):
    """Decodes an RGBImageField image and resizes one region of it to crop x crop, flipped
    with probability 0.5 in the random modes; for TENCROP, ten views: the corners and the
    centre, then their mirror images (torchvision's ten_crop order). In FFCV's numba threads."""

    def __init__(
        self, mode: int, crop: int, scale: tuple[int, int] = (256, 480), resize_short: int = 256, seed: int = 0
    ):
        super().__init__((crop, crop))
        self.mode, self.crop, self.lo, self.hi = mode, crop, scale[0], scale[1]
        self.resize_short, self.seed = resize_short, seed

    def declare_state_and_memory(self, previous_state):
        state, (output, temp) = super().declare_state_and_memory(previous_state)
        if self.mode != TENCROP:
            return state, (output, temp)
        shape = (10, self.crop, self.crop, 3)
        return replace(state, shape=shape), (AllocationQuery(shape, np.dtype("<u1")), temp)

    def get_crop_generator(self):  # required by the base class; generate_code below replaces its use
        raise NotImplementedError

    def generate_code(self):
        mem_read, my_range = self.memory_read, Compiler.get_iterator()
        imdecode_c, resize_crop_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)
        jpg = IMAGE_MODES["jpg"]
        mode, crop, lo, hi, resize_short, seed = (
            self.mode,
            self.crop,
            self.lo,
            self.hi,
            self.resize_short,
            np.uint64(self.seed),
        )

        def pixels(source_ix, temp_storage, dst_ix, metadata, storage_state):
            entry = metadata[source_ix]
            data = mem_read(entry["data_ptr"], storage_state)
            height, width = np.uint32(entry["height"]), np.uint32(entry["width"])
            if entry["mode"] == jpg:
                buffer = temp_storage[dst_ix]
                imdecode_c(data, buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                return buffer.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
            return data.reshape(height, width, 3)

        pixels_c = Compiler.compile(pixels)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            batch_key = _batch_key(seed, batch_indices)
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                image = pixels_c(source_ix, temp_storage, dst_ix, metadata, storage_state)
                height, width = image.shape[0], image.shape[1]
                key = _mix(batch_key ^ _mix(np.uint64(source_ix)))
                top, left, h, w = _crop_box(mode, height, width, crop, lo, hi, resize_short, key)
                resize_crop_c(image, top, top + h, left, left + w, destination[dst_ix])
                if mode != CENTER and _uniform(key, 40) < 0.5:  # draws 0..39 are the crop's
                    _mirror(destination[dst_ix], destination[dst_ix])
            return destination[: len(batch_indices)]

        def decode_ten(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            for dst_ix in my_range(len(batch_indices)):
                image = pixels_c(batch_indices[dst_ix], temp_storage, dst_ix, metadata, storage_state)
                height, width = image.shape[0], image.shape[1]
                side = max(1, min(height, width, int(round(crop * min(height, width) / resize_short))))
                tops = (0, 0, height - side, height - side, (height - side) // 2)
                lefts = (0, width - side, 0, width - side, (width - side) // 2)
                for v in range(5):  # top-left, top-right, bottom-left, bottom-right, centre (torchvision's five_crop)
                    resize_crop_c(image, tops[v], tops[v] + side, lefts[v], lefts[v] + side, destination[dst_ix, v])
                for v in range(5):  # torchvision crops the mirrored image: its top-left is our top-right mirrored, ...
                    _mirror(destination[dst_ix, (1, 0, 3, 2, 4)[v]], destination[dst_ix, 5 + v])
            return destination[: len(batch_indices)]

        chosen = decode_ten if mode == TENCROP else decode
        chosen.is_parallel = True
        return chosen
