"""Train a grid of configs x seeds on this machine, one run after another.

  reproduce sweep --configs configs/cifar10/{plain,resnet}{20,56}.yaml --seeds 0 1 2 [key=value ...]
  reproduce sweep --configs ... --seeds 0 1 2 --dry-run      print the commands only

Each run is `reproduce train --config FILE seed=S key=value ...`, called in this process.
The grid goes seed by seed (every config for seed 0, then seed 1, ...) so that a sweep
cut short still holds a complete depth comparison. A failed run does not stop the sweep;
the failures are listed at the end and the exit status is 1. A run stopped on request
(SIGTERM / Ctrl-C) stops the sweep: start the same command again to resume, since every
finished run is found complete and every interrupted one resumes from its checkpoint.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys

log = logging.getLogger("reproduce.sweep")
STOPPED = 128 + signal.SIGTERM  # what train.main returns when asked to stop


def parse_args(argv: list[str]) -> argparse.Namespace:
    # `--seeds 0 1 2 key=value` would hand key=value to --seeds: overrides are split off first.
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    parser = argparse.ArgumentParser(prog="reproduce sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", required=True, metavar="FILE", help="YAML files under configs/")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="S", help="default: 0")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and run nothing")
    args = parser.parse_args([a for a in argv if a not in overrides])
    args.overrides = overrides
    return args


def grid(configs: list[str], seeds: list[int], overrides: list[str]) -> list[list[str]]:
    """The `reproduce train` argument lists, seed-major."""
    return [["--config", path, f"seed={seed}", *overrides] for seed in seeds for path in configs]


def main(argv: list[str] | None = None) -> int:
    from reproduce.config import ConfigError, load_config

    args = parse_args(sys.argv[1:] if argv is None else argv)
    runs = grid(args.configs, args.seeds, args.overrides)
    if args.dry_run:
        for run in runs:
            print("reproduce train " + shlex.join(run))
        return 0
    # Every config is checked before the first run, so a typo does not surface hours in.
    for path in args.configs:
        try:
            load_config(path, args.overrides)
        except ConfigError as err:
            print(f"error: {path}: {err}", file=sys.stderr)
            return 2

    from reproduce import train

    failed = []
    for i, run in enumerate(runs, start=1):
        command = "reproduce train " + shlex.join(run)
        print(f"\n== sweep {i}/{len(runs)}: {command}", flush=True)
        try:
            code = train.main(run)
        except Exception as err:  # noqa: BLE001 (one broken run must not end the sweep)
            log.exception("run failed")
            code = f"{type(err).__name__}: {err}"
        if code == STOPPED:
            print(f"sweep stopped on request at run {i}/{len(runs)}; start the same command to resume", file=sys.stderr)
            return STOPPED
        if code != 0:
            failed.append((command, code))
    print(f"\nsweep: {len(runs) - len(failed)} of {len(runs)} runs succeeded")
    for command, code in failed:
        print(f"  FAILED ({code}): {command}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
