"""`reproduce <command>`: the suite's one entry point.

  reproduce models                     every registered network: parameters and multiply-adds
  reproduce train --config FILE [k=v]  train one configured network (also: python reproduce/train.py)
  reproduce study [--data PATH]        the quick plain-versus-residual depth study on CIFAR-10 (CPU, minutes)
  reproduce check FILE... [k=v]        validate configs without running them
  reproduce prepare cifar10|imagenet --source PATH --out DIR   write the FFCV .beton files of data.loader=ffcv
  reproduce sweep --configs F... --seeds S... [--parallel N] [k=v]   a configs x seeds grid, N runs at a time
  reproduce report --study cifar10|imagenet [--experiment N] [--out DIR] [--export F | --from-export F]
                                       tables, figures and provenance beside the paper's numbers
  reproduce analyze responses --run ID Fig. 7: std of the layer responses of a trained run
  reproduce bench [--config F] [k=v]   images/s of train.py against a bare loop (overhead ratio)
  reproduce bench-loaders [--workers N] images/s of the FFCV loader against torchvision's on real JPEGs
  reproduce bench-matrix [--models M...] training images/s over precision x channels_last x compile x input
  reproduce sync RUN_DIR               send metrics a job could not deliver to MLflow (server was down)
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="reproduce", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("command", choices=["models", "train", "study", "check", "sweep", "report", "analyze", "bench", "bench-loaders", "bench-matrix", "prepare", "sync"])
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in parser._actions[-1].choices:
        parser.parse_args(argv[:1])  # prints the usage line and exits 2
    if command == "models":
        from reproduce.models import format_model_table

        print(format_model_table())
        return 0
    if command == "train":
        from reproduce import train

        return train.main(rest)
    if command == "check":
        return _check(rest)
    if command == "sync":
        from pathlib import Path

        from reproduce.tracking import TrackingUnreachable, sync

        if len(rest) != 1:
            print("usage: reproduce sync RUN_DIR", file=sys.stderr)
            return 2
        try:
            return sync(Path(rest[0]))
        except TrackingUnreachable as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    import importlib

    return importlib.import_module(f"reproduce.{command.replace('-', '_')}").main(rest)


def _check(argv: list[str]) -> int:
    from reproduce.config import ConfigError, load_config

    files = [a for a in argv if "=" not in a]
    overrides = [a for a in argv if "=" in a]
    if not files:
        print("usage: reproduce check FILE... [key=value ...]", file=sys.stderr)
        return 2
    status = 0
    for path in files:
        try:
            load_config(path, overrides)
            print(f"ok    {path}")
        except ConfigError as err:
            print(f"error {path}: {err}", file=sys.stderr)
            status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
