"""Writing training runs to MLflow, and the tracking store's checks that other commands share.

Rank 0 creates (or, on resume, reopens) one run per job and logs to it; other ranks get a tracker
that does nothing and take the run id from rank 0. With MLFLOW_TRACKING_URI unset MLflow uses its
own local default (an sqlite file in the working directory), so no server is needed.

This package owns the training run and the report run. It is not the only code that uses MLflow:
`reproduce evaluate` writes its own evaluation runs (with store and describe_experiment from
here), `reproduce analyze responses` adds Fig. 7's metrics to a training run, runs/park exports
and imports runs; and the readers read it directly: report/ (runs, listing, command), runs/study,
weights (an MLflow model as weights), bench/ and doctor.

Modules, each importing only those above it:
  store     reachability (TrackingUnreachable), resume checks (ResumeRefused), the sqlite lock,
            metrics in batches the server accepts
  describe  what a run says about itself: params, tags, description, dataset, the experiment's note
  sender    the background sender and <run dir>/unsent-metrics.json
  network   the finished network as an MLflow model
  run       Tracker (rank 0), NullTracker (other ranks), tracker_for (which one a process gets)
  reports   `reproduce report`'s tables and figures as a run; the parent run of a study or sweep
            (reproduce.kind=study, found again by reproduce.study_key), its training runs nested under it
  sync      `reproduce sync RUN_DIR`

What a run holds (the report reads these names):
  params   the config keys that describe the run, flattened (`optim.lr`, `model.name`, ...),
           plus model.depth, model.family (plain / resnet), model.block (basic / bottleneck) and
           model.shortcut as resolved (A/B/C, or none for a plain net); keys that do not apply to
           the dataset or loader, and plumbing, are only in the config.yaml artifact (run_params)
  MLflow's own fields: mlflow.source.git.commit, the run description (mlflow.note.content: the
           command, recipe, data and what each metric means), the dataset as an input (name,
           digest = our fingerprint, source), the experiment's description
  tags     reproduce.kind (train) / model / study / recipe / seed / git_commit / git_dirty / torch /
           cuda / host / gpu / world_size / launcher / slurm_job_id / data_fingerprint /
           data / eval_protocol / run_dir (of the first segment; a resumed run adds
           reproduce.resumes, reproduce.resume<N>, and reproduce.mixed_commits when the code changed)
  metrics  by iteration: train_loss, train_top1_err (%), lr, images_per_sec, checkpoint_iteration;
           by evaluation: val_top1_err, val_top5_err, val_loss (with a validation split),
           test_top1_err, test_top5_err (CIFAR: the test split is evaluated with the validation
           split, for Fig. 6; the last value, at step = iterations, is the final result under
           eval.protocol); each *_err again as errors/<name>, rounded to 4 decimals, for the UI,
           the last step's linked to the logged network and the split it was measured on
  inputs   the training data (context training, digest = our fingerprint) and the test split
           (context test, tagged reproduce.images: how many images its errors were measured on)
  artifacts config.yaml, final_metrics.json
  model    for a finished run, the network as an MLflow logged model named after the run
           (`<model>-s<seed>`; mlflow.pytorch.load_model("models:/<model id>") or
           "runs:/<id>/<run name>"; run.log_model), its input statistics in its metadata
  system/* MLflow's system metrics (run.system_metrics: on for CUDA jobs by default); the UI
           charts them under "System metrics", apart from the model metrics

Robustness: metrics go through a background sender that never blocks training; while
the server is away they queue and are retried, and whatever is still unsent when the job
ends is written to <run dir>/unsent-metrics.json with a one-line hint (`reproduce sync`).
A resumed run does not log again the steps its first segment already logged.
"""

from __future__ import annotations

from reproduce.tracking.describe import (
    EXPERIMENT_DESCRIPTION,
    IMAGENET_INPUT,
    METRICS_MEANING,
    PLUMBING,
    describe_experiment,
    describe_run,
    log_dataset,
    run_params,
    run_tags,
)
from reproduce.tracking.reports import STUDY_KEY, adopt, log_report, open_parent, store
from reproduce.tracking.run import PARENT_ENV, NullTracker, Tracker, tracker_for
from reproduce.tracking.sender import RETRY_EVERY_S, UNSENT, MetricSender
from reproduce.tracking.store import (
    BATCH_LIMIT,
    ResumeRefused,
    TrackingUnreachable,
    check_reachable,
    check_resumable,
    log_metric_batches,
    prepare_store,
)
from reproduce.tracking.sync import sync_main  # not `sync` itself: that name is its module's

__all__ = [
    "BATCH_LIMIT",
    "EXPERIMENT_DESCRIPTION",
    "IMAGENET_INPUT",
    "METRICS_MEANING",
    "PARENT_ENV",
    "PLUMBING",
    "RETRY_EVERY_S",
    "STUDY_KEY",
    "UNSENT",
    "MetricSender",
    "NullTracker",
    "ResumeRefused",
    "Tracker",
    "TrackingUnreachable",
    "adopt",
    "check_reachable",
    "check_resumable",
    "describe_experiment",
    "describe_run",
    "log_dataset",
    "log_metric_batches",
    "log_report",
    "open_parent",
    "prepare_store",
    "run_params",
    "run_tags",
    "store",
    "sync_main",
    "tracker_for",
]
