"""Loader benchmark: training images/s of data.loader=ffcv against data.loader=torchvision
(DataLoader worker processes, PIL decode) on the same real JPEGs, side by side in one run, and
each against the decode limit of its JPEG library.

  reproduce bench-loaders [--set imagenette-val | imagenet-sized] [--workers 2] [--batch 64]
                          [--epochs 4] [--rounds 2] [--crop random_resized|scale] [--size 160]
                          [--variants ffcv-jpg,ffcv-mix,...]

Image sets (nothing is downloaded; both come from ../shared/data):
  imagenette-val   the 3,925 Imagenette validation JPEGs as they are (224 x 224, quality 75)
  imagenet-sized   --images (2,000) of the Imagenette training JPEGs, picked evenly and resized
                   to ImageNet's sizes: square, side drawn uniformly from 333..500 px (seeded),
                   quality 90. Upscaled from 224 px, they hold less detail than photographs of
                   that size, so they decode somewhat faster than ImageNet's own JPEGs would.

The set is unpacked into a temporary folder and prepared by `reproduce prepare imagenet` once per
--variants entry (VARIANTS: the share stored raw, the JPEG quality, the longer side). Every
loader produces the training batches of configs/imagenet/resnet18.yaml through `train_loader`,
with the same augmentation (the paper's scale augmentation with --crop scale, or
RandomResizedCrop, to --size, + flip + PCA lighting + normalisation), batch, number of workers
(DataLoader processes / FFCV threads) and device (CPU). Each loader streams --epochs epochs in
one call, the first not timed (worker start-up, numba's JIT); the loaders take turns for
--rounds rounds, so that drift of a shared machine's speed falls on all of them alike.
The process keeps freed host memory for reuse as a CPU job does (distributed.setup); with
--default-malloc it keeps glibc's defaults, to measure what that setting buys.

The decode limit: one core decoding the set's JPEG bytes in memory with the library the loader
uses, nothing else (PIL's open + convert("RGB"), as torchvision's ImageFolder loads; FFCV's
imdecode, libjpeg-turbo, on the JPEGs of the all-JPEG file as prepared), times --workers. A
loader's share of it is its images/s over that limit (a file holding raw images can pass 100%:
those need no decoding).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from reproduce.bench.loader_sets import SHARED, SourceRefused, make_imagenet_sized, make_tree  # noqa: F401
from reproduce.errors import ArgumentParser, command
from reproduce.provenance import CONFIGS

SETS = ("imagenette-val", "imagenet-sized")
# name -> (what it is, `reproduce prepare imagenet` options)
VARIANTS = {
    "ffcv-jpg": ("every image JPEG, quality 90", ["--compress-probability", "1"]),
    "ffcv-mix": ("`prepare`'s default (FFCV's ResNet-50): 50% JPEG q90, 50% raw", ["--compress-probability", "0.5"]),
    "ffcv-raw": ("every image raw", ["--compress-probability", "0"]),
    "ffcv-jpg-q75": ("every image JPEG, quality 75", ["--compress-probability", "1", "--jpeg-quality", "75"]),
    "ffcv-mix-q75": ("50% JPEG q75, 50% raw", ["--compress-probability", "0.5", "--jpeg-quality", "75"]),
    "ffcv-jpg-256": (
        "every image JPEG q90, longer side at most 256 (changes what the crops see)",
        ["--compress-probability", "1", "--max-side", "256"],
    ),
}
DEFAULT_VARIANTS = "ffcv-jpg,ffcv-mix,ffcv-raw"


def parse_args(argv):
    parser = ArgumentParser(prog="reproduce bench-loaders", description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", choices=SETS, default="imagenette-val", help="the images (see above)")
    parser.add_argument(
        "--source",
        type=Path,
        default=None,
        help="imagenette-val: a .tar.gz of <split>/<class>/*.JPEG "
        "or a <split> folder of <class>/*.JPEG (default ../shared/data/imagenette-224-val.tar.gz)",
    )
    parser.add_argument("--images", type=int, default=2000, help="imagenet-sized: how many")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader processes = FFCV threads")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4, help="per loader and round; the first is not timed")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--crop", choices=["random_resized", "scale"], default="random_resized")
    parser.add_argument("--size", type=int, default=160, help="output crop in pixels")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"FFCV preparations to run, from {list(VARIANTS)}")
    parser.add_argument(
        "--device-loader",
        action="store_true",
        help="also data.loader=device (decode on run.device: the CPU here, in one process)",
    )
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's default thresholds, under which "
        "every freed block over 32 MiB goes back to the kernel (a CPU job raises them: "
        "reproduce.distributed.reuse_freed_host_memory)",
    )
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v and v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return args


def decode_rate(blobs: list[bytes], decode) -> float:
    """Images/s of one core decoding `blobs` (in memory) with `decode`: the best of three passes."""
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for blob in blobs:
            decode(blob)
        best = max(best, len(blobs) / (time.perf_counter() - start))
    return best


def pil_rate(tree: Path, limit: int = 600) -> float:
    from PIL import Image

    files = sorted(tree.glob("train/*/*"))
    blobs = [f.read_bytes() for f in files[:: max(1, len(files) // limit)]]
    return decode_rate(blobs, lambda b: Image.open(io.BytesIO(b)).convert("RGB"))


def ffcv_jpeg_rate(beton: Path, limit: int = 600) -> tuple[float, int]:
    """(images/s of FFCV's imdecode on the JPEG images of `beton`, one thread; how many of its
    images are JPEG)."""
    from ffcv.libffcv import imdecode
    from ffcv.reader import Reader

    reader = Reader(str(beton))
    meta, table = reader.metadata["f0"], reader.alloc_table
    sizes = dict(zip(table["ptr"].tolist(), table["size"].tolist()))
    mapped = np.memmap(beton, dtype=np.uint8, mode="r")
    jpegs = [i for i in range(reader.num_samples) if meta["mode"][i] == 0]
    picked = jpegs[:: max(1, len(jpegs) // limit)]
    items = [
        (
            np.array(mapped[int(meta["data_ptr"][i]) : int(meta["data_ptr"][i]) + sizes[int(meta["data_ptr"][i])]]),
            int(meta["height"][i]),
            int(meta["width"][i]),
        )
        for i in picked
    ]
    buffer = np.empty(int(max(h * w for _, h, w in items)) * 3, np.uint8)
    rate = decode_rate(
        items, lambda item: imdecode(item[0], buffer, item[1], item[2], item[1], item[2], 0, 0, 1, 1, False, False)
    )
    return rate, len(jpegs)


def measure(cfg, epochs: int) -> list[float]:
    """Images/s of each epoch after the first, streaming train_loader's batches of one run."""
    from reproduce.data import build_data, train_loader
    from reproduce.distributed import DistInfo

    data = build_data(cfg)
    per_epoch = len(data.train) // cfg.optim.batch_size
    info = DistInfo(0, 0, 1, torch.device("cpu"), "python", None)
    speeds, start = [], None
    for it, (images, _) in enumerate(train_loader(data, cfg, info, 0)):
        if it % per_epoch == 0:
            now = time.perf_counter()
            if it >= 2 * per_epoch:
                speeds.append(per_epoch * cfg.optim.batch_size / (now - start))
            start = now
        assert images.shape[-1] == cfg.data.crop
    speeds.append(per_epoch * cfg.optim.batch_size / (time.perf_counter() - start))
    return speeds


def measure_cpu_share(cfg, epochs: int) -> list[float]:
    """Images/s of FFCV's own part of data.loader=ffcv: its threads' uint8 (B, H, W, 3) batches,
    decoded, cropped and flipped, before the suite's finishing step (float, PCA lighting,
    normalisation), which a GPU job runs on the GPU. What the CPU cores of a GPU node deliver."""
    from reproduce.data import build_data
    from reproduce.data.ffcv import loaders

    data = build_data(cfg)
    lib, batch = loaders.ffcv_library(), cfg.optim.batch_size
    loader = lib.loader_for(data.train, cfg, batch)
    n = (len(data.train) // batch) * batch
    speeds = []
    for epoch in range(epochs):
        order = loaders._epoch_draws(data.train, cfg, epoch, len(data.train))["perm"][:n]
        start = time.perf_counter()
        for images, _ in lib.iterate(loader, order, data.train.path.name):
            assert images.shape[1] == cfg.data.crop
        if epoch:  # the first pays numba's JIT
            speeds.append(n / (time.perf_counter() - start))
    return speeds


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    source = args.source or SHARED / "imagenette-224-val.tar.gz"
    if args.set == "imagenette-val" and not source.exists():
        print(f"error: {source} not found (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    variants = [v for v in args.variants.split(",") if v]
    from reproduce.distributed import reuse_freed_host_memory

    reused = not args.default_malloc and reuse_freed_host_memory()  # as train.py's setup does for a CPU job
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-loaders-") as tmp:
        try:
            tree = (
                make_tree(source, Path(tmp))
                if args.set == "imagenette-val"
                else make_imagenet_sized(Path(tmp), args.images)
            )
        except FileNotFoundError as err:
            print(f"error: {err} (see ../shared/data/README.md)", file=sys.stderr)
            return 2
        files = [p for p in (tree / "train").glob("*/*") if p.is_file()]
        n, source_mb = len(files), sum(p.stat().st_size for p in files) / 1e6
        pixels = sum(_pixels(p) for p in files[:: max(1, n // 200)]) / len(files[:: max(1, n // 200)])
        bench = _Bench()
        bench.add("torchvision", args, n, [f"data.path={tree}"], source_mb)
        bench.limits["torchvision"] = pil_rate(tree)
        if args.device_loader:
            bench.add("device", args, n, [f"data.path={tree}", "data.loader=device"], source_mb)
        for name in variants:
            if not bench.add_ffcv(name, args, tree, Path(tmp) / name, n):
                return 2
        bench.run(args)
    ffcv_limit = bench.limits.get("ffcv-jpg") or next((bench.limits[v] for v in variants if v in bench.limits), None)
    print(f"load average (1 min) {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; {os.cpu_count()} CPUs")
    print(
        f"set {args.set}: {n:,} JPEGs, {source_mb:.0f} MB, {pixels / 1e3:.0f}k pixels per image on average; "
        f"{args.crop} crop to {args.size} + flip + lighting + normalise; batch {args.batch}; {args.workers} workers; "
        f"{args.rounds} rounds x {args.epochs - 1} timed epochs; torch threads {torch.get_num_threads()}; "
        f"freed host memory {'reused (blocks up to 1 GiB)' if reused else 'glibc default (blocks over 32 MiB unmapped)'}"
    )
    bench.print_table(args, ffcv_limit)
    for name in variants:
        print(f"  {name}: {VARIANTS[name][0]}")
    return 0


class _Bench:
    """The loaders compared: each one's config, file size and per-core decode limit (where known),
    then its speeds (and, for FFCV, the speeds of its threads alone)."""

    def __init__(self):
        self.configs, self.disk, self.limits = {}, {}, {}
        self.results: dict[str, list[float]] = {}
        self.cpu_share: dict[str, list[float]] = {}

    def add(self, name: str, args, n: int, data: list[str], mb: float, limit: float | None = None):
        from reproduce.config import load_config

        base = [
            f"data.workers={args.workers}",
            f"optim.batch_size={args.batch}",
            f"data.crop={args.size}",
            f"data.train_crop={args.crop}",
            f"schedule.iterations={args.epochs * (n // args.batch)}",
            "schedule.milestones=[]",
            "run.device=cpu",
        ]
        self.configs[name] = load_config(CONFIGS / "imagenet" / "resnet18.yaml", base + data)
        self.disk[name] = mb
        if limit is not None:
            self.limits[name] = limit

    def add_ffcv(self, name: str, args, tree: Path, out: Path, n: int) -> bool:
        """Variant `name` prepared into `out` (`reproduce prepare`) and added; False where prepare refused."""
        from reproduce.data.ffcv import prepare

        prepared_at = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # its "wrote ..." lines: stdout is the table
            argv = ["imagenet", "--source", str(tree), "--out", str(out), "--workers", str(args.workers)]
            if prepare.main([*argv, *VARIANTS[name][1]]) != 0:
                return False
        mb = (out / "train.beton").stat().st_size / 1e6
        print(f"{name}: prepared in {time.perf_counter() - prepared_at:.0f} s, {mb:.0f} MB", file=sys.stderr)
        rate, jpegs = ffcv_jpeg_rate(out / "train.beton") if "raw" not in name else (0.0, 0)
        # an all-JPEG file: its JPEGs are what FFCV decodes
        self.add(name, args, n, [f"data.path={out}", "data.loader=ffcv"], mb, rate if jpegs == n else None)
        return True

    def run(self, args) -> None:
        """args.rounds rounds, each loader in turn, each said on stderr as it ends."""
        self.results = {name: [] for name in self.configs}
        self.cpu_share = {name: [] for name in self.configs if name.startswith("ffcv")}
        for round_ in range(args.rounds):
            for name, cfg in self.configs.items():
                self.results[name] += measure(cfg, args.epochs)
                print(
                    f"round {round_ + 1} {name}: {' '.join(f'{s:,.0f}' for s in self.results[name][-(args.epochs - 1) :])} images/s",
                    file=sys.stderr,
                )
                if name in self.cpu_share:
                    self.cpu_share[name] += measure_cpu_share(cfg, args.epochs)

    def print_table(self, args, ffcv_limit: float | None) -> None:
        """The decode limits, then one row per loader, against torchvision's mean speed."""
        limits = self.limits
        reference = sum(self.results["torchvision"]) / len(self.results["torchvision"])
        print(
            f"decode limit per core: PIL {limits['torchvision']:,.0f} images/s"
            + (
                f", FFCV imdecode (libjpeg-turbo) {ffcv_limit:,.0f} images/s on the all-JPEG file's images"
                if ffcv_limit
                else ""
            )
            + f"; x {args.workers} workers"
        )
        print(
            f"{'loader':<14} {'file MB':>8} {'images/s':>9} {'min':>7} {'max':>7} {'vs torchvision':>15} {'of decode limit':>16}"
            f" {'uint8 only':>11} {'vs torchvision':>15} {'of decode limit':>16}"
        )
        for name, speeds in self.results.items():
            limit = limits.get(name) or (limits["torchvision"] if name in ("torchvision", "device") else ffcv_limit)
            shown = {"device": " (of PIL's)"}.get(name, "" if name in limits else " (of FFCV's)")
            cells = []
            for values in (speeds, self.cpu_share.get(name)):
                if not values:
                    cells.append(f"{'-':>11} {'-':>15} {'-':>16}" if cells else "")
                    continue
                mean = sum(values) / len(values)
                share = f"{mean / (limit * args.workers):.0%}{shown}" if limit else "-"
                cells.append(
                    (f"{mean:>9,.0f} {min(values):>7,.0f} {max(values):>7,.0f} " if not cells else f"{mean:>11,.0f} ")
                    + f"{mean / reference:>14.2f}x {share:>16}"
                )
            print(f"{name:<14} {self.disk[name]:>8,.0f} {cells[0]} {cells[1]}")
        print(
            "uint8 only: FFCV's threads alone (decode, crop, flip into uint8 batches), without the float conversion, "
            "lighting and normalisation that a GPU job runs on the GPU; torchvision's workers do all of it on the CPU"
        )


def _pixels(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as image:
        return image.width * image.height


if __name__ == "__main__":
    sys.exit(main())
