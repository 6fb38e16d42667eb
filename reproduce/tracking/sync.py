"""`reproduce sync RUN_DIR`: what a job could not send (its unsent-metrics.json), sent later."""

from __future__ import annotations

import json
import os
from pathlib import Path

from reproduce.tracking.sender import UNSENT
from reproduce.tracking.store import TrackingUnreachable, check_reachable, log_metric_batches


def sync(run_dir: Path) -> int:
    """`reproduce sync RUN_DIR`: send what a job could not (unsent-metrics.json) and set the
    run's final status. Safe to repeat: the file is removed only after success."""
    import mlflow
    from mlflow.entities import Metric

    path = Path(run_dir) / UNSENT
    if not path.exists():
        print(f"nothing to send: {path} does not exist")
        return 0
    record = json.loads(path.read_text())
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", record["tracking_uri"]))
    check_reachable()
    client = mlflow.MlflowClient()
    metrics = [Metric(k, v, ts, step) for k, v, ts, step in record["metrics"]]
    log_metric_batches(client, record["run_id"], metrics)
    client.set_terminated(record["run_id"], status=record["status"])
    path.unlink()
    print(f"sent {len(metrics)} metrics to run {record['run_id']} and marked it {record['status']}")
    return 0


def sync_main(argv: list[str] | None = None) -> int:
    """`reproduce sync RUN_DIR`."""
    import sys

    argv = list(argv or [])
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: reproduce sync RUN_DIR", file=sys.stderr)
        return 2
    try:
        return sync(Path(argv[0]))
    except TrackingUnreachable as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
