"""The one place that talks to MLflow.

Rank 0 creates (or, on resume, reopens) one run per job and logs to it; other ranks get
the run id from rank 0 and log nothing. With MLFLOW_TRACKING_URI unset MLflow uses its own
local default (an sqlite file in the working directory), so no server is needed.

What a run holds (the report reads these names):
  params   the resolved config, flattened (`optim.lr`, `model.name`, ...)
  tags     reproduce.model / study / recipe / seed / git_commit / git_dirty / torch /
           cuda / host / gpu / world_size / launcher / slurm_job_id / data_fingerprint /
           data / eval_protocol / run_dir (of the first segment; a resumed run adds
           reproduce.resumes, reproduce.resume<N>, and reproduce.mixed_commits when the code changed)
  metrics  by iteration: train_loss, train_top1_err (%), lr, images_per_sec;
           by evaluation: val_top1_err, val_top5_err, val_loss, test_top1_err, test_top5_err
           (CIFAR: the test split is evaluated with the validation split, for Fig. 6;
           the last value, at step = iterations, is the final result under eval.protocol)
  artifacts config.yaml, final_metrics.json

Robustness: metrics go through a background sender that never blocks training; while
the server is away they queue and are retried, and whatever is still unsent when the job
ends is written to <run dir>/unsent-metrics.json with a one-line hint (`reproduce sync`).
A resumed run does not log again the steps its first segment already logged.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import queue
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

from reproduce.config import Config
from reproduce.distributed import DistInfo
from reproduce.io import atomic_write_json, atomic_write_text
from reproduce.provenance import GitState, device_name, host

log = logging.getLogger("reproduce.tracking")
UNSENT = "unsent-metrics.json"
RETRY_EVERY_S = 5.0
BATCH_LIMIT = 1000  # metrics per MLflow log_batch call (the server's limit)


def _http_settings() -> None:
    """Our sender retries on its own schedule; MLflow's own HTTP retries (minutes by default)
    would only make a dead server look like a hung job. Set when tracking starts, not at import;
    a user's own values win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


def log_metric_batches(client, run_id: str, metrics: list) -> None:
    """Send `metrics` (mlflow.entities.Metric) to `run_id` in batches MLflow accepts."""
    for first in range(0, len(metrics), BATCH_LIMIT):
        client.log_batch(run_id, metrics=metrics[first:first + BATCH_LIMIT])


class TrackingUnreachable(RuntimeError):
    """The configured tracking server does not answer; the message is one line."""


def check_reachable(timeout_s: float = 10.0) -> None:
    """Raise TrackingUnreachable when MLFLOW_TRACKING_URI names a server that does not answer."""
    import mlflow

    _http_settings()
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
    raise TrackingUnreachable(f"MLflow tracking server {uri} is unreachable ({reason}); start it, fix "
                              "MLFLOW_TRACKING_URI, or unset it to log to ./mlflow.db")


def prepare_store() -> None:
    """Create a local sqlite store's tables under a lock shared by every process: jobs that start
    at the same moment on a fresh store (a parallel sweep, a SLURM array) would otherwise race
    to create them, and all but one fail. Costs nothing for a server, one query for an existing store."""
    import fcntl

    import mlflow

    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        mlflow.MlflowClient().search_experiments(max_results=1)  # the store (and its tables) is made once per process


class Tracker:
    """MLflow for rank 0; every method is a no-op on other ranks."""

    def __init__(self, info: DistInfo, run_dir: Path, flush_timeout_s: float = 60.0):
        self.active = info.is_main
        self.info, self.run_dir, self.flush_timeout_s = info, Path(run_dir), flush_timeout_s
        self.run_id: str | None = None
        self._logged_upto: dict[str, int] = {}  # key -> last step the run already holds (resume)
        self._queue: queue.Queue = queue.Queue()
        self._pending: list = []  # metrics the server has not accepted yet (sender thread only)
        self._stop = threading.Event()
        self._sender: threading.Thread | None = None
        self._warned = False

    def start(self, cfg: Config, data_fingerprint: str, data_description: str, resume_run_id: str | None,
              git: GitState) -> str | None:
        if not self.active:
            return None
        import mlflow

        _http_settings()
        commit, dirty = git.commit, git.dirty
        tags = {
            "reproduce.model": cfg.model.name,
            "reproduce.study": cfg.data.dataset,
            "reproduce.recipe": cfg.recipe_hash(),
            "reproduce.seed": str(cfg.seed),
            "reproduce.git_commit": commit,
            "reproduce.git_dirty": str(dirty).lower(),
            "reproduce.torch": torch.__version__,
            "reproduce.cuda": str(torch.version.cuda),
            "reproduce.host": host(),
            "reproduce.platform": platform.platform(),
            "reproduce.gpu": device_name(self.info.device),
            "reproduce.world_size": str(self.info.world_size),
            "reproduce.launcher": self.info.launcher,
            "reproduce.slurm_job_id": self.info.slurm_job_id or "",
            "reproduce.slurm_job_ids": self.info.slurm_job_id or "",
            "reproduce.slurm_array_task": os.environ.get("SLURM_ARRAY_TASK_ID", ""),
            "reproduce.data_fingerprint": data_fingerprint,
            "reproduce.data": data_description,
            "reproduce.eval_protocol": cfg.eval.protocol.value,
            "reproduce.run_dir": str(self.run_dir.resolve()),
        }
        prepare_store()
        mlflow.set_experiment(cfg.experiment)
        system = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").lower() != "false"
        if resume_run_id:
            run = mlflow.start_run(run_id=resume_run_id, log_system_metrics=system)
            # The tags of the first segment stay; each resumed segment adds where and from what it ran.
            old = run.data.tags
            segments = int(old.get("reproduce.resumes", "0")) + 1
            job = f", SLURM job {self.info.slurm_job_id}" if self.info.slurm_job_id else ""
            mlflow.set_tags({"reproduce.resumes": str(segments),
                             f"reproduce.resume{segments}": f"{commit}{'+dirty' if dirty else ''} on {tags['reproduce.host']} "
                             f"({tags['reproduce.launcher']}, world size {self.info.world_size}{job})"})
            if self.info.slurm_job_id:  # every job that worked on the run: first, requeued, resubmitted
                jobs = [j for j in old.get("reproduce.slurm_job_ids", old.get("reproduce.slurm_job_id", "")).split(",") if j]
                if self.info.slurm_job_id not in jobs:
                    mlflow.set_tag("reproduce.slurm_job_ids", ",".join(jobs + [self.info.slurm_job_id]))
            if commit != old.get("reproduce.git_commit") or dirty:
                mlflow.set_tag("reproduce.mixed_commits", "true")
            client = mlflow.MlflowClient()
            for key in run.data.metrics:  # steps logged after the checkpoint by the stopped segment
                self._logged_upto[key] = max(m.step for m in client.get_metric_history(run.info.run_id, key))
        else:
            run = mlflow.start_run(run_name=f"{cfg.model.name}-s{cfg.seed}", tags=tags, log_system_metrics=system)
            mlflow.log_params(cfg.flat())
            mlflow.log_text(cfg.to_yaml(), "config.yaml")
        self.run_id = run.info.run_id
        self._sender = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
        self._sender.start()
        return self.run_id

    def log_numerics(self, numerics) -> None:
        """What run.amp / run.channels_last were in effect (`auto` decided), as tags."""
        if not (self.active and self.run_id):
            return
        import mlflow

        mlflow.set_tags({"reproduce.amp": str(numerics.amp).lower(), "reproduce.channels_last": str(numerics.channels_last).lower(),
                         "reproduce.numerics": numerics.how})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metrics; returns at once. Steps the run already holds are skipped: after an
        exact resume they would repeat the same values."""
        if not (self.active and self.run_id):
            return
        fresh = {k: float(v) for k, v in metrics.items() if step > self._logged_upto.get(k, -1)}
        if fresh:
            self._queue.put((step, int(time.time() * 1000), fresh))

    def log_final(self, metrics: dict[str, float]) -> None:
        if not (self.active and self.run_id):
            return
        text = json.dumps(metrics, indent=2, sort_keys=True)
        atomic_write_text(self.run_dir / "final_metrics.json", text)
        try:
            import mlflow

            mlflow.log_text(text, "final_metrics.json")
        except Exception as err:  # the server may be away; the file in the run dir stays
            log.warning("could not store final_metrics.json in MLflow (%s); it is in %s", _short(err), self.run_dir)

    def end(self, status: str) -> None:
        """status: FINISHED, FAILED or KILLED. Waits up to flush_timeout_s for queued metrics."""
        if not (self.active and self.run_id):
            return
        import mlflow

        self._stop.set()
        ended = False
        try:
            self._sender.join(self.flush_timeout_s + RETRY_EVERY_S)
            if not self._pending and self._queue.empty():
                try:
                    mlflow.end_run(status=status)
                    ended = True
                except Exception as err:
                    log.warning("could not mark the MLflow run %s (%s)", status, _short(err))
        finally:
            # Whatever interrupts the flush (a signal, an error raised in this thread), the run
            # ends with our status here: left active, MLflow's exit hook would mark it FINISHED.
            if not ended:
                self._write_unsent(status)
                try:
                    mlflow.end_run(status=status)  # stops the system-metrics thread; may fail again
                except Exception:
                    pass
            self.run_id = None

    # -- the background sender ------------------------------------------------------------
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
                        log.warning("MLflow unreachable (%s); training goes on, metrics are queued", _short(err))
                        self._warned = True
                    if self._stop.is_set():
                        time.sleep(1.0)  # ending: keep trying until the flush deadline
                    elif not self._stop.wait(RETRY_EVERY_S):
                        continue
            if self._stop.is_set():
                deadline = deadline or time.monotonic() + self.flush_timeout_s
                if (not self._pending and self._queue.empty()) or time.monotonic() > deadline:
                    return

    def _write_unsent(self, status: str) -> None:
        """Everything the server never got, with the status the run should end with."""
        while not self._queue.empty():
            step, ts, values = self._queue.get()
            from mlflow.entities import Metric

            self._pending += [Metric(k, v, ts, step) for k, v in values.items()]
        import mlflow

        path = self.run_dir / UNSENT
        previous = json.loads(path.read_text())["metrics"] if path.exists() else []
        record = {"tracking_uri": mlflow.get_tracking_uri(), "run_id": self.run_id, "status": status,
                  "metrics": previous + [[m.key, m.value, m.timestamp, m.step] for m in self._pending]}
        atomic_write_json(path, record)
        log.warning("MLflow did not take %d metrics and the final status %s; they are in %s: send them with "
                    "`reproduce sync %s` once the server is back", len(self._pending), status, path, self.run_dir)


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


def _short(err: Exception) -> str:
    return str(err).splitlines()[0][:200] if str(err) else type(err).__name__
