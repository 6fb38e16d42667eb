"""The MLflow run of one training job. Rank 0 gets a Tracker: it creates the run (or, on resume,
reopens it), logs to it through the background sender and ends it. Every other rank gets a
NullTracker, whose methods do nothing: those ranks take the run id from rank 0 and log nothing.
`tracker_for` picks the one a process needs.

A run started with REPRODUCE_PARENT_RUN_ID set (by `reproduce study` and `reproduce sweep`) is
nested under that run (MLflow's tag mlflow.parentRunId)."""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path

import torch

from reproduce.config import Config
from reproduce.distributed import DistInfo
from reproduce.io import atomic_write_text
from reproduce.provenance import GitState
from reproduce.tracking.describe import (
    DISPLAY,
    datasets,
    describe_experiment,
    describe_run,
    log_dataset,
    run_params,
    run_tags,
)
from reproduce.tracking.network import log_network
from reproduce.tracking.sender import MetricSender
from reproduce.tracking.store import http_settings, prepare_store, short_error

log = logging.getLogger("reproduce.tracking")
PARENT_ENV = "REPRODUCE_PARENT_RUN_ID"  # the run a study or sweep opened: its training runs nest under it


def display_copies(metrics: dict[str, float]) -> dict[str, float]:
    """The errors (`*_err`, %) again as errors/<name>, rounded to 4 decimals (0.0001 points, far
    below one image in 10,000) for the UI: its chart sections put a prefix before the unprefixed
    metrics, and the run page shows 71.4, not 71.39999999999999."""
    return {f"{DISPLAY}{k}": round(v, 4) for k, v in metrics.items() if k.endswith("_err")}


def _while_open(method):
    """Make `method` do nothing while no run is open: before start, and after end."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        if self.run_id is None:
            return None
        return method(self, *args, **kwargs)

    return guarded


class Tracker:
    """Rank 0's MLflow run: start opens it, the log_* methods add to it, end closes it."""

    def __init__(self, info: DistInfo, run_dir: Path, flush_timeout_s: float = 60.0):
        self.info, self.run_dir, self.flush_timeout_s = info, Path(run_dir), flush_timeout_s
        self.run_id: str | None = None
        self._logged_upto: dict[str, int] = {}  # key -> last step the run already holds (resume)
        self._sender: MetricSender | None = None
        self._final_step: int | None = None
        self._final_display: dict[str, float] = {}  # the last step's errors/*: logged with the model, linked to it
        self._datasets: tuple = ()  # (training data, test split) as MLflow datasets

    def start(
        self, cfg: Config, data_fingerprint: str, data_description: str, resume_run_id: str | None, git: GitState
    ) -> str | None:
        """Open a new run, or reopen `resume_run_id`, and start the sender; the run's id."""
        import mlflow

        http_settings()
        tags = run_tags(cfg, self.info, git, data_fingerprint, data_description, self.run_dir)
        prepare_store()
        describe_experiment(mlflow.set_experiment(cfg.experiment))
        system = self._system_metrics(cfg)
        if resume_run_id:
            run = self._reopen(resume_run_id, git, tags, system)
            self._datasets = datasets(cfg, data_description, data_fingerprint)
        else:
            run = self._open(cfg, tags, system, data_fingerprint, data_description)
        self.run_id, self._final_step = run.info.run_id, cfg.schedule.iterations
        self._sender = MetricSender(self.run_id, self.run_dir, self.flush_timeout_s)
        return self.run_id

    def _open(self, cfg: Config, tags: dict, system: bool, data_fingerprint: str, data_description: str):
        """A new run: its tags, MLflow's own fields, params, config.yaml and dataset."""
        import mlflow

        tags = {
            **tags,
            "mlflow.source.git.commit": tags["reproduce.git_commit"],
            "mlflow.source.name": "reproduce train",
            "mlflow.note.content": describe_run(cfg, data_description, data_fingerprint),
        }
        if os.environ.get(PARENT_ENV):
            tags["mlflow.parentRunId"] = os.environ[PARENT_ENV]
        run = mlflow.start_run(run_name=f"{cfg.model.name}-s{cfg.seed}", tags=tags, log_system_metrics=system)
        mlflow.log_params(run_params(cfg))
        mlflow.log_text(cfg.to_yaml(), "config.yaml")
        self._datasets = log_dataset(cfg, data_description, data_fingerprint)
        return run

    def _reopen(self, run_id: str, git: GitState, tags: dict, system: bool):
        """A resumed run. The tags of the first segment stay; each resumed segment adds where and
        from what it ran. The steps the run already holds are remembered, so none is logged twice."""
        import mlflow

        run = mlflow.start_run(run_id=run_id, log_system_metrics=system)
        old = run.data.tags
        segments = int(old.get("reproduce.resumes", "0")) + 1
        job = f", SLURM job {self.info.slurm_job_id}" if self.info.slurm_job_id else ""
        mlflow.set_tags(
            {
                "reproduce.resumes": str(segments),
                f"reproduce.resume{segments}": f"{git.commit}{'+dirty' if git.dirty else ''} on "
                f"{tags['reproduce.host']} ({tags['reproduce.launcher']}, world size {self.info.world_size}{job})",
            }
        )
        if self.info.slurm_job_id:  # every job that worked on the run: first, requeued, resubmitted
            jobs = [
                j for j in old.get("reproduce.slurm_job_ids", old.get("reproduce.slurm_job_id", "")).split(",") if j
            ]
            if self.info.slurm_job_id not in jobs:
                mlflow.set_tag("reproduce.slurm_job_ids", ",".join(jobs + [self.info.slurm_job_id]))
        if git.commit != old.get("reproduce.git_commit") or git.dirty:
            mlflow.set_tag("reproduce.mixed_commits", "true")
        if os.environ.get(PARENT_ENV) and "mlflow.parentRunId" not in old:  # begun before its study had a parent run
            mlflow.set_tag("mlflow.parentRunId", os.environ[PARENT_ENV])
        client = mlflow.MlflowClient()
        for key in run.data.metrics:  # steps logged after the checkpoint by the stopped segment
            self._logged_upto[key] = max(m.step for m in client.get_metric_history(run.info.run_id, key))
        return run

    def _system_metrics(self, cfg: Config) -> bool:
        """run.system_metrics: true/false as given; auto = MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING
        where set, else on for a CUDA job (on the CPU they cost a core's share and say little)."""
        if cfg.run.system_metrics != "auto":
            return bool(cfg.run.system_metrics)
        env = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING")
        if env is not None:
            return env.lower() not in ("false", "0", "")
        return self.info.device.type == "cuda"

    @_while_open
    def log_model(self, model: torch.nn.Module, cfg: Config, num_classes: int) -> None:
        """The finished network as an MLflow model named after the run (and a registered version
        when run.register_model names one), its final errors linked to it and to the split they
        were measured on. A failure is a warning: the checkpoints hold the weights."""
        import mlflow

        model_id = None
        if cfg.run.log_model:
            model_id = log_network(model, cfg, num_classes, self.run_dir, mlflow.active_run().info.run_name)
        final, self._final_display = self._final_display, {}
        train_data, test_data = self._datasets
        try:
            for dataset, keys in (
                (test_data, [k for k in final if "test_" in k]),
                (train_data, [k for k in final if "test_" not in k]),
            ):
                if keys:
                    mlflow.log_metrics(
                        {k: final[k] for k in keys}, step=self._final_step, model_id=model_id, dataset=dataset
                    )
        except Exception as err:  # the server may be away: they go with the others, unlinked
            log.warning("could not link the final errors to the model (%s)", short_error(err))
            self._sender.put(self._final_step, final)

    @_while_open
    def log_numerics(self, numerics) -> None:
        """What run.amp / run.channels_last were in effect (`auto` decided), as tags."""
        import mlflow

        mlflow.set_tags(
            {
                "reproduce.amp": str(numerics.amp).lower(),
                "reproduce.channels_last": str(numerics.channels_last).lower(),
                "reproduce.numerics": numerics.how,
            }
        )

    @_while_open
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metrics; returns at once. Steps the run already holds are skipped: after an
        exact resume they would repeat the same values."""
        fresh = {k: float(v) for k, v in metrics.items() if step > self._logged_upto.get(k, -1)}
        shown = display_copies(fresh)
        if step == self._final_step:  # held for log_model, which links them to the network and the data
            self._final_display.update(shown)
        else:
            fresh.update(shown)
        if fresh:
            self._sender.put(step, fresh)

    @_while_open
    def log_final(self, metrics: dict[str, float]) -> None:
        """final_metrics.json in the run directory, and as an artifact of the run."""
        text = json.dumps(metrics, indent=2, sort_keys=True)
        atomic_write_text(self.run_dir / "final_metrics.json", text)
        try:
            import mlflow

            mlflow.log_text(text, "final_metrics.json")
        except Exception as err:  # the server may be away; the file in the run dir stays
            log.warning(
                "could not store final_metrics.json in MLflow (%s); it is in %s", short_error(err), self.run_dir
            )

    @_while_open
    def end(self, status: str) -> None:
        """status: FINISHED, FAILED or KILLED. Waits up to flush_timeout_s for queued metrics."""
        import mlflow

        ended = False
        if (
            self._final_display
        ):  # the last step's errors/* that no log_model took (a failure after the final evaluation)
            self._sender.put(self._final_step, self._final_display)
            self._final_display = {}
        try:
            if self._sender.finish():
                try:
                    mlflow.end_run(status=status)
                    ended = True
                except Exception as err:
                    log.warning("could not mark the MLflow run %s (%s)", status, short_error(err))
        finally:
            # Whatever interrupts the flush (a signal, an error raised in this thread), the run
            # ends with our status here: left active, MLflow's exit hook would mark it FINISHED.
            if not ended:
                self._sender.write_unsent(status)
                try:
                    mlflow.end_run(status=status)  # stops the system-metrics thread; may fail again
                except Exception:
                    pass
            self.run_id = None


class NullTracker:
    """The tracker of every rank but 0: Tracker's methods, each doing nothing. start returns
    None: rank 0's run id reaches the other ranks by broadcast."""

    run_id: str | None = None

    def start(
        self, cfg: Config, data_fingerprint: str, data_description: str, resume_run_id: str | None, git: GitState
    ) -> str | None:
        return None

    def log_model(self, model: torch.nn.Module, cfg: Config, num_classes: int) -> None:
        pass

    def log_numerics(self, numerics) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_final(self, metrics: dict[str, float]) -> None:
        pass

    def end(self, status: str) -> None:
        pass


def tracker_for(info: DistInfo, run_dir: Path, flush_timeout_s: float = 60.0) -> Tracker | NullTracker:
    """The tracker of this process: a Tracker on rank 0, a NullTracker on the others."""
    return Tracker(info, run_dir, flush_timeout_s) if info.is_main else NullTracker()
