"""The finished network as an MLflow model of the active run (run.log_model), and a registered
version when run.register_model names one. `reproduce.weights` is what reads it back."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from reproduce.config import Config
from reproduce.tracking.store import short_error

log = logging.getLogger("reproduce.tracking")


def log_network(model: torch.nn.Module, cfg: Config, num_classes: int, run_dir: Path) -> None:
    """The network as the MLflow model `model` of the active run, with the metadata that says
    what it is. A failure is a warning: the checkpoints in `run_dir` hold the weights."""
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
            short_error(err),
            run_dir,
        )
