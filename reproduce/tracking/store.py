"""The tracking store: whether it answers, whether it holds the run a resume continues, a local
sqlite store made once under a lock, metrics sent in batches it accepts, and errors in one line."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from reproduce.errors import Refused

BATCH_LIMIT = 1000  # metrics per MLflow log_batch call (the server's limit)


def http_settings() -> None:
    """Our sender retries on its own schedule; MLflow's own HTTP retries (minutes by default)
    would only make a dead server look like a hung job. Set when tracking starts, not at import;
    a user's own values win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


def short_error(err: Exception) -> str:
    """An error in one line of at most 200 characters (its type when it says nothing)."""
    return str(err).splitlines()[0][:200] if str(err) else type(err).__name__


def log_metric_batches(client, run_id: str, metrics: list) -> None:
    """Send `metrics` (mlflow.entities.Metric) to `run_id` in batches MLflow accepts."""
    for first in range(0, len(metrics), BATCH_LIMIT):
        client.log_batch(run_id, metrics=metrics[first : first + BATCH_LIMIT])


class TrackingUnreachable(Refused, RuntimeError):
    """The configured tracking server does not answer; the message is one line."""


def check_reachable(timeout_s: float = 10.0) -> None:
    """Raise TrackingUnreachable when MLFLOW_TRACKING_URI names a server that does not answer."""
    import mlflow

    http_settings()
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as reply:
            if reply.status == 200:
                return
            reason = f"HTTP {reply.status}"
    except (urllib.error.URLError, OSError) as err:
        reason = str(getattr(err, "reason", err))
    raise TrackingUnreachable(
        f"MLflow tracking server {uri} is unreachable ({reason}); start it, fix "
        "MLFLOW_TRACKING_URI, or unset it to log to ./mlflow.db"
    )


class NoTrackingStore(Refused, LookupError):
    """A command that reads the tracking store found none (MLflow would have made an empty one)."""


def local_store_path(uri: str) -> Path | None:
    """The file or folder of a local tracking store (sqlite:///FILE, file:DIR or a bare path); None for a server."""
    if uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///")
        return None if path in ("", ":memory:") else Path(path)
    if uri.startswith("file:"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(uri).path))
    if "://" in uri or ":" in uri.split("/")[0] or uri in ("databricks", "databricks-uc", "uc"):
        return None
    return Path(uri)


def check_readable(timeout_s: float = 10.0) -> str:
    """For a command that only reads the tracking store: its URI. TrackingUnreachable (one line, within
    `timeout_s`) when a server does not answer; NoTrackingStore when a local store does not exist,
    which is then not created (MLflow itself would make an empty one on first read)."""
    import mlflow

    check_reachable(timeout_s)
    uri = mlflow.get_tracking_uri()
    path = local_store_path(uri)
    if path is not None and not path.exists():
        unset = "" if os.environ.get("MLFLOW_TRACKING_URI") else ", MLflow's default: MLFLOW_TRACKING_URI is unset"
        raise NoTrackingStore(
            f"no tracking store at {uri} ({path} does not exist{unset}); set MLFLOW_TRACKING_URI to the store "
            "that holds the runs, or train a run first"
        )
    return uri


class ResumeRefused(Refused, ValueError):
    """A run directory's checkpoints continue an MLflow run this store lacks, or one trained on
    other data; the message is one line and says what to do."""


def check_resumable(run_id: str, checkpoint_path: Path, data_fingerprint: str) -> str:
    """The status of MLflow run `run_id` (which the checkpoint `checkpoint_path` continues);
    ResumeRefused unless the tracking store holds it, not deleted, and it was trained on the
    data whose fingerprint is `data_fingerprint` (a resume must not mix, say, the lossy JPEG
    copy of CIFAR-10 with the original: one run, one data set)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = mlflow.get_tracking_uri()
    where = f"the checkpoints in {Path(checkpoint_path).parent} continue MLflow run {run_id}"
    missing = ResumeRefused(
        f"{where}, which the tracking store {uri} does not hold; set MLFLOW_TRACKING_URI to the "
        "store the run began in, or set run.dir to a new folder to start a new run"
    )
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise missing  # and no empty store is made where the user did not mean to log
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise missing from None
    if run.info.lifecycle_stage == "deleted":
        raise ResumeRefused(
            f"{where}, which is deleted in {uri}; restore it (MLflow UI, or "
            f"mlflow.MlflowClient().restore_run('{run_id}')) or set run.dir to a new folder"
        )
    trained_on = run.data.tags.get("reproduce.data_fingerprint")
    if trained_on and trained_on != data_fingerprint:
        raise ResumeRefused(
            f"{where}, trained on other data (fingerprint {trained_on}: "
            f"{run.data.tags.get('reproduce.data', '?')}) than this data.path gives ({data_fingerprint}); "
            "give the run's data again, or set run.dir to a new folder to start a new run"
        )
    return run.info.status


def prepare_store() -> None:
    """Create a local sqlite store's tables under a lock shared by every process: jobs that start
    at the same moment on a fresh store (a parallel sweep, a SLURM array) would otherwise race
    to create them, and all but one fail. The tables are made in a file beside the store and
    moved into place whole, so a job stopped while making them (a SIGTERM in its first second)
    leaves no store, never a half-made one that no later job can open. Costs nothing for a
    server, one query for an existing store."""
    import fcntl

    import mlflow

    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not db.exists():
            _make_store(db)
        mlflow.MlflowClient().search_experiments(max_results=1)  # the store is opened once per process


def _make_store(db: Path) -> None:
    """A new sqlite store at `db`, made whole beside it and renamed into place (the caller holds
    the store's lock, so any file left beside it by a job that was stopped is stale)."""
    import mlflow

    for stale in db.parent.glob(f".{db.name}.making-*"):
        stale.unlink(missing_ok=True)
    part = db.with_name(f".{db.name}.making-{os.getpid()}")
    part_uri = f"sqlite:///{part}"
    mlflow.MlflowClient(tracking_uri=part_uri).search_experiments(max_results=1)  # tables and all
    _close_engine(part_uri)
    os.replace(part, db)


def _close_engine(uri: str) -> None:
    """Close the connections MLflow keeps open to `uri` (its engine cache is not public API:
    if it moves, the connections stay open to a file no one writes, which is harmless)."""
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        engine = SqlAlchemyStore._engine_map.pop(uri, None)
    except (ImportError, AttributeError):
        return
    if engine is not None:
        engine.dispose()
