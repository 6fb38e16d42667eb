"""`reproduce <command>`: the suite's one entry point.

reproduce models                     every registered network: parameters and multiply-adds
reproduce train --config FILE [k=v]  train one configured network (also: python reproduce/train.py)
reproduce evaluate --weights W (--config F | --model M) [--protocol P] [--data PATH]   test error of any ResNet weights
reproduce study [--data PATH]        the quick plain-versus-residual depth study on CIFAR-10 (CPU, minutes)
reproduce check [--no-data] FILE... [k=v]  validate configs (and their data) without running them
reproduce prepare cifar10|imagenet --source PATH --out DIR   write the FFCV .beton files of data.loader=ffcv
reproduce sweep --configs F... --seeds S... [--parallel N] [k=v]   a configs x seeds grid, N runs at a time
reproduce report --study cifar10|imagenet [--experiment N] [--out DIR] [--export F | --from-export F]
                                     tables, figures and provenance beside the paper's numbers
reproduce runs [--experiment N] [--csv]   the training runs of the tracking store, one line each
reproduce analyze responses --run ID Fig. 7: std of the layer responses of a trained run
reproduce bench [--config F] [k=v]   images/s of train.py against a bare loop (overhead ratio)
reproduce bench-loaders [--workers N] images/s of the FFCV loader against torchvision's on real JPEGs
reproduce bench-matrix [--models M...] training images/s over precision x channels_last x compile x input
reproduce bench-inference [--model M | --weights W] [--batch B...]   inference images/s and latency: fp32/bf16/int8 x eager/compile/exported
reproduce plan (--config F... | --study cifar10|imagenet | --from CSV) [--world-size N] [--nodes N]
                                     each experiment's wall time and device-hours, from steps measured here
reproduce park RUN_DIR... --to DIR   carry an unfinished run (newest checkpoint + MLflow record) to another machine
reproduce unpark DIR...              put a parked run back (checkpoint, MLflow run) to resume it here
reproduce sync RUN_DIR               send metrics a job could not deliver to MLflow (server was down)
reproduce doctor [--json] [--data PATH]   what this machine can do for the suite; exit 1 naming what a job lacks
"""

from __future__ import annotations

import argparse
import importlib
import sys

from reproduce.errors import ArgumentParser

# command -> "module:function"; each function takes the command's own arguments and returns
# the exit status. Modules are imported only when their command runs (torch, MLflow and FFCV
# are slow to import).
COMMANDS = {
    "models": "reproduce.models:main",
    "train": "reproduce.train:main",
    "evaluate": "reproduce.evaluate:main",
    "study": "reproduce.runs.study:main",
    "check": "reproduce.check:check_main",
    "prepare": "reproduce.data.ffcv.prepare:main",
    "sweep": "reproduce.runs.sweep:main",
    "report": "reproduce.report:main",
    "runs": "reproduce.report.listing:main",
    "analyze": "reproduce.report.responses:main",
    "bench": "reproduce.bench.overhead:main",
    "bench-loaders": "reproduce.bench.loaders:main",
    "bench-matrix": "reproduce.bench.matrix:main",
    "bench-inference": "reproduce.bench.inference:main",
    "plan": "reproduce.bench.plan:main",
    "park": "reproduce.runs.park:park_main",
    "unpark": "reproduce.runs.park:unpark_main",
    "sync": "reproduce.tracking.sync:sync_main",
    "doctor": "reproduce.doctor:main",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = ArgumentParser(
        prog="reproduce",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("command", choices=list(COMMANDS))
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        parser.parse_args(argv[:1])  # prints the usage line with the choices and exits 2
    module, function = COMMANDS[command].split(":")
    from reproduce.errors import Failed, Refused, report

    try:
        return getattr(importlib.import_module(module), function)(rest)
    except (Refused, Failed) as err:  # the one mapping from error to exit status (reproduce/errors.py)
        return report(err)


def entry() -> None:
    """The `reproduce` console script."""
    from reproduce.stop import exit_with

    exit_with(main())


if __name__ == "__main__":
    entry()
