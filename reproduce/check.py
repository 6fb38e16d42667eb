"""`reproduce check [--no-data] FILE... [key=value ...]`: validate configs, and the data they would
train on, without running anything (what `reproduce train` refuses before training, refused here)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from reproduce.config import ConfigError, load_config
from reproduce.data import DataError
from reproduce.train import check_inputs


def check_main(argv: list[str] | None = None) -> int:
    """`reproduce check [--no-data] FILE... [key=value ...]`: validate configs, and their data when
    data.path is set (unless --no-data), without running anything. Exit status 2 when any is refused."""
    argv = list(argv or [])
    with_data = "--no-data" not in argv
    argv = [a for a in argv if a != "--no-data"]
    files = [a for a in argv if "=" not in a]
    overrides = [a for a in argv if "=" in a]
    if not files or any(a.startswith("-") for a in files):
        print("usage: reproduce check [--no-data] FILE... [key=value ...]", file=sys.stderr)
        return 2
    for item in files:
        if not Path(item).exists() and not item.endswith((".yaml", ".yml")) and "/" not in item:
            print(
                f"error: {item!r} is neither a config file nor a key=value override (e.g. {item}=VALUE)",
                file=sys.stderr,
            )
            return 2
    status = 0
    for path in files:
        try:
            cfg = load_config(path, overrides)
            if not with_data:
                print(f"ok    {path} (config only: data not checked)")
                continue
            # data.path null: the run reads $REPRODUCE_CIFAR10 where it is set (checked here as well), else downloads
            if cfg.data.path is None and not cfg.data.synthetic and not os.environ.get("REPRODUCE_CIFAR10"):
                print(
                    f"ok    {path} (data not checked: data.path is null, CIFAR-10 is downloaded when training starts)"
                )
                continue
            check_inputs(cfg)
            print(f"ok    {path}")
        except (ConfigError, DataError) as err:
            print(f"error {path}: {err}", file=sys.stderr)
            status = 2
    return status
