"""model.init: a model's starting weights from another run or file (transfer), the classifier replaced
where the classes differ or model.init_classifier is false."""

from __future__ import annotations

import torch

from reproduce.models import Arch
from reproduce.weights.records import check_fits
from reproduce.weights.sources import load_weights
from reproduce.weights.tensors import WeightsError

CLASSIFIERS = ("fc.", "linear.")


def initialise(model: torch.nn.Module, model_cfg, num_classes: int) -> set[str]:
    """Load `model_cfg.init` into `model` (built from model_cfg for `num_classes`): the weights must
    be of the same architecture; their classifier is dropped (the model's new one kept) when
    the number of classes differs or model.init_classifier is false. Returns the names of the
    parameters taken from the file."""
    import logging

    want = Arch.of(model_cfg.name, model_cfg.shortcut, model_cfg.variant)
    weights = load_weights(model_cfg.init, model_cfg.name, model_cfg.shortcut, model_cfg.variant)
    if weights.arch != want:
        raise WeightsError(
            f"model.init {model_cfg.init} holds weights of {weights.arch}, but the model is {want}; "
            "set model.shortcut / model.variant to the weights'"
        )
    state = dict(weights.state_dict)
    if weights.num_classes != num_classes or not model_cfg.init_classifier:
        state = {k: v for k, v in state.items() if not k.startswith(CLASSIFIERS)}
        why = (
            f"{weights.num_classes} -> {num_classes} classes"
            if weights.num_classes != num_classes
            else "model.init_classifier=false"
        )
        logging.getLogger("reproduce.weights").info(
            "model.init %s: classifier replaced (%s), newly initialised", model_cfg.init, why
        )
    wanted = {k: v for k, v in model.state_dict().items() if k in state or not k.startswith(CLASSIFIERS)}
    check_fits(wanted, state, str(model_cfg.init))  # the model minus a replaced classifier
    model.load_state_dict(state, strict=False)
    return {name for name, _ in model.named_parameters() if name in state}
