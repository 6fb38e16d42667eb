"""DataLoader worker processes that end with the iteration that started them, whatever ends it.

Every DataLoader of the package (torchvision_loader, device_decode, synthetic) is made here, as
`Batches`. Three things differ from a bare DataLoader:

- An error in a worker (a damaged image, a vanished file, a transform that fails) reaches the
  caller as DataError with the original one-line message, the same with 0 or N workers, instead
  of torch's "Caught X in DataLoader worker process N" and the worker's traceback. The sample's
  error travels as a value (`_Failed`) in place of its batch, so its message arrives intact.
- The workers are shut down when the iteration ends, by an error, a stop or the end of the data,
  before the exception goes on up, not left to the iterator's __del__ (see below). A worker that
  does not exit in time is killed.
- At interpreter exit, iterations still open are shut down the same way, first.

Issue 30, a job hung by one truncated JPEG until SIGKILL, was all three. The exception torch
re-raises for a worker (ExceptionWrapper.reraise) is in a reference cycle with its traceback, which
holds the iterator's frames: the iterator outlived the error. When the cycle was collected, the
index queues' own finalizers ran before the iterator's __del__, so its "exit" message never reached
the workers; they waited on, torch's fallback terminate() sent SIGTERM, which they ignore (they
leave stop signals to the trainer), and at exit multiprocessing's hook did the same and joined them
forever, in a process that ignores stop signals by then (cli.exit_with).
"""

from __future__ import annotations

import atexit
import logging
import signal
import traceback
import weakref

from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils import signal_handling
from torch.utils.data._utils.collate import default_collate, default_convert

from reproduce.data.base import DataError

log = logging.getLogger("reproduce.data")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
KILL_WAIT_S = 5.0  # after torch's own shutdown, how long a worker killed with SIGKILL is waited for


def leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """In a worker: ignore the stop signals. `scancel`, `timeout`, systemd and SLURM preemption
    signal every process of the job; a worker that died of it would take the trainer down with
    it (torch raises "DataLoader worker ... killed by signal") before it could checkpoint. The
    trainer decides; its workers end when it closes the loader (or, if it dies, on their own).
    The workers are started with these signals blocked (Batches), so one sent to the group while a
    worker starts waits, and is dropped here, instead of killing the worker before it gets here."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class _Failed:
    """What a worker returns in place of a sample or batch it could not make: the one-line
    error for the user and the traceback (logged at debug level)."""

    def __init__(self, err: BaseException, key):
        index = key[0] if isinstance(key, tuple) else key  # a training sample is (index, seed)
        text = str(err) if isinstance(err, DataError) else f"{type(err).__name__} while loading sample {index}: {err}"
        self.message = " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(err).__name__
        self.detail = "".join(traceback.format_exception(err))


class _Guarded(Dataset):
    """`dataset[key]`, or `_Failed` for an exception raised making it."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        try:
            return self.dataset[key]
        except Exception as err:
            return _Failed(err, key)


class _GuardedCollate:
    """`collate(samples)`; the first `_Failed` sample instead where there is one, or `_Failed`
    for an exception raised collating (a class, not a closure: workers may be spawned)."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, samples):
        for sample in samples:
            if isinstance(sample, _Failed):
                return sample
        try:
            return self.collate(samples)
        except Exception as err:
            return _Failed(err, "batch")


class Batches:
    """The batches of DataLoader(dataset, **kwargs), iterable like it (again and again, len()),
    with the workers' errors as one-line DataError and the workers shut down when an iteration
    ends (see the module's docstring). The workers ignore stop signals."""

    def __init__(self, dataset, *, collate_fn=None, **kwargs):
        if collate_fn is None:  # DataLoader's own default
            batched = kwargs.get("batch_size", 1) is not None or kwargs.get("batch_sampler") is not None
            collate_fn = default_collate if batched else default_convert
        self.loader = DataLoader(
            _Guarded(dataset),
            collate_fn=_GuardedCollate(collate_fn),
            worker_init_fn=leave_stop_signals_to_the_trainer,
            **kwargs,
        )

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        batches = None
        try:
            # The workers start (fork) with the stop signals blocked, as is this thread meanwhile: a
            # stop signal to the whole group then reaches the trainer a moment later, never a worker.
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            try:
                batches = iter(self.loader)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            if getattr(batches, "_workers", None):
                _track(batches)
            for batch in batches:
                if isinstance(batch, _Failed):
                    log.debug("input pipeline error: %s", batch.detail)
                    raise DataError(batch.message)
                yield batch
        finally:
            if batches is not None:
                shut_down(batches)  # before the error (or the stop) goes on up


_OPEN: weakref.WeakSet = weakref.WeakSet()  # iterations with worker processes not yet shut down
_hooked = False


def _track(batches) -> None:
    """Remember `batches` until it is shut down; the first time, hook the interpreter's exit.
    The hook is registered after torch's and multiprocessing's, so it runs before them (atexit
    runs last-in first-out): while torch's shutdown still works and before multiprocessing
    joins the workers."""
    global _hooked
    _OPEN.add(batches)
    if not _hooked:
        atexit.register(_shut_down_all)
        _hooked = True


def _shut_down_all() -> None:
    for batches in list(_OPEN):
        shut_down(batches)


def shut_down(batches) -> None:
    """End the worker processes of a DataLoader iterator now (none: nothing to do). torch's own
    shutdown first (it tells them to exit and joins them); any still alive after it (busy in a
    sample, or torch's shutdown skipped because the interpreter is exiting) is killed: SIGTERM
    is no use, they ignore it."""
    _OPEN.discard(batches)
    workers = getattr(batches, "_workers", None)
    if not workers:
        return
    try:
        batches._shutdown_workers()
    finally:
        alive = [w for w in workers if w.is_alive()]
        if alive and getattr(batches, "_worker_pids_set", False):
            # torch's SIGCHLD handler would report the killed workers as a failure of the job
            signal_handling._remove_worker_pids(id(batches))
            batches._worker_pids_set = False
        for w in alive:
            w.kill()
        for w in alive:
            w.join(timeout=KILL_WAIT_S)
