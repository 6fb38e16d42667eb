"""Stop requests: the signals that ask a job to checkpoint and stop, and the flag the loop reads.

SIGTERM (schedulers, `timeout`, preemption), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's `--signal`) all mean
"write a checkpoint at the next safe point and end with exit status 143". The handler only records
the request; the training loop checks it between iterations, where a checkpoint is consistent.
"""

from __future__ import annotations

import signal
import sys

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
STOPPED = 128 + signal.SIGTERM  # the exit status of a job that stopped on request


class Stopped(Exception):
    """The job was asked to stop (SIGTERM, SIGINT, SIGUSR1); a checkpoint has been written."""


class StopFlag:
    """Records SIGTERM / SIGINT / SIGUSR1 from the moment it is made; `restore` puts the previous
    handlers back. A caller's own handler (a sweep's, between its runs) hears the signal too."""

    def __init__(self):
        self.requested = False
        self.iteration = 0  # the last completed iteration, for error messages
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.requested = True
        previous = getattr(self, "_previous", {}).get(signum)  # not yet set while __init__ installs the handlers
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def ignore_stops() -> None:
    """From now on a stop signal is ignored: for the last moments of a process whose outcome is decided."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def exit_with(status: int) -> None:
    """Exit with the status the command decided. A stop signal arriving now, while the interpreter
    shuts down (MLflow's exit hooks, thread joins), would otherwise kill the process with 143 after
    a run that FINISHED and report it as stopped."""
    ignore_stops()
    sys.exit(status)
