"""`reproduce sync RUN_DIR`: what a job could not send (its unsent-metrics.json), sent later."""

from __future__ import annotations

import os
from pathlib import Path

from reproduce.errors import Refused, command
from reproduce.tracking.sender import UNSENT, UnsentRefused, read_unsent
from reproduce.tracking.store import check_readable, log_metric_batches


class SyncRefused(Refused, ValueError):
    """`reproduce sync` cannot send a run directory's metrics: the tracking store lacks their run."""


def sync(run_dir: Path) -> int:
    """`reproduce sync RUN_DIR`: send what a job could not (unsent-metrics.json) and set the
    run's final status. Safe to repeat: the file is removed only after success."""
    import mlflow
    from mlflow.entities import Metric, RunStatus
    from mlflow.exceptions import MlflowException

    path = Path(run_dir) / UNSENT
    if not path.exists():
        print(f"nothing to send: {path} does not exist")
        return 0
    record = read_unsent(path)  # UnsentRefused in one line when damaged
    if record["status"] not in [RunStatus.to_string(s) for s in RunStatus.all_status()]:
        raise UnsentRefused(f"{path} is damaged (status {record['status']!r} is not an MLflow run status)")
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", record["tracking_uri"]))
    uri = check_readable()  # a server that does not answer, or no store at all: one line, nothing created
    client = mlflow.MlflowClient()
    try:
        client.get_run(record["run_id"])
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise SyncRefused(
            f"the tracking store {uri} does not hold MLflow run {record['run_id']} of {path}; set "
            f"MLFLOW_TRACKING_URI to the store the run began in (the file names {record['tracking_uri']})"
        ) from None
    metrics = [Metric(k, v, ts, step) for k, v, ts, step in record["metrics"]]
    log_metric_batches(client, record["run_id"], metrics)
    client.set_terminated(record["run_id"], status=record["status"])
    path.unlink()
    print(f"sent {len(metrics)} metrics to run {record['run_id']} and marked it {record['status']}")
    return 0


@command
def sync_main(argv: list[str] | None = None) -> int:
    """`reproduce sync RUN_DIR`."""
    import sys

    argv = list(argv or [])
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: reproduce sync RUN_DIR", file=sys.stderr)
        return 2
    return sync(Path(argv[0]))  # TrackingUnreachable, NoTrackingStore, UnsentRefused, SyncRefused: one line, exit 2
