"""The background sender: a run's metrics go to MLflow from a thread, so training never waits for
the server. While the server is away they queue and are retried every RETRY_EVERY_S; whatever is
still unsent when the job ends goes to <run dir>/unsent-metrics.json for `reproduce sync`."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from pathlib import Path

from reproduce.errors import Refused
from reproduce.io import atomic_write_json
from reproduce.tracking.store import log_metric_batches, short_error

log = logging.getLogger("reproduce.tracking")
UNSENT = "unsent-metrics.json"
RETRY_EVERY_S = 5.0


class UnsentRefused(Refused, ValueError):
    """A run directory's unsent-metrics.json is not one this module wrote; the message is one line."""


def read_unsent(path: Path) -> dict:
    """The record of <run dir>/unsent-metrics.json, checked: tracking_uri, run_id and status as text, metrics
    as [key, value, timestamp, step] rows. UnsentRefused, naming the file and the fix, when it is damaged."""
    fix = "repair it from its .tmp sibling if there is one, or move it aside (its metrics are then lost to MLflow)"
    try:
        record = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UnsentRefused(f"{path} is damaged (not JSON: {short_error(err)}); {fix}") from None
    problem = None
    if not isinstance(record, dict):
        problem = f"a JSON {type(record).__name__}, not an object"
    else:
        for key in ("tracking_uri", "run_id", "status"):
            if not isinstance(record.get(key), str) or not record[key]:
                problem = f"no {key}"
                break
        else:
            rows = record.get("metrics")
            if not isinstance(rows, list):
                problem = "no list of metrics"
            else:
                bad = next((r for r in rows if not _metric_row(r)), None)
                if bad is not None:
                    problem = f"a metric that is not [key, value, timestamp, step]: {json.dumps(bad)[:80]}"
    if problem:
        raise UnsentRefused(f"{path} is damaged ({problem}); {fix}")
    return record


def _metric_row(row) -> bool:
    return (
        isinstance(row, list)
        and len(row) == 4
        and isinstance(row[0], str)
        and isinstance(row[1], (int, float))
        and not isinstance(row[1], bool)
        and all(isinstance(x, int) and not isinstance(x, bool) for x in row[2:])
    )


class MetricSender:
    """Sends the metrics of MLflow run `run_id` from a daemon thread, started at construction."""

    def __init__(self, run_id: str, run_dir: Path, flush_timeout_s: float):
        self.run_id, self.run_dir, self.flush_timeout_s = run_id, Path(run_dir), flush_timeout_s
        self._queue: queue.Queue = queue.Queue()
        self._pending: list = []  # metrics the server has not accepted yet (sender thread only)
        self._stop = threading.Event()
        self._warned = False
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
        self._thread.start()

    def put(self, step: int, values: dict[str, float]) -> None:
        """Queue `values` at `step`, stamped now; returns at once."""
        self._queue.put((step, int(time.time() * 1000), values))

    def finish(self) -> bool:
        """Stop the thread: it sends what is queued, retrying for up to flush_timeout_s, and is
        waited for. True when the server took everything."""
        self._stop.set()
        self._thread.join(self.flush_timeout_s + RETRY_EVERY_S)
        return not self._pending and self._queue.empty()

    def _send_loop(self) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        client = MlflowClient()
        deadline = None
        while True:
            try:
                while True:
                    step, ts, values = self._queue.get(timeout=0.5 if not self._pending else 0.01)
                    self._pending += [Metric(k, v, ts, step) for k, v in values.items()]
            except queue.Empty:
                pass
            if self._pending:
                try:
                    log_metric_batches(client, self.run_id, self._pending)
                    self._pending = []
                    if self._warned:
                        log.warning("MLflow is reachable again; queued metrics sent")
                        self._warned = False
                except Exception as err:
                    if not self._warned:
                        log.warning("MLflow unreachable (%s); training goes on, metrics are queued", short_error(err))
                        self._warned = True
                    if self._stop.is_set():
                        time.sleep(1.0)  # ending: keep trying until the flush deadline
                    elif not self._stop.wait(RETRY_EVERY_S):
                        continue
            if self._stop.is_set():
                deadline = deadline or time.monotonic() + self.flush_timeout_s
                if (not self._pending and self._queue.empty()) or time.monotonic() > deadline:
                    return

    def write_unsent(self, status: str) -> None:
        """Everything the server never got, with the status the run should end with."""
        while not self._queue.empty():
            step, ts, values = self._queue.get()
            from mlflow.entities import Metric

            self._pending += [Metric(k, v, ts, step) for k, v in values.items()]
        import mlflow

        path = self.run_dir / UNSENT
        previous = []
        if path.exists():
            try:
                previous = read_unsent(path)["metrics"]
            except UnsentRefused as err:  # keep it for a person to look at; this job's metrics still get written
                aside = path.with_name(f"{path.name}.damaged-{int(time.time())}")
                path.replace(aside)
                log.warning("%s; moved aside to %s", err, aside.name)
        record = {
            "tracking_uri": mlflow.get_tracking_uri(),
            "run_id": self.run_id,
            "status": status,
            "metrics": previous + [[m.key, m.value, m.timestamp, m.step] for m in self._pending],
        }
        atomic_write_json(path, record)
        log.warning(
            "MLflow did not take %d metrics and the final status %s; they are in %s: send them with "
            "`reproduce sync %s` once the server is back",
            len(self._pending),
            status,
            path,
            self.run_dir,
        )
