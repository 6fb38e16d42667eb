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
"""
from __future__ import annotations

import json
import logging
import os
import platform
import socket
import subprocess
from pathlib import Path

import torch

from reproduce.config import Config
from reproduce.distributed import DistInfo

log = logging.getLogger("reproduce.tracking")
REPO = Path(__file__).resolve().parent.parent


def git_state() -> tuple[str, bool]:
    """(commit, dirty) of the checkout this code runs from; ("unknown", False) outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout
        return commit, bool(status.strip())
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


class Tracker:
    """MLflow for rank 0; every method is a no-op on other ranks."""

    def __init__(self, info: DistInfo):
        self.active = info.is_main
        self.info = info
        self.run_id: str | None = None

    def start(self, cfg: Config, data_fingerprint: str, data_description: str, resume_run_id: str | None) -> str | None:
        if not self.active:
            return None
        import mlflow

        commit, dirty = git_state()
        tags = {
            "reproduce.model": cfg.model.name,
            "reproduce.study": cfg.data.dataset,
            "reproduce.recipe": cfg.recipe_hash(),
            "reproduce.seed": str(cfg.seed),
            "reproduce.git_commit": commit,
            "reproduce.git_dirty": str(dirty).lower(),
            "reproduce.torch": torch.__version__,
            "reproduce.cuda": str(torch.version.cuda),
            "reproduce.host": socket.gethostname(),
            "reproduce.platform": platform.platform(),
            "reproduce.gpu": torch.cuda.get_device_name() if self.info.device.type == "cuda" else "none",
            "reproduce.world_size": str(self.info.world_size),
            "reproduce.launcher": self.info.launcher,
            "reproduce.slurm_job_id": self.info.slurm_job_id or "",
            "reproduce.slurm_array_task": os.environ.get("SLURM_ARRAY_TASK_ID", ""),
            "reproduce.data_fingerprint": data_fingerprint,
            "reproduce.data": data_description,
            "reproduce.eval_protocol": cfg.eval.protocol.value,
            "reproduce.run_dir": str(cfg.run_dir().resolve()),
        }
        mlflow.set_experiment(cfg.experiment)
        system = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").lower() != "false"
        if resume_run_id:
            run = mlflow.start_run(run_id=resume_run_id, log_system_metrics=system)
            # The tags of the first segment stay; each resumed segment adds where and from what it ran.
            old = run.data.tags
            segments = int(old.get("reproduce.resumes", "0")) + 1
            mlflow.set_tags({"reproduce.resumes": str(segments),
                             f"reproduce.resume{segments}": f"{commit}{'+dirty' if dirty else ''} on {tags['reproduce.host']} "
                             f"({tags['reproduce.launcher']}, world size {self.info.world_size})"})
            if commit != old.get("reproduce.git_commit") or dirty:
                mlflow.set_tag("reproduce.mixed_commits", "true")
        else:
            run = mlflow.start_run(run_name=f"{cfg.model.name}-s{cfg.seed}", tags=tags, log_system_metrics=system)
            mlflow.log_params(cfg.flat())
            mlflow.log_text(cfg.to_yaml(), "config.yaml")
        self.run_id = run.info.run_id
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.active and self.run_id:
            import mlflow

            # Asynchronous: the training loop never waits on the tracking store.
            mlflow.log_metrics(metrics, step=step, synchronous=False)

    def log_final(self, metrics: dict[str, float]) -> None:
        if self.active and self.run_id:
            import mlflow

            mlflow.log_text(json.dumps(metrics, indent=2, sort_keys=True), "final_metrics.json")

    def end(self, status: str) -> None:
        """status: FINISHED, FAILED or KILLED."""
        if self.active and self.run_id:
            import mlflow

            try:
                mlflow.flush_async_logging()
            finally:
                mlflow.end_run(status=status)
            self.run_id = None
