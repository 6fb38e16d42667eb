"""Train a grid of configs x seeds on this machine, one run after another or several at once.

  reproduce sweep --configs configs/cifar10/{plain,resnet}{20,56}.yaml --seeds 0 1 2 [key=value ...]
  reproduce sweep --configs ... --seeds 0 1 2 --parallel 4   four runs at a time (sharing the GPUs)
  reproduce sweep --configs ... --seeds 0 1 2 --dry-run      print the commands only

Each run is `reproduce train --config FILE seed=S key=value ...`: called in this process, or
with --parallel N > 1 as N child processes at a time, each writing its output to
`--log-dir` (default ./sweep-logs). Small networks leave most of a GPU idle, so several runs
sharing it finish a grid sooner; with several GPUs visible each child gets the least-loaded
one (CUDA_VISIBLE_DEVICES). The grid goes seed by seed (every config for seed 0, then seed 1,
...) so that a sweep cut short still holds a complete depth comparison. A failed run does not
stop the sweep; the failures are listed at the end and the exit status is 1. A stop request
(SIGTERM / Ctrl-C) stops the sweep: running children are asked to stop too and checkpoint; if
the sweep itself is killed outright, the kernel sends its children SIGTERM all the same. Start
the same command again to resume, since every finished run is found complete and every
interrupted one resumes from its checkpoint.

The sweep is one parent MLflow run per experiment (tag reproduce.kind=study, named sweep-...), its
training runs nested under it: found again by its recipes (tag reproduce.study_key) when the sweep
is resumed or extended by more seeds. At the end it holds `reproduce report`'s files of the sweep's
runs as artifacts, the summary over seeds (reproduce/report/summary.py) as metrics, and the tables
as its description.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from reproduce.config import Config, ConfigError, load_config
from reproduce.errors import ArgumentParser, Failed, Refused, command, report
from reproduce.stop import STOP_SIGNALS, STOPPED, StopFlag
from reproduce.tracking import PARENT_ENV, check_reachable

log = logging.getLogger("reproduce.sweep")


def parse_args(argv: list[str]) -> argparse.Namespace:
    # `--seeds 0 1 2 key=value` would hand key=value to --seeds: overrides are split off first.
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    parser = ArgumentParser(prog="reproduce sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", required=True, metavar="FILE", help="YAML files under configs/")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="S", help="default: 0")
    parser.add_argument(
        "--parallel",
        type=int,
        default=1,
        metavar="N",
        help="runs at a time, as child processes (default 1: in this process)",
    )
    parser.add_argument(
        "--log-dir", type=Path, default=Path("sweep-logs"), help="with --parallel > 1: one log file per run here"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands and run nothing")
    args = parser.parse_args([a for a in argv if a not in overrides])
    if args.parallel < 1:
        parser.error(f"--parallel must be at least 1, got {args.parallel}")
    args.overrides = overrides
    return args


@dataclass(frozen=True)
class Planned:
    """One run of a grid: its `reproduce train` arguments (what a child process or a log shows) and
    its config, read and validated once."""

    argv: list[str]
    cfg: Config
    parent: str | None = None  # the MLflow run it nests under (open_parents)

    @property
    def command(self) -> str:
        return "reproduce train " + shlex.join(self.argv)


def plan(configs: list[str], seeds: list[int], overrides: list[str]) -> list[Planned]:
    """The grid, seed-major (every config for seed 0, then seed 1, ...): each config file is read
    once, every run validated before the first starts (ConfigError naming the file otherwise)."""
    loaded = {}
    for path in configs:
        try:
            loaded[path] = load_config(path, overrides)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    return [
        Planned(["--config", path, f"seed={seed}", *overrides], _seeded(loaded[path], path, seed))
        for seed in seeds
        for path in configs
    ]


def _seeded(cfg: Config, path: str, seed: int) -> Config:
    try:
        return cfg.with_seed(seed)
    except ConfigError as err:
        raise ConfigError(f"--seeds {seed} ({path}): {err}") from None


@command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.dry_run:  # the commands only: nothing is read or checked
        for seed in args.seeds:
            for path in args.configs:
                print("reproduce train " + shlex.join(["--config", path, f"seed={seed}", *args.overrides]))
        return 0
    from reproduce.runs import parent

    command_line = "reproduce sweep " + shlex.join(sys.argv[1:] if argv is None else argv)
    runs = parent.open_parents(plan(args.configs, args.seeds, args.overrides), "sweep", command_line)
    code = run(runs, args.parallel, args.log_dir)
    for planned in {p.parent: p for p in runs}.values():
        if code in (0, 1):  # a failed run leaves the others, which the report shows
            parent.sweep_report(planned, runs, command_line)
        else:  # stopped (143) or refused (2): KILLED, as its runs; the same command opens it again
            parent.end_parent(planned.parent, "KILLED")
    return code


def run(runs: list[Planned], parallel: int = 1, log_dir: Path = Path("sweep-logs")) -> int:
    """Train the planned runs, `parallel` at a time (1: in this process): 0 when all finished, 1
    when any failed (the others still run), 143 when stopped on request (start again to resume)."""
    check_reachable()  # an unreachable server is refused once, not once per run
    failed = run_in_process(runs) if parallel == 1 else run_in_children(runs, parallel, log_dir)
    if failed is None:
        return STOPPED
    print(f"\nsweep: {len(runs) - len(failed)} of {len(runs)} runs succeeded")
    for command_line, code in failed:
        print(f"  FAILED ({code}): {command_line}", file=sys.stderr)
    return 1 if failed else 0


def run_in_process(runs: list[Planned]) -> list[tuple[str, object]] | None:
    """Each run in turn, in this process: the failures, or None when a run was stopped on request."""
    from reproduce import train

    failed, requested = [], []
    # A stop request between runs, or one a run took too late to stop for (during its final
    # evaluation: train's handler passes it on to this one), ends the sweep before the next run.
    previous = {s: signal.signal(s, lambda signum, frame: requested.append(signum)) for s in STOP_SIGNALS}
    try:
        for i, planned in enumerate(runs, start=1):
            if requested:
                print(
                    f"sweep stopped on request before run {i}/{len(runs)}; start the same command to resume",
                    file=sys.stderr,
                )
                return None
            print(f"\n== sweep {i}/{len(runs)}: {planned.command}", flush=True)
            code = _train_one(train, planned)
            if code == STOPPED:
                print(
                    f"sweep stopped on request at run {i}/{len(runs)}; start the same command to resume",
                    file=sys.stderr,
                )
                return None
            if code != 0:
                failed.append((planned.command, code))
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return failed


def _train_one(train, planned: Planned) -> object:
    """train.run's exit status (its MLflow run nested under planned.parent); a refusal or failure is
    printed in one line and becomes its status."""
    stop = StopFlag()
    before = os.environ.pop(PARENT_ENV, None)
    if planned.parent:
        os.environ[PARENT_ENV] = planned.parent
    try:
        return train.run(planned.cfg, stop)
    except (Refused, Failed) as err:
        return report(err)
    except Exception as err:  # noqa: BLE001 (one broken run must not end the sweep)
        log.exception("run failed")
        return f"{type(err).__name__}: {err}"
    finally:
        stop.restore()
        os.environ.pop(PARENT_ENV, None)
        if before is not None:
            os.environ[PARENT_ENV] = before


def run_in_children(runs: list[Planned], parallel: int, log_dir: Path) -> list[tuple[str, object]] | None:
    """Up to `parallel` runs at a time, each `python -m reproduce.train ...` in its own process
    session (so a Ctrl-C reaches only this process, which then stops the children in order).
    The failures, or None when the sweep was stopped on request."""
    import torch

    log_dir.mkdir(parents=True, exist_ok=True)
    children = _Children(runs, parallel, log_dir, torch.cuda.device_count())
    previous = {s: signal.signal(s, children.stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        # once stopping, the runs not started stay pending
        while children.active or (children.pending and not children.stopping):
            while children.pending and len(children.active) < parallel and not children.stopping:
                children.start(*children.pending.pop(0))
            time.sleep(0.2)
            children.reap()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if children.stopping:
        print(
            f"sweep stopped on request with {len(children.pending)} runs not started; start the same command to resume",
            file=sys.stderr,
        )
        return None
    return children.failed


class _Children:
    """The runs of a sweep in child processes: those not started, those running (with their
    number, command, log and GPU), the failures, and the stop signals received."""

    def __init__(self, runs: list[Planned], parallel: int, log_dir: Path, gpus: int):
        self.total, self.parallel, self.log_dir, self.gpus = len(runs), parallel, log_dir, gpus
        self.load = [0] * gpus  # children per GPU
        self.pending = list(enumerate(runs, start=1))
        self.active: dict[subprocess.Popen, tuple[int, str, Path, int | None]] = {}
        self.failed: list[tuple[str, object]] = []
        self.stopping: list[int] = []

    def stop(self, signum, frame) -> None:
        """The signal handler: every running child asked to checkpoint and stop (SIGTERM)."""
        if not self.stopping:
            print(
                f"sweep: stopping on {signal.Signals(signum).name}: asking {len(self.active)} running runs to checkpoint and stop",
                file=sys.stderr,
                flush=True,
            )
        self.stopping.append(signum)
        for child in self.active:
            child.send_signal(signal.SIGTERM)

    def start(self, i: int, planned: Planned) -> None:
        """Run number `i` started in its own session, on the least loaded GPU where there are several."""
        command, run = planned.command, planned.argv
        log_path = self.log_dir / f"{i:03d}-{Path(run[1]).stem}-{run[2].replace('=', '')}.log"
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.parallel)))  # share the cores
        if planned.parent:
            env[PARENT_ENV] = planned.parent
        gpu = None
        if self.gpus > 1:
            gpu = min(range(self.gpus), key=self.load.__getitem__)
            self.load[gpu] += 1
            visible = env.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(self.gpus)))).split(",")
            env["CUDA_VISIBLE_DEVICES"] = visible[gpu]
        with log_path.open("a") as out:
            child = subprocess.Popen(
                [sys.executable, "-m", "reproduce.train", *run],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_stop_when_parent_dies(os.getpid()),
            )
        self.active[child] = (i, command, log_path, gpu)
        print(
            f"== sweep {i}/{self.total} started (pid {child.pid}{'' if gpu is None else f', GPU {gpu}'}): {command}"
            f"  [log: {log_path}]",
            flush=True,
        )

    def reap(self) -> None:
        """The children that ended: said, their GPU freed, and a failure noted unless they finished
        or were stopped by the sweep."""
        for child in [c for c in self.active if c.poll() is not None]:
            i, command, log_path, gpu = self.active.pop(child)
            if gpu is not None:
                self.load[gpu] -= 1
            code = child.returncode
            word = "finished" if code == 0 else "stopped" if code == STOPPED else f"FAILED (exit {code})"
            print(f"== sweep {i}/{self.total} {word}: {command}  [log: {log_path}]", flush=True)
            if code == STOPPED and not self.stopping:  # stopped by someone else: not done, so not a success
                self.failed.append(
                    (command, f"stopped from outside the sweep; start the same command to resume; log {log_path}")
                )
            elif code not in (0, STOPPED):
                self.failed.append((command, f"exit {code}; log {log_path}"))


def _stop_when_parent_dies(parent: int):
    """For a child: SIGTERM (checkpoint and stop) when the sweep dies, even by SIGKILL, so no run
    trains on unwatched, holding its run directory's lock. Linux only; elsewhere a no-op."""

    def arm() -> None:
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            return
        if hasattr(libc, "prctl"):
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the sweep died before the signal was armed
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


if __name__ == "__main__":
    sys.exit(main())
