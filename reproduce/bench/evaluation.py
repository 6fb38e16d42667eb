"""Evaluation benchmark: test images/s of each ImageNet protocol on the same real JPEGs, and
its cost relative to center224.

  python -m reproduce.bench.evaluation [--source ../shared/data/imagenette-224-val.tar.gz]
                                       [--model resnet50] [--images 8] [--protocols center224 tencrop multiscale]

The first --images images of the source (a .tar.gz or folder of val/<class>/*) are unpacked
into a temporary folder and evaluated, through the same path as `reproduce evaluate` (test
split, eval_loader, engine.evaluate), by a --model network with random weights (speed does not
depend on the weights) on this machine's default device, one process, data.workers=0. Each
protocol runs once untimed (warm-up) and then --rounds times, the protocols taking turns; the
best round counts. No MLflow run is made.
"""

from __future__ import annotations

import argparse
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from reproduce.errors import ArgumentParser
from reproduce.provenance import REPO, machine


def parse_args(argv):
    parser = ArgumentParser(prog="python -m reproduce.bench.evaluation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=REPO.parent / "shared" / "data" / "imagenette-224-val.tar.gz")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--protocols", nargs="+", default=["center224", "tencrop", "multiscale"])
    parser.add_argument("--batch", type=int, default=32, help="eval.batch_size (multiscale: as many pixels)")
    return parser.parse_args(argv)


def unpack(source: Path, folder: Path, count: int) -> Path:
    """The first `count` images of source's val/<class>/* into folder/val/."""
    if source.is_dir():
        files = sorted((source / "val").rglob("*.*"))[:count]
        for f in files:
            (folder / f.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            (folder / f.relative_to(source)).write_bytes(f.read_bytes())
        return folder
    taken = 0
    with tarfile.open(source) as tf:
        for member in tf:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) == 3 and parts[0] == "val":
                (folder / parts[0] / parts[1]).mkdir(parents=True, exist_ok=True)
                (folder / member.name).write_bytes(tf.extractfile(member).read())
                taken += 1
                if taken == count:
                    break
    return folder


def main(argv: list[str] | None = None) -> int:
    from reproduce import distributed
    from reproduce.data import eval_loader
    from reproduce.engine import evaluate
    from reproduce.evaluate import eval_config, test_split
    from reproduce.models import build_model

    args = parse_args(argv)
    if not args.source.exists():
        print(f"error: {args.source} not found; give --source, a .tar.gz or folder of val/<class>/*")
        return 2
    info = distributed.setup("auto")
    with tempfile.TemporaryDirectory() as tmp:
        root = unpack(args.source, Path(tmp), args.images)
        classes = len(list((root / "val").iterdir()))
        model = build_model(args.model, num_classes=classes).to(info.device).eval()
        splits = {}
        for protocol in args.protocols:
            ns = argparse.Namespace(
                model=args.model,
                config=None,
                protocol=protocol,
                data=str(root),
                overrides=["data.workers=0", f"eval.batch_size={args.batch}"],
            )
            cfg = eval_config(ns)
            splits[protocol] = (cfg, test_split(cfg)[0])
        best = {p: 0.0 for p in args.protocols}
        for round_ in range(args.rounds + 1):
            for protocol, (cfg, split) in splits.items():
                start = time.perf_counter()
                evaluate(model, eval_loader(split, cfg, info), info, amp=False, channels_last=False)
                if info.device.type == "cuda":
                    torch.cuda.synchronize()
                if round_:  # round 0 warms up
                    best[protocol] = max(best[protocol], len(split) / (time.perf_counter() - start))
    print(
        f"{args.model}, {args.images} images of {args.source.name}, {machine()}, device {info.device}, "
        f"torch threads {torch.get_num_threads()}, best of {args.rounds} rounds"
    )
    base = best.get("center224")
    for protocol, speed in best.items():
        relative = f"{base / speed:6.1f}x the time of center224" if base else ""
        print(f"  {protocol:<11} {speed:8.2f} images/s  {relative}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
