"""What a training run says about itself in MLflow: its params, its tags, its description (the
Markdown on its page), the dataset as an input, and the experiment's description (which
`reproduce evaluate` and `reproduce report` set too). Only `describe_experiment` and
`log_dataset` talk to MLflow; the rest is plain data."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from reproduce.config import Config
from reproduce.distributed import DistInfo
from reproduce.provenance import GitState, device_name, host

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


def run_tags(
    cfg: Config, info: DistInfo, git: GitState, data_fingerprint: str, data_description: str, run_dir: Path
) -> dict:
    """The reproduce.* tags of a run's first segment: what ran, on what code, data and machine."""
    return {
        "reproduce.kind": "train",  # what the run is (train / evaluation / report): one filter shows the training runs
        "reproduce.model": cfg.model.name,
        "reproduce.study": cfg.data.dataset,
        "reproduce.recipe": cfg.recipe_hash(),
        "reproduce.seed": str(cfg.seed),
        "reproduce.git_commit": git.commit,
        "reproduce.git_dirty": str(git.dirty).lower(),
        "reproduce.torch": torch.__version__,
        "reproduce.cuda": str(torch.version.cuda),
        "reproduce.host": host(),
        "reproduce.platform": platform.platform(),
        "reproduce.gpu": device_name(info.device),
        "reproduce.world_size": str(info.world_size),
        "reproduce.launcher": info.launcher,
        "reproduce.slurm_job_id": info.slurm_job_id or "",
        "reproduce.slurm_job_ids": info.slurm_job_id or "",
        "reproduce.slurm_array_task": os.environ.get("SLURM_ARRAY_TASK_ID", ""),
        "reproduce.data_fingerprint": data_fingerprint,
        "reproduce.data": data_description,
        "reproduce.eval_protocol": cfg.eval.protocol.value,
        "reproduce.run_dir": str(Path(run_dir).resolve()),
    }


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
    "reproduce.kind = evaluation score given weights (training runs: reproduce.kind = train); the run tagged reproduce.kind = report holds the tables "
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


def log_dataset(cfg: Config, data_description: str, data_fingerprint: str) -> None:
    """The data as an MLflow input of the active run, so the runs table's Dataset column names it."""
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
