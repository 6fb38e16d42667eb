"""The one place that talks to MLflow.

Rank 0 creates (or, on resume, reopens) one run per job and logs to it; other ranks get
the run id from rank 0 and log nothing. With MLFLOW_TRACKING_URI unset MLflow uses its own
local default (an sqlite file in the working directory), so no server is needed.

What a run holds (the report reads these names):
  params   the config keys that describe the run, flattened (`optim.lr`, `model.name`, ...),
           plus model.depth, model.family (plain / resnet), model.block (basic / bottleneck) and
           model.shortcut as resolved (A/B/C, or none for a plain net); keys that do not apply to
           the dataset or loader, and plumbing, are only in the config.yaml artifact (run_params)
  MLflow's own fields: mlflow.source.git.commit, the run description (mlflow.note.content: the
           command, recipe, data and what each metric means), the dataset as an input (name,
           digest = our fingerprint, source), the experiment's description
  tags     reproduce.model / study / recipe / seed / git_commit / git_dirty / torch /
           cuda / host / gpu / world_size / launcher / slurm_job_id / data_fingerprint /
           data / eval_protocol / run_dir (of the first segment; a resumed run adds
           reproduce.resumes, reproduce.resume<N>, and reproduce.mixed_commits when the code changed)
  metrics  by iteration: train_loss, train_top1_err (%), lr, images_per_sec, checkpoint_iteration;
           by evaluation: val_top1_err, val_top5_err, val_loss, test_top1_err, test_top5_err
           (CIFAR: the test split is evaluated with the validation split, for Fig. 6;
           the last value, at step = iterations, is the final result under eval.protocol)
  artifacts config.yaml, final_metrics.json, and for a finished run the network as an MLflow
           model (`model`, mlflow.pytorch.load_model("runs:/<id>/model"); run.log_model)
  system/* MLflow's system metrics (run.system_metrics: on for CUDA jobs by default); the UI
           charts them under "System metrics", apart from the model metrics

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
import re
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
        client.log_batch(run_id, metrics=metrics[first : first + BATCH_LIMIT])


# ---------------------------------------------------------------------------- what a run says
# Keys left out of a run's params (they stay in its config.yaml artifact): the ImageNet input
# pipeline for CIFAR networks, and plumbing that changes neither the network nor its numbers.
IMAGENET_INPUT = ("data.scale", "data.crop", "data.lighting", "data.train_crop")
PLUMBING = (
    "run.dir",
    "run.progress",
    "run.tracking_flush_s",
    "run.collective_timeout_s",
    "run.system_metrics",
    "run.log_model",
    "run.register_model",
    "run.keep_checkpoints",
)
METRICS_MEANING = [
    ("train_loss", "cross-entropy on the training batches of the last run.log_every iterations (augmented images)"),
    ("train_top1_err", "% of those training images misclassified: the paper's dashed curves"),
    ("val_top1_err / val_top5_err", "% top-1 / top-5 error on the held-out validation split"),
    (
        "test_top1_err / test_top5_err",
        "% error on the test split (CIFAR-10 test set, ImageNet val); the paper's "
        "bold curves and tables; the value at step = schedule.iterations is the final result under the protocol",
    ),
    ("val_loss / test_loss", "mean cross-entropy on that split"),
    ("lr", "the learning rate of the step"),
    ("images_per_sec", "training images per second, all processes together, evaluation time excluded"),
    ("epoch", "passes over the training split so far"),
    ("checkpoint_iteration", "the iteration of the latest checkpoint in the run directory: where a resume starts"),
]


def run_params(cfg: Config) -> dict:
    """What a run's params are: the keys that describe it, with depth, family, block and the
    resolved shortcut spelled out (a plain net's is `none`, not a missing value)."""
    from reproduce.models import MODELS

    spec = MODELS[cfg.model.name]
    drop = set(PLUMBING)
    if spec.family == "cifar":
        drop.update(IMAGENET_INPUT)
    if cfg.data.loader == "gpu" or cfg.data.synthetic:
        drop.add("data.workers")  # no worker processes or threads there
    if cfg.data.synthetic:
        drop.add("data.path")
    if cfg.model.init is None:
        drop.update(("optim.pretrained_lr_scale", "model.init_classifier"))
    if not cfg.schedule.warmup_iterations:
        drop.update(("schedule.warmup_iterations", "schedule.warmup_lr"))
    params = {k: v for k, v in cfg.flat().items() if k not in drop and v is not None}
    shortcut = cfg.model.shortcut or spec.default_shortcut
    params.update(
        {
            "model.shortcut": shortcut.value if shortcut else "none",
            "model.depth": spec.depth,
            "model.family": "resnet" if spec.residual else "plain",
            "model.block": "bottleneck" if spec.bottleneck else "basic",
        }
    )
    return params


def describe_run(cfg: Config, data_description: str, data_fingerprint: str) -> str:
    """The run's description (Markdown, shown on its page in the MLflow UI)."""
    import shlex
    import sys

    from reproduce.models import MODELS

    spec, o, sch = MODELS[cfg.model.name], cfg.optim, cfg.schedule
    shortcut = cfg.model.shortcut or spec.default_shortcut
    net = (
        f"{'ResNet' if spec.residual else 'plain net'} of {spec.depth} layers, "
        f"{'bottleneck' if spec.bottleneck else 'basic'} blocks, "
        + (f"shortcut option {shortcut.value}" if shortcut else "no shortcuts")
    )
    drops = (
        f"lr divided by {1 / sch.gamma:g} at {', '.join(map(str, sch.milestones))}" if sch.milestones else "constant lr"
    )
    warm = f", warm-up at {sch.warmup_lr:g} for {sch.warmup_iterations} iterations" if sch.warmup_iterations else ""
    lines = [
        f"**{cfg.model.name}** ({net}), seed {cfg.seed}.",
        "",
        f"- command: `{shlex.join(['reproduce' if Path(sys.argv[0]).name == 'reproduce' else sys.argv[0], *sys.argv[1:]])}`",
        f"- recipe `{cfg.recipe_hash()}`: SGD momentum {o.momentum:g}{' (Nesterov)' if o.nesterov else ''}, global batch "
        f"{o.batch_size}, lr {o.lr:g}, {drops}{warm}, weight decay {o.weight_decay:g}, {sch.iterations} iterations",
        f"- data: {data_description} (fingerprint {data_fingerprint})",
        f"- final protocol: {cfg.eval.protocol.value}; evaluated every {cfg.eval.every} iterations",
        "",
        "Metrics (step = iteration):",
    ]
    lines += [f"- `{key}`: {meaning}" for key, meaning in METRICS_MEANING]
    lines += ["", "The full resolved config is the artifact config.yaml."]
    return "\n".join(lines)


EXPERIMENT_DESCRIPTION = (
    "Runs of the ResNet reproduction suite (He et al., Deep Residual Learning for Image Recognition, CVPR 2016). "
    "The training runs are under *Model training*: show the columns model.depth, model.family and the metrics "
    "test_top1_err / train_top1_err, group by model.name, and select runs to compare. Runs tagged "
    "reproduce.kind = evaluation score given weights; the run tagged reproduce.kind = report holds the tables "
    "and figures of `reproduce report`, the paper's numbers beside ours."
)


def describe_experiment(experiment) -> None:
    """The experiment's description, and MLflow's tag for its kind (model development, not
    GenAI). A user's own values are kept. (MLflow 3.17's UI opens on its GenAI view whatever the
    tag says: its GenAI / Model training switch is a setting of the browser; the README says so.)"""
    import mlflow

    client = mlflow.MlflowClient()
    for key, value in (
        ("mlflow.note.content", EXPERIMENT_DESCRIPTION),
        ("mlflow.experimentKind", "custom_model_development"),
    ):
        if key not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, key, value)


def _log_dataset(cfg: Config, data_description: str, data_fingerprint: str) -> None:
    """The data as an MLflow input, so the runs table's Dataset column names it."""
    import warnings

    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    if cfg.data.synthetic:
        source = HTTPDatasetSource(f"synthetic://{cfg.data.dataset}")
    elif cfg.data.path is not None:
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": all of them a local file
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(Path(cfg.data.path).resolve()))
    else:  # CIFAR-10 downloaded by torchvision
        source = HTTPDatasetSource("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz")
    name = cfg.data.dataset + ("-synthetic" if cfg.data.synthetic else "")
    mlflow.log_input(MetaDataset(source, name=name, digest=data_fingerprint[:36]), context="training")


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
    raise TrackingUnreachable(
        f"MLflow tracking server {uri} is unreachable ({reason}); start it, fix "
        "MLFLOW_TRACKING_URI, or unset it to log to ./mlflow.db"
    )


class ResumeRefused(ValueError):
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

    def start(
        self, cfg: Config, data_fingerprint: str, data_description: str, resume_run_id: str | None, git: GitState
    ) -> str | None:
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
        describe_experiment(mlflow.set_experiment(cfg.experiment))
        system = self._system_metrics(cfg)
        if resume_run_id:
            run = mlflow.start_run(run_id=resume_run_id, log_system_metrics=system)
            # The tags of the first segment stay; each resumed segment adds where and from what it ran.
            old = run.data.tags
            segments = int(old.get("reproduce.resumes", "0")) + 1
            job = f", SLURM job {self.info.slurm_job_id}" if self.info.slurm_job_id else ""
            mlflow.set_tags(
                {
                    "reproduce.resumes": str(segments),
                    f"reproduce.resume{segments}": f"{commit}{'+dirty' if dirty else ''} on {tags['reproduce.host']} "
                    f"({tags['reproduce.launcher']}, world size {self.info.world_size}{job})",
                }
            )
            if self.info.slurm_job_id:  # every job that worked on the run: first, requeued, resubmitted
                jobs = [
                    j for j in old.get("reproduce.slurm_job_ids", old.get("reproduce.slurm_job_id", "")).split(",") if j
                ]
                if self.info.slurm_job_id not in jobs:
                    mlflow.set_tag("reproduce.slurm_job_ids", ",".join(jobs + [self.info.slurm_job_id]))
            if commit != old.get("reproduce.git_commit") or dirty:
                mlflow.set_tag("reproduce.mixed_commits", "true")
            client = mlflow.MlflowClient()
            for key in run.data.metrics:  # steps logged after the checkpoint by the stopped segment
                self._logged_upto[key] = max(m.step for m in client.get_metric_history(run.info.run_id, key))
        else:
            tags.update(
                {
                    "mlflow.source.git.commit": commit,
                    "mlflow.source.name": "reproduce train",
                    "mlflow.note.content": describe_run(cfg, data_description, data_fingerprint),
                }
            )
            run = mlflow.start_run(run_name=f"{cfg.model.name}-s{cfg.seed}", tags=tags, log_system_metrics=system)
            mlflow.log_params(run_params(cfg))
            mlflow.log_text(cfg.to_yaml(), "config.yaml")
            _log_dataset(cfg, data_description, data_fingerprint)
        self.run_id = run.info.run_id
        self._sender = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
        self._sender.start()
        return self.run_id

    def _system_metrics(self, cfg: Config) -> bool:
        """run.system_metrics: true/false as given; auto = MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING
        where set, else on for a CUDA job (on the CPU they cost a core's share and say little)."""
        if cfg.run.system_metrics != "auto":
            return bool(cfg.run.system_metrics)
        env = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING")
        if env is not None:
            return env.lower() not in ("false", "0", "")
        return self.info.device.type == "cuda"

    def log_model(self, model: torch.nn.Module, cfg: Config, num_classes: int) -> None:
        """The finished network as an MLflow model named `model` (and a registered version when
        run.register_model names one). A failure is a warning: the checkpoints hold the weights."""
        if not (self.active and self.run_id and cfg.run.log_model):
            return
        import copy

        import mlflow.pytorch
        import numpy as np

        from reproduce.models import MODELS

        spec = MODELS[cfg.model.name]
        size = spec.input_size if spec.family == "cifar" else cfg.data.crop
        net = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).float().eval()
        shortcut = cfg.model.shortcut or spec.default_shortcut
        metadata = {
            "reproduce.architecture": {
                "name": cfg.model.name,
                "shortcut": shortcut.value if shortcut else None,
                "variant": cfg.model.variant.value,
            },
            "reproduce.num_classes": num_classes,
            "reproduce.normalize": cfg.data.normalize.value,
            "reproduce.input": f"float32 N x 3 x {size} x {size}, normalised as data.normalize={cfg.data.normalize.value}",
        }
        try:
            # MLflow's default pt2 format: torch.export of the network in eval mode, loadable without
            # this suite's code and without unpickling code. A batch of 2 keeps the batch size free.
            mlflow.pytorch.log_model(
                net,
                name="model",
                input_example=np.zeros((2, 3, size, size), dtype=np.float32),
                metadata=metadata,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],  # no inference subprocess
                registered_model_name=cfg.run.register_model,
            )
        except Exception as err:
            log.warning(
                "could not log the network as an MLflow model (%s); the checkpoints in %s hold it",
                _short(err),
                self.run_dir,
            )

    def log_numerics(self, numerics) -> None:
        """What run.amp / run.channels_last were in effect (`auto` decided), as tags."""
        if not (self.active and self.run_id):
            return
        import mlflow

        mlflow.set_tags(
            {
                "reproduce.amp": str(numerics.amp).lower(),
                "reproduce.channels_last": str(numerics.channels_last).lower(),
                "reproduce.numerics": numerics.how,
            }
        )

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


def log_report(experiment: str, study: str, folder: Path, files: list[str], command: str, git: GitState) -> str:
    """The report's tables and figures as artifacts of one run per study in `experiment`
    (tag reproduce.kind=report, named report-<study>), so the UI shows the paper beside the
    reproduction; a later report replaces its files. Returns the run id."""
    import mlflow

    check_reachable()
    prepare_store()
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment) or client.get_experiment(client.create_experiment(experiment))
    describe_experiment(exp)
    found = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`reproduce.kind` = 'report' and tags.`reproduce.report_of` = '{study}'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    table = (folder / "table.md").read_text() if (folder / "table.md").exists() else ""
    table = re.sub(r"!\[([^\]]*)\]\([^)]*\)", r"\1 (an artifact of this run)", table)  # the note cannot show files
    note = (
        f"The report of `{command}` ({study}; commit {git}): the paper's numbers beside ours, figures as "
        f"artifacts ({', '.join(files)}).\n\n" + table
    )
    tags = {
        "reproduce.kind": "report",
        "reproduce.report_of": study,
        "reproduce.git_commit": git.commit,
        "reproduce.git_dirty": str(git.dirty).lower(),
        "mlflow.source.git.commit": git.commit,
        "reproduce.command": command[:5000],
        "mlflow.note.content": note[:60000],
    }
    run = (
        client.get_run(found[0].info.run_id)
        if found
        else client.create_run(exp.experiment_id, run_name=f"report-{study}", tags=tags)
    )
    for key, value in tags.items():
        client.set_tag(run.info.run_id, key, value)
    for name in files:
        client.log_artifact(run.info.run_id, str(folder / name))
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


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
