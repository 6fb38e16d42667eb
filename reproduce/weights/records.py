"""Weights (a state_dict with the architecture it was made for) and RawWeights (a source read once,
its architecture not yet resolved)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from reproduce.models import Arch, Shortcut, Variant, build_model
from reproduce.weights.tensors import WeightsError, check_same, classes_of, resolve_arch


@dataclass(frozen=True)
class Weights:
    state_dict: dict[str, torch.Tensor]
    arch: Arch
    num_classes: int
    format: str  # checkpoint / torchvision-named / state_dict / public-cifar / exported
    source: str  # the file read
    sha256: str  # of the file read
    extra: dict = field(default_factory=dict)  # e.g. best_prec1 of a public CIFAR checkpoint
    normalize: str | None = None  # the data.normalize the network was trained with, where the source says
    program: torch.nn.Module | None = None  # an exported network (weights/export.py): used as it is

    def build(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The network of `arch` with these weights, loaded strictly (an exported one: its program)."""
        if self.program is not None:
            return self.program.to(device)
        model = build_model(self.arch.name, self.arch.shortcut, self.arch.variant, num_classes=self.num_classes)
        check_fits(model.state_dict(), self.state_dict, self.source)
        model.load_state_dict(self.state_dict, strict=True)
        return model.to(device)


@dataclass(frozen=True)
class RawWeights:
    """A source of weights read once (each file read and hashed once): its tensors and what the
    source itself says. `resolve` adds the architecture that the tensors, the source and the
    user's options agree on, giving the Weights that are used."""

    state_dict: dict[str, torch.Tensor]
    format: str
    source: str  # the file read (of a run directory: the checkpoint picked in it)
    given: str  # the source as named in messages; read_weights(given) reads the same weights again
    sha256: str
    extra: dict = field(default_factory=dict)
    normalize: str | None = None
    stored: Arch | None = None  # the architecture the source records (the suite's checkpoints and MLflow models)
    residual_hint: bool = False  # the format says option-A nets are ResNets (public CIFAR-10 files, torchvision)
    variant_hint: Variant | None = None  # the bottleneck variant the format implies (torchvision: v1.5)
    program: torch.nn.Module | None = None  # an exported network (no state_dict; extra holds num_classes)

    def resolve(
        self, name: str | None = None, shortcut: Shortcut | str | None = None, variant: Variant | str | None = None
    ) -> Weights:
        """These weights with their architecture; `name`, `shortcut`, `variant` as in load_weights."""
        return self._resolved(stated(name, shortcut, variant))

    def model_name(self) -> str:
        """The registry name the source stores, else the one the tensors tell (WeightsError where
        they cannot: then the model must be named)."""
        return self.stored.name if self.stored is not None else self.resolve().arch.name

    def _resolved(self, stated: tuple) -> Weights:
        if self.stored is not None:
            check_same(self.stored, stated, self.given)
            classes = self.extra["num_classes"] if self.program is not None else classes_of(self.state_dict)
            arch = self.stored
        else:
            arch, classes = resolve_arch(self.state_dict, stated, self.given, self.residual_hint, self.variant_hint)
        if self.format == "torchvision-named":
            model_name = self.extra["weights"].partition(".")[0]
            if arch.name != model_name:
                raise WeightsError(f"{self.given} holds weights of {model_name}, but {arch} was asked for")
        return Weights(
            self.state_dict,
            arch,
            classes,
            self.format,
            self.source,
            self.sha256,
            self.extra,
            self.normalize,
            self.program,
        )


def stated(name, shortcut, variant) -> tuple:
    return (
        name,
        Shortcut(shortcut) if shortcut is not None else None,
        Variant(variant) if variant is not None else None,
    )


def check_fits(wanted: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str) -> None:
    """WeightsError naming the first tensor of `state` that the model (its state_dict `wanted`)
    lacks, wants in another shape, or wants but `state` lacks."""
    for key, tensor in state.items():
        if key not in wanted:
            raise WeightsError(f"{source}: tensor '{key}' {list(tensor.shape)} has no place in the model")
        if tuple(tensor.shape) != tuple(wanted[key].shape):
            raise WeightsError(
                f"{source}: tensor '{key}' is {list(tensor.shape)} in the file but the model wants "
                f"{list(wanted[key].shape)}"
            )
    for key, tensor in wanted.items():
        if key not in state and not key.endswith("num_batches_tracked"):  # older files lack it; BN fills it in
            raise WeightsError(f"{source}: the model's tensor '{key}' {list(tensor.shape)} is missing from the file")
