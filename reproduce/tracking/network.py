"""The finished network as an MLflow model of the active run (run.log_model), named after the run,
and a registered version when run.register_model names one. Its metadata says what it is and what
goes in: RGB pixels scaled to [0, 1], minus `reproduce.input_mean`, divided by `reproduce.input_std`
(the numbers themselves, so no code of this suite is needed to feed it raw images).
`reproduce.weights` is what reads it back."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from reproduce.config import Config
from reproduce.tracking.store import short_error

log = logging.getLogger("reproduce.tracking")
INPUT = (
    "float32 N x 3 x {size} x {size}: RGB pixels scaled to [0, 1] (uint8 / 255), minus reproduce.input_mean, "
    "divided by reproduce.input_std (both broadcast over N: 3 x 1 x 1 per channel, or for "
    "data.normalize=pixel_mean the 3 x {size} x {size} mean image of the training split)"
)


def input_normalization(cfg: Config) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mean, std) on [0, 1] pixels that the network was trained with, or None where they cannot be
    had again (synthetic input; a CIFAR-10 source this process cannot read, e.g. FFCV files)."""
    from reproduce.data.cifar import IMAGENET_MEAN, IMAGENET_STD, cifar10

    if cfg.data.synthetic:
        return None
    if cfg.data.dataset != "cifar10":  # ImageNet folders and image folders: ImageNet's channel statistics
        return torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    try:
        data = cifar10(cfg)  # the decoded copy is cached: this reads it again and recomputes the statistics
    except Exception as err:  # noqa: BLE001 (the model is still worth logging without them)
        log.warning("the logged network's metadata lacks its input statistics (%s)", short_error(err))
        return None
    return data.mean, data.std


def metadata(cfg: Config, num_classes: int, size: int) -> dict:
    from reproduce.models import MODELS

    spec = MODELS[cfg.model.name]
    shortcut = cfg.model.shortcut or spec.default_shortcut
    meta = {
        "reproduce.architecture": {
            "name": cfg.model.name,
            "shortcut": shortcut.value if shortcut else None,
            "variant": cfg.model.variant.value,
        },
        "reproduce.num_classes": num_classes,
        "reproduce.normalize": cfg.data.normalize.value,
        "reproduce.input": INPUT.format(size=size),
    }
    stats = input_normalization(cfg)
    if stats is not None:
        meta["reproduce.input_mean"], meta["reproduce.input_std"] = (t.double().tolist() for t in stats)
    return meta


def log_network(model: torch.nn.Module, cfg: Config, num_classes: int, run_dir: Path, name: str) -> str | None:
    """The network as the MLflow model `name` (the run's name) of the active run, with the metadata
    that says what it is and what goes in; its model id. A failure is a warning (None): the
    checkpoints in `run_dir` hold the weights."""
    import copy

    import mlflow.pytorch
    import numpy as np

    from reproduce.models import MODELS

    spec = MODELS[cfg.model.name]
    size = spec.input_size if spec.family == "cifar" else cfg.data.crop
    net = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).float().eval()
    try:
        # MLflow's default pt2 format: torch.export of the network in eval mode, loadable without
        # this suite's code and without unpickling code. A batch of 2 keeps the batch size free.
        info = mlflow.pytorch.log_model(
            net,
            name=name,
            input_example=np.zeros((2, 3, size, size), dtype=np.float32),
            metadata=metadata(cfg, num_classes, size),
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],  # no inference subprocess
            registered_model_name=cfg.run.register_model,
            step=cfg.schedule.iterations,
        )
    except Exception as err:
        log.warning(
            "could not log the network as an MLflow model (%s); the checkpoints in %s hold it",
            short_error(err),
            run_dir,
        )
        return None
    return info.model_id
