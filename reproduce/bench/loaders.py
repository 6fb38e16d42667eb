"""Loader benchmark: training images/s of data.loader=ffcv against data.loader=torchvision
(DataLoader worker processes, PIL decode) on the same real JPEGs, side by side in one run.

  reproduce bench-loaders [--source ../shared/data/imagenette-224-val.tar.gz] [--workers 2]
                          [--batch 64] [--epochs 4] [--rounds 2] [--crop random_resized --size 160]

The JPEGs (Imagenette val, 3,925 images of 224 x 224) are unpacked into a temporary folder
and prepared by `reproduce prepare imagenet` three ways: all JPEG (quality 90: the same kind
of bytes PIL decodes), FFCV's ResNet-50 mix (50% JPEG) and all raw. Every loader produces the
training batches of configs/imagenet/resnet18.yaml through `train_loader`, with the same
augmentation (RandomResizedCrop to --size + flip + PCA lighting + normalisation, or the
paper's scale augmentation with --crop scale), batch, number of workers (DataLoader
processes / FFCV threads) and device (CPU). Each loader streams --epochs epochs in one call,
the first not timed (worker start-up, numba's JIT); the loaders take turns for --rounds
rounds, so that drift of a shared machine's speed falls on all of them alike.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from reproduce.provenance import CONFIGS, REPO

VARIANTS = {"ffcv-jpg": 1.0, "ffcv-mix": 0.5, "ffcv-raw": 0.0}  # --compress-probability of each preparation


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="reproduce bench-loaders", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=REPO.parent / "shared" / "data" / "imagenette-224-val.tar.gz",
                        help="a .tar.gz of <split>/<class>/*.JPEG, or such a folder")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader processes = FFCV threads")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4, help="per loader and round; the first is not timed")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--crop", choices=["random_resized", "scale"], default="random_resized")
    parser.add_argument("--size", type=int, default=160, help="output crop in pixels")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"FFCV preparations to run, from {list(VARIANTS)}")
    return parser.parse_args(argv)


def make_tree(source: Path, root: Path) -> Path:
    """train/<class>/* = every image of the source; val/<class>/* = one image per class (the
    loaders need a val/ folder; it is not measured)."""
    if source.is_dir():
        images = source
    else:
        with tarfile.open(source) as tf:
            tf.extractall(root / "unpacked", filter="data")
        (images,) = [p for p in (root / "unpacked").iterdir() if p.is_dir()]
    tree = root / "tree"
    (tree / "train").mkdir(parents=True)
    for folder in sorted(p for p in images.iterdir() if p.is_dir()):
        (tree / "train" / folder.name).symlink_to(folder.resolve(), target_is_directory=True)
        (tree / "val" / folder.name).mkdir(parents=True)
        first = sorted(folder.iterdir())[0]
        shutil.copy(first, tree / "val" / folder.name / first.name)
    return tree


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


def main(argv=None) -> int:
    args = parse_args(argv)
    from reproduce.config import load_config
    from reproduce.data.ffcv import prepare

    if not args.source.exists():
        print(f"error: {args.source} not found (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    variants = [v for v in args.variants.split(",") if v]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-loaders-") as tmp:
        tree = make_tree(args.source, Path(tmp))
        n = sum(1 for p in (tree / "train").glob("*/*") if p.is_file())
        base = [f"data.workers={args.workers}", f"optim.batch_size={args.batch}", f"data.crop={args.size}",
                f"data.train_crop={args.crop}", f"schedule.iterations={args.epochs * (n // args.batch)}",
                "schedule.milestones=[]", "run.device=cpu"]
        configs = {"torchvision": load_config(CONFIGS / "imagenet" / "resnet18.yaml", base + [f"data.path={tree}"])}
        for name in variants:
            out = Path(tmp) / name
            prepared_at = time.perf_counter()
            if prepare.main(["imagenet", "--source", str(tree), "--out", str(out), "--workers", str(args.workers),
                             "--compress-probability", str(VARIANTS[name])]) != 0:
                return 2
            print(f"{name}: prepared in {time.perf_counter() - prepared_at:.0f} s, "
                  f"{(out / 'train.beton').stat().st_size / 1e6:.0f} MB", file=sys.stderr)
            configs[name] = load_config(CONFIGS / "imagenet" / "resnet18.yaml",
                                        base + [f"data.path={out}", "data.loader=ffcv"])
        results = {name: [] for name in configs}
        for round_ in range(args.rounds):
            for name, cfg in configs.items():
                results[name] += measure(cfg, args.epochs)
                print(f"round {round_ + 1} {name}: {' '.join(f'{s:,.0f}' for s in results[name][-(args.epochs - 1):])} images/s",
                      file=sys.stderr)
    reference = sum(results["torchvision"]) / len(results["torchvision"])
    print(f"load average (1 min) {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; {os.cpu_count()} CPUs")
    print(f"{n:,} JPEGs from {args.source.name}; {args.crop} crop to {args.size} + flip + lighting + normalise; "
          f"batch {args.batch}; {args.workers} workers; {args.rounds} rounds x {args.epochs - 1} timed epochs; "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'loader':<12} {'images/s':>9} {'min':>7} {'max':>7}  ratio to torchvision")
    for name, speeds in results.items():
        mean = sum(speeds) / len(speeds)
        print(f"{name:<12} {mean:>9,.0f} {min(speeds):>7,.0f} {max(speeds):>7,.0f}  {mean / reference:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
