"""What a training run says about itself in MLflow: its params, its tags, its description (the
Markdown on its page), the dataset as an input, and the experiment's description (which
`reproduce evaluate` and `reproduce report` set too). Only `describe_experiment` and
`log_dataset` talk to MLflow; the rest is plain data."""

from __future__ import annotations

import os
import platform
import re
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
DISPLAY = "errors/"  # the errors again, rounded, under this prefix: MLflow's UI shows that section first
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
    (
        f"{DISPLAY}*",
        "each error above again, rounded to 4 decimals: the UI's first chart section (full precision in the unprefixed names)",
    ),
    ("lr", "the learning rate of the step"),
    ("images_per_sec", "training images per second, all processes together, evaluation time excluded"),
    ("epoch", "passes over the training split so far"),
    ("checkpoint_iteration", "the iteration of the latest checkpoint in the run directory: where a resume starts"),
]


def has_val_split(cfg: Config) -> bool:
    """Whether the run evaluates a validation split (val_* metrics): ImageNet's val (center crop),
    CIFAR-10's held-out images when data.val_split > 0; an image folder has none."""
    return cfg.data.dataset == "imagenet" or (cfg.data.dataset == "cifar10" and cfg.data.val_split > 0)


def metrics_meaning(cfg: Config) -> list[tuple[str, str]]:
    """METRICS_MEANING as it applies to the run: no val_* line without a validation split."""
    if has_val_split(cfg):
        return METRICS_MEANING
    return [
        ("test_loss", meaning) if key == "val_loss / test_loss" else (key, meaning)
        for key, meaning in METRICS_MEANING
        if not key.startswith("val_top1")
    ]


def _test_split(cfg: Config, data_description: str):
    """The "<n> test" (CIFAR-10) or "<n> val" (ImageNet val, an image folder's val/ = its test
    split) of the data's description, or None."""
    return re.search(r"(\d+) test\b" if cfg.data.dataset == "cifar10" else r"(\d+) val\b", data_description)


def test_images(cfg: Config, data_description: str) -> int | None:
    """How many test images each test error was measured on (None: not known)."""
    found = _test_split(cfg, data_description)
    if found is None:
        return cfg.eval.max_images
    return int(found.group(1)) if cfg.eval.max_images is None else min(int(found.group(1)), cfg.eval.max_images)


def data_as_run(cfg: Config, data_description: str) -> str:
    """The data's description as this run used it: where eval.max_images limits the test split,
    how many of its images each error was measured on ("10000 test" would say all of them)."""
    limit, found = cfg.eval.max_images, _test_split(cfg, data_description)
    if limit is None or found is None or limit >= int(found.group(1)):
        return data_description
    n = int(found.group(1))
    stated = f"{found.group(0)} (errors measured on {limit:,} of these {n:,} images, evenly spread: eval.max_images)"
    return data_description[: found.start()] + stated + data_description[found.end() :]


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
        "reproduce.data": data_as_run(cfg, data_description),
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
        f"- data: {data_as_run(cfg, data_description)} (fingerprint {data_fingerprint})",
        f"- final protocol: {cfg.eval.protocol.value}; evaluated every {cfg.eval.every} iterations"
        + ("" if has_val_split(cfg) else "; no validation split"),
        "",
        "Metrics (step = iteration):",
    ]
    lines += [f"- `{key}`: {meaning}" for key, meaning in metrics_meaning(cfg)]
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


def datasets(cfg: Config, data_description: str, data_fingerprint: str) -> tuple:
    """(training data, test split) as MLflow datasets: the training data with our fingerprint as its
    digest (the runs table's Dataset column), the test split named <data>-test, its digest also
    saying how many of its images the errors were measured on."""
    import hashlib
    import warnings

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
    test_digest = hashlib.sha256(f"{data_fingerprint} test {cfg.eval.max_images}".encode()).hexdigest()
    return (
        MetaDataset(source, name=name, digest=data_fingerprint[:36]),
        MetaDataset(source, name=f"{name}-test", digest=test_digest[:36]),
    )


def log_dataset(cfg: Config, data_description: str, data_fingerprint: str) -> tuple:
    """The data as MLflow inputs of the active run: the training data (context training) and the
    test split (context test, tagged with the images its errors were measured on). Returns both."""
    import mlflow

    train, test = datasets(cfg, data_description, data_fingerprint)
    mlflow.log_input(train, context="training")
    images = test_images(cfg, data_description)
    mlflow.log_input(test, context="test", tags={"reproduce.images": "?" if images is None else str(images)})
    return train, test
