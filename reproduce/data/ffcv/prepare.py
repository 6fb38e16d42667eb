"""`reproduce prepare`: write the FFCV .beton files that `data.loader=ffcv` reads.

  reproduce prepare cifar10 --source ../shared/data/cifar10-jpeg.tar.gz --out data/cifar10-ffcv
  reproduce prepare imagenet --source /data/imagenet --out /data/imagenet-ffcv
  reproduce train --config configs/cifar10/resnet56.yaml data.loader=ffcv data.path=data/cifar10-ffcv

CIFAR-10 (--source: anything data.path accepts; none = torchvision's download into ./data)
becomes train.beton (the training images less the fixed validation hold-out that the other
loaders use, --val-split, default the paper's 5000), val.beton (the hold-out; absent with
--val-split 0) and test.beton, as raw pixels. ImageNet-style folders (--source with
train/<wnid>/* and val/<wnid>/*) become train.beton and val.beton, each image scaled down to
at most --max-side pixels on its longer side and stored as a JPEG of --jpeg-quality with
probability --compress-probability, raw otherwise: FFCV's ResNet-50 setting (500, 90, 0.5).

Beside each file, <split>.manifest.json: images per class, a checksum of the source (CIFAR:
of its decoded pixels and labels, equal to the torchvision loader's data fingerprint;
ImageNet: of the listing, path and size of every file), the writer's settings, the FFCV
version, the file's size and sha256 and, for CIFAR-10, the training split's normalisation
statistics. The loader checks a file against its manifest and the manifest against the
config before training starts.

The same source prepared twice gives byte-identical files: FFCV's writer runs as one process
(its parallel writer lays out pages in whichever order its processes finish); ImageNet
images are decoded and scaled in --workers processes ahead of it, and whether an image is
stored as JPEG is drawn from its index.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing
import os
import signal
import sys
import threading
from functools import partial
from pathlib import Path

import numpy as np
import torch

from reproduce.data.base import DataError
from reproduce.data.cifar import CLASSES, cifar_split, cifar_stats, load_cifar10
from reproduce.data.ffcv.loaders import ffcv_library
from reproduce.data.ffcv.manifest import install_beton, manifest_path
from reproduce.data.imagenet import image_folder
from reproduce.errors import ArgumentParser
from reproduce.stop import STOP_SIGNALS, STOPPED

CIFAR_PAGE = 1 << 21  # FFCV's smallest page (2 MiB): keeps small files small
IMAGENET_PAGE = 1 << 23  # FFCV's default (8 MiB): holds a raw 1024 x 1024 image; less waste per page at 500 px
MAX_SIDE_LIMIT = 1024  # a raw image must fit in one page


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="reproduce prepare",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="cifar10|imagenet")
    cifar = sub.add_parser("cifar10", help="CIFAR-10 -> train/val/test .beton (raw pixels)")
    cifar.add_argument(
        "--source",
        type=Path,
        default=None,
        help="cifar-10-batches-py folder, image tree or .tar.gz (default: torchvision download into ./data)",
    )
    cifar.add_argument(
        "--val-split", type=int, default=5000, help="training images held out as val.beton (the paper: 5000)"
    )
    imagenet = sub.add_parser("imagenet", help="ImageNet-style folders -> train/val .beton (JPEG/raw mix)")
    imagenet.add_argument("--source", type=Path, required=True, help="a folder with train/<class>/* and val/<class>/*")
    imagenet.add_argument(
        "--max-side", type=int, default=500, help="longer side in pixels at most (FFCV's ResNet-50: 500)"
    )
    imagenet.add_argument(
        "--jpeg-quality", type=int, default=90, help="JPEG quality of the compressed images (FFCV's: 90)"
    )
    imagenet.add_argument(
        "--compress-probability",
        type=float,
        default=0.5,
        help="share of images stored as JPEG, the rest raw (FFCV's: 0.5)",
    )
    imagenet.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="processes decoding the source images"
    )
    for p in (cifar, imagenet):
        p.add_argument("--out", type=Path, required=True, help="folder for the .beton files and manifests")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.out.exists() and not args.out.is_dir():  # before the source is read
            raise DataError(
                f"--out {args.out} is a file; give a folder for the .beton files (it is created if missing)"
            )
        _remove_stale_temporary_files(args.out)
        with _StopRemovesTemporaryFiles(args.out):
            if args.dataset == "cifar10":
                written = prepare_cifar10(args.source, args.out, args.val_split)
            else:
                written = prepare_imagenet(
                    args.source, args.out, args.max_side, args.jpeg_quality, args.compress_probability, args.workers
                )
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        manifest = json.loads(manifest_path(path).read_text())
        print(f"wrote {path}: {manifest['images']:,} images, {manifest['bytes'] / 1e6:,.1f} MB")
    print(f"train with: data.loader=ffcv data.path={args.out}")
    return 0


def _temporary_files(out: Path, pid: int | str = "*") -> list[Path]:
    """The temporary .beton files of the prepare with process id `pid` in `out` (as _write names them)."""
    return sorted(out.glob(f".*.beton.{pid}.tmp")) if out.is_dir() else []


def _remove_stale_temporary_files(out: Path) -> None:
    """Remove what a prepare killed outright (SIGKILL, a lost machine) left in `out`: temporary files of
    processes that no longer run. One of a prepare still running is left to it."""
    import psutil

    for tmp in _temporary_files(out):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            tmp.unlink(missing_ok=True)
            print(f"removed {tmp}, left by a prepare that was stopped (process {pid})", file=sys.stderr)


class _StopRemovesTemporaryFiles:
    """SIGTERM, SIGINT or SIGUSR1 (reproduce.stop) end `reproduce prepare` at once with exit status 143 and
    one line, leaving no temporary file: the handler kills this process's children (FFCV's writer process,
    which writes the temporary file, and the decoding pool; they hold nothing else), removes this
    process's temporary files and exits. It unwinds nothing (os._exit), so no Python code runs after
    it. A forked child that inherited the handler dies of the signal as it would have."""

    def __init__(self, out: Path):
        self.out, self.pid, self.previous = out, os.getpid(), {}

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self.pid:  # a forked child (a writer, a pool worker): the default action
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        _STOPPING.set()  # from now on a writer that ends is not a writer that died (_WriterWatch)
        for _ in range(3):
            try:
                self._stop(signum)  # does not return
            except _WriterDied:  # raised into this thread just before _STOPPING was set: once at most
                continue

    def _stop(self, signum: int) -> None:
        _kill_children()
        _free_shared_memory(_WRITING.get("writer"))
        for tmp in _temporary_files(self.out, self.pid):
            tmp.unlink(missing_ok=True)
        os.write(
            2,
            f"\nstopped by {signal.Signals(signum).name}: the file being written was removed; files already "
            f"finished in {self.out} are complete (run the same command again to redo all)\n".encode(),
        )
        os._exit(STOPPED)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


_STOPPING = threading.Event()  # set when a stop signal has arrived
_WRITING: dict = {}  # "writer": the FFCV DatasetWriter at work, for a stop to free its shared memory


def _free_shared_memory(ffcv_writer) -> None:
    """Close and unlink the shared memory FFCV's writer made (it frees it only when it finishes)."""
    metadata = getattr(ffcv_writer, "metadata_sm", None)
    if hasattr(metadata, "unlink"):
        with contextlib.suppress(OSError):
            metadata.close()
            metadata.unlink()


def _default_stop_signals() -> None:
    """In a forked child (a writer, a pool worker): the stop signals' default action again, at the C level,
    so that a child busy in C code dies of SIGTERM at once (a Python handler would wait for it to return)."""
    for sig in STOP_SIGNALS:
        if isinstance(getattr(signal.getsignal(sig), "__self__", None), _StopRemovesTemporaryFiles):
            signal.signal(sig, signal.SIG_DFL)


os.register_at_fork(after_in_child=_default_stop_signals)


def _kill_children() -> None:
    """Kill every process this one started, and theirs, but multiprocessing's resource tracker (it frees
    the shared memory FFCV's writer leaves), and wait for them briefly."""
    from multiprocessing import resource_tracker

    import psutil

    tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
    children = [c for c in psutil.Process().children(recursive=True) if c.pid != tracker]
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(children, timeout=5)


def prepare_cifar10(source: Path | None, out: Path, val_split: int = 5000) -> list[Path]:
    _check_cifar_source(source)  # the arguments first: a wrong --source is not reported as a missing FFCV
    _ffcv()  # DataError before the source is read, if FFCV is missing
    arrays = load_cifar10(source)
    train_idx, val_idx = cifar_split(len(arrays.train_x), val_split)
    train_images = torch.from_numpy(arrays.train_x[train_idx]).permute(0, 3, 1, 2)
    normalization = {}
    for kind in ("pixel_mean", "channel"):  # both, so that data.normalize can be either
        mean, std = cifar_stats(train_images, kind)
        normalization[kind] = {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()}
    common = {
        "dataset": "cifar10",
        "classes": list(CLASSES),
        "source": str(source) if source else "torchvision download",
        "source_digest": arrays.digest(),
        "lossy": arrays.lossy,
        "val_split": val_split,
        "normalization": normalization,
    }
    writer = {
        "write_mode": "raw",
        "max_side": None,
        "jpeg_quality": None,
        "compress_probability": 0.0,
        "page_size": CIFAR_PAGE,
    }
    splits = [
        ("train", arrays.train_x[train_idx], arrays.train_y[train_idx]),
        ("val", arrays.train_x[val_idx], arrays.train_y[val_idx]) if val_idx is not None else None,
        ("test", arrays.test_x, arrays.test_y),
    ]
    out.mkdir(parents=True, exist_ok=True)
    if val_idx is None:
        for stale in (out / "val.beton", manifest_path(out / "val.beton")):
            stale.unlink(missing_ok=True)  # a val.beton of an earlier preparation would not match
    written = []
    for name, images, labels in filter(None, splits):
        written.append(
            _write(out / f"{name}.beton", _Arrays(images, labels), labels, writer, {**common, "split": name})
        )
    return written


def _check_cifar_source(source: Path | None) -> None:
    """DataError in one line when --source cannot be CIFAR-10, judged without reading it (load_cifar10 reads it)."""
    if source is None:
        return
    fix = "give --source a cifar-10-batches-py folder, an image tree (train/, test/) or a .tar.gz of one"
    if not source.exists():
        raise DataError(f"--source {source} does not exist; {fix}")
    if source.is_dir():
        layouts = (source / "data_batch_1", source / "cifar-10-batches-py", source / "train")
        if not any(p.exists() for p in layouts):
            raise DataError(f"--source {source} holds neither cifar-10-batches-py nor train/ and test/; {fix}")
    elif not source.name.endswith((".tar.gz", ".tgz", ".tar", ".npz")):
        raise DataError(f"--source {source} is not a folder or a .tar/.tar.gz archive; {fix}")


def prepare_imagenet(
    source: Path,
    out: Path,
    max_side: int = 500,
    jpeg_quality: int = 90,
    compress_probability: float = 0.5,
    workers: int = 1,
) -> list[Path]:
    if not 32 <= max_side <= MAX_SIDE_LIMIT:
        raise DataError(
            f"--max-side {max_side} must be between 32 and {MAX_SIDE_LIMIT} (a raw image must fit one FFCV page)"
        )
    if not 1 <= jpeg_quality <= 100 or not 0 <= compress_probability <= 1:
        raise DataError("--jpeg-quality must be in 1..100 and --compress-probability in [0, 1]")
    if source.is_file():
        raise DataError(
            f"{source} is a file; extract it first (tar -xzf {source} -C DIR) and pass DIR with train/ and val/"
        )
    folders = {split: image_folder(source, split, None) for split in ("train", "val")}
    if folders["train"].classes != folders["val"].classes:
        raise DataError(f"{source}: train/ and val/ have different class folders")
    writer = {
        "write_mode": "proportion",
        "max_side": max_side,
        "jpeg_quality": jpeg_quality,
        "compress_probability": compress_probability,
        "page_size": IMAGENET_PAGE,
    }
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for split, folder in folders.items():
        paths = [p for p, _ in folder.samples]
        labels = np.array([label for _, label in folder.samples], np.int64)
        listing = "".join(f"{Path(p).relative_to(source)}\t{Path(p).stat().st_size}\n" for p in paths)
        meta = {
            "dataset": "imagenet",
            "split": split,
            "classes": folder.classes,
            "source": str(source),
            "listing_sha256": hashlib.sha256(listing.encode()).hexdigest(),
        }
        images = _Decoded(paths, labels, max_side, workers)
        written.append(_write(out / f"{split}.beton", images, labels, writer, meta))
    return written


def _write(beton: Path, dataset, labels: np.ndarray, writer: dict, meta: dict) -> Path:
    """Write `dataset` to `beton` (atomically: a temporary file, then rename) and its manifest."""
    _ffcv()  # first: it imports FFCV and keeps torch's thread count
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader
    from ffcv.writer import DatasetWriter

    print(f"writing {beton} ({len(dataset):,} images)", file=sys.stderr)
    tmp = beton.with_name(f".{beton.name}.{os.getpid()}.tmp")
    image_field = RGBImageField(
        write_mode=writer["write_mode"],
        max_resolution=writer["max_side"],
        jpeg_quality=writer["jpeg_quality"] or 90,
        compress_probability=writer["compress_probability"],
    )
    fields = {"image": image_field, "label": IntField()}
    ffcv_writer = None
    try:
        # One writer process: FFCV's pages then follow the image order, so the bytes are repeatable.
        with _WriterWatch(beton):
            ffcv_writer = _WRITING["writer"] = DatasetWriter(
                str(tmp), fields, page_size=writer["page_size"], num_workers=1
            )
            ffcv_writer.from_indexed_dataset(dataset)
        failed = getattr(dataset, "failures", None)
        if failed is not None and failed.value:
            example = dataset.first_failure.value.decode(errors="replace")
            raise DataError(f"{failed.value} images of {meta['split']} could not be decoded, e.g. {example}")
        modes = Reader(str(tmp)).metadata["f0"]["mode"]
        counts = np.bincount(labels, minlength=len(meta["classes"]))
        contents = {
            **meta,
            "file": beton.name,
            "images": len(dataset),
            "counts": dict(zip(meta["classes"], counts.tolist())),
            "writer": {**writer, "stored_jpeg": int((modes == 0).sum())},
        }
        install_beton(tmp, beton, contents)
    except BaseException:  # a failure: FFCV's writer leaves its shared memory behind
        _free_shared_memory(ffcv_writer)
        raise
    finally:
        _WRITING.pop("writer", None)
        tmp.unlink(missing_ok=True)
    return beton


def _ffcv():
    return ffcv_library("reproduce prepare")


class _Arrays:
    """(HWC uint8 image, label) pairs from arrays, for FFCV's writer."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return np.ascontiguousarray(self.images[index]), int(self.labels[index])


class _Decoded:
    """(HWC uint8 image scaled to max_side, label) for FFCV's writer, which asks for the images
    in order from its one process: a pool of `workers` processes decodes ahead of it. An image
    that cannot be decoded is counted in `failures` (and written as a 1x1 placeholder, so that
    the writer finishes); the caller then refuses the file."""

    def __init__(self, paths: list[str], labels: np.ndarray, max_side: int, workers: int):
        self.paths, self.labels, self.max_side, self.workers = paths, labels, max_side, max(1, workers)
        self.failures = multiprocessing.Value("l", 0)  # shared with the writer's process
        self.first_failure = multiprocessing.Array("c", 1000)
        self._stream, self._next, self._pool = None, -1, None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        if index != self._next:  # first call in the writer's process (or out of order): start decoding here
            self._close()
            load = partial(_load_scaled, max_side=self.max_side)
            if self.workers > 1:
                self._pool = multiprocessing.Pool(self.workers, initializer=_quiet_opencv)
                self._stream = self._pool.imap(load, self.paths[index:], chunksize=4)
            else:
                self._stream = map(load, self.paths[index:])
        image = next(self._stream)
        self._next = index + 1
        if index == len(self.paths) - 1:
            self._close()
        if isinstance(image, str):
            with self.failures.get_lock():
                if not self.failures.value:
                    self.first_failure.value = image.encode()[:999]
                self.failures.value += 1
            image = np.zeros((1, 1, 3), np.uint8)
        # FFCV's write_mode="proportion" decides JPEG or raw with the np.random.rand() that follows
        # this call: seeding here makes that choice a function of the image's index alone.
        np.random.seed(index % 2**32)
        return image, int(self.labels[index])

    def _close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
        self._pool, self._stream = None, None


def _quiet_opencv() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core already


def _load_scaled(path: str, max_side: int) -> np.ndarray | str:
    """The image as HWC uint8 RGB, scaled down as FFCV's writer does; or the error as text."""
    from ffcv.fields.rgb_image import resizer
    from PIL import Image

    try:
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"))
    except Exception as err:  # PIL raises many types for a bad file
        return f"{path}: {err}"
    return np.ascontiguousarray(resizer(pixels, max_side))


class _WriterDied(Exception):
    """Raised in the writing thread by _WriterWatch."""


class _WriterWatch:
    """FFCV's writer waits forever for a worker process that has died. This watch looks for a
    child process started after it (FFCV's worker) that has ended with an error, then raises
    _WriterDied in the writing thread (an asynchronous exception: SIGINT, and so
    _thread.interrupt_main, is ignored in a process started in the background), and turns
    that into DataError."""

    def __init__(self, beton: Path):
        self.beton, self.fired, self.done, self.lock = beton, False, False, threading.Lock()
        self.writer = threading.get_ident()

    def _watch(self) -> None:
        while True:
            threading.Event().wait(0.5)
            with self.lock:
                if self.done or _STOPPING.is_set():
                    return
                if _a_child_failed(self.before):
                    self.fired = True
                    _async_raise(self.writer, _WriterDied)
                    return

    def __enter__(self):
        import psutil

        self.before = {child.pid for child in psutil.Process().children()}
        threading.Thread(target=self._watch, daemon=True).start()
        return self

    def __exit__(self, kind, value, tb):
        try:
            with self.lock:
                self.done = True
                if self.fired:
                    _async_raise(self.writer, None)  # not delivered yet: cancel it, DataError follows
        except _WriterDied:  # delivered just now
            pass
        if self.fired:
            print(file=sys.stderr)  # ends FFCV's progress bar's line
            raise DataError(f"FFCV's writer process died while writing {self.beton} (its traceback is above)") from None
        return False


def _async_raise(thread_id: int, exception: type[BaseException] | None) -> None:
    """Raise `exception` in the thread `thread_id` at its next bytecode; None cancels a pending one."""
    import ctypes

    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exception) if exception else None
    )


def _a_child_failed(before: set[int]) -> bool:
    """Whether a child process not in `before` has exited with an error, looked up without
    reaping it (WNOWAIT), so that multiprocessing still finds its children's exit codes."""
    import psutil

    for child in psutil.Process().children():
        if child.pid in before:
            continue
        try:
            ended = os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            continue
        if ended is not None and not (ended.si_code == os.CLD_EXITED and ended.si_status == 0):
            return True
    return False


if __name__ == "__main__":
    sys.exit(main())
