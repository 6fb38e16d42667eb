"""`python -m reproduce.torchrun [torchrun flags] reproduce/train.py ...`: torchrun, with an exit
status that tells a stop from a failure.

torchrun answers SIGTERM or SIGINT (scancel, `timeout`, a preemption, Ctrl-C) by passing the
signal to its training processes and waiting for them: they agree on an iteration, write a
checkpoint, end the MLflow run as KILLED and exit 143. torchrun itself then raises
SignalException and exits 1 with a traceback, which a scheduler or a script reads as a
failure. This runs the same torchrun, same flags, and exits 128 + the signal's number instead
(143 for SIGTERM), as `python reproduce/train.py` does. When every training process that failed
refused its input (exit status 2: a bad config key, a missing dataset; its one-line error is above),
it exits 2 with one line instead of torchrun's 1 and its error report; every other outcome is
torchrun's own.
"""

from __future__ import annotations

import sys


def main() -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun()
    except ChildFailedError as err:
        codes = {failure.exitcode for failure in err.failures.values()}
        if codes != {2}:
            raise
        ranks = ", ".join(str(rank) for rank in sorted(err.failures))
        print(
            f"reproduce.torchrun: rank {ranks} refused its input (exit status 2; the error line is above)",
            file=sys.stderr,
        )
        return 2
    except SignalException as err:
        signum = int(err.sigval)
        print(
            f"reproduce.torchrun: stopped by {err.sigval.name}; the training processes were asked to checkpoint "
            f"and stop (their lines above say whether they did); exit status {128 + signum}",
            file=sys.stderr,
        )
        return 128 + signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
