"""The one model registry: every network of the paper, by name.

Entries are data (`resnet56 -> cifar family, depth 56, residual, option A`). `build_model`
is the only way the suite makes a network; `reproduce models` prints `format_model_table()`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from reproduce.errors import ArgumentParser
from reproduce.models.cifar import CifarResNet, ZeroPadShortcut, cifar_resnet
from reproduce.models.imagenet import imagenet_resnet
from reproduce.models.options import Shortcut, Variant

__all__ = [
    "MODELS",
    "Arch",
    "CifarResNet",
    "ModelSpec",
    "Shortcut",
    "Variant",
    "ZeroPadShortcut",
    "build_model",
    "check_model_options",
    "count_macs",
    "count_parameters",
    "format_model_table",
    "imagenet_resnet",
    "model_names",
    "model_table",
]

# builder(depth, residual, shortcut, variant, num_classes) -> network
Builder = Callable[[int, bool, Shortcut | None, Variant, int], nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    family: str  # "cifar" (§4.2) or "imagenet" (§3.3, Table 1)
    depth: int
    residual: bool
    default_shortcut: Shortcut | None  # None for plain nets: they have no shortcuts at all
    input_size: int  # the paper's input: 32x32 CIFAR images, 224x224 ImageNet crops
    num_classes: int
    builder: Builder

    @property
    def bottleneck(self) -> bool:
        return self.family == "imagenet" and self.depth >= 50  # Table 1: 50 layers and deeper


def _cifar(depth: int, residual: bool = True) -> ModelSpec:
    # §4.2: "we use identity shortcuts in all cases (i.e., option A)"
    return ModelSpec("cifar", depth, residual, Shortcut.A if residual else None, 32, 10, cifar_resnet)


def _imagenet(depth: int, residual: bool = True, shortcut: Shortcut = Shortcut.A) -> ModelSpec:
    return ModelSpec("imagenet", depth, residual, shortcut if residual else None, 224, 1000, imagenet_resnet)


MODELS: dict[str, ModelSpec] = {
    **{f"resnet{d}": _cifar(d) for d in (20, 32, 44, 56, 110, 1202)},
    **{f"plain{d}": _cifar(d, residual=False) for d in (20, 32, 44, 56, 110)},
    "resnet18": _imagenet(18),  # Table 2 / Fig. 4 compare plain and option-A ResNets
    "resnet34": _imagenet(34),
    "resnet50": _imagenet(50, shortcut=Shortcut.B),  # §3.3 "Deeper Bottleneck Architectures": option B
    "resnet101": _imagenet(101, shortcut=Shortcut.B),
    "resnet152": _imagenet(152, shortcut=Shortcut.B),
    "plain18": _imagenet(18, residual=False),
    "plain34": _imagenet(34, residual=False),
}


def model_names() -> list[str]:
    return list(MODELS)


def check_model_options(
    name: str, shortcut: Shortcut | str | None = None, variant: Variant | str = Variant.V1
) -> ModelSpec:
    """Raise a one-line ValueError when `name` is unknown or an option does not apply to it."""
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown model '{name}'{hint} (known: {', '.join(MODELS)})")
    spec = MODELS[name]
    try:
        shortcut = Shortcut(shortcut) if shortcut is not None else None
        variant = Variant(variant)
    except ValueError as err:
        raise ValueError(f"{err}; shortcut is one of A, B, C and variant one of v1, v1.5") from None
    if not spec.residual and shortcut is not None:
        raise ValueError(f"{name} is a plain network without shortcuts; leave the shortcut unset (null)")
    if spec.bottleneck and shortcut == Shortcut.A:
        raise ValueError(f"{name} has bottleneck blocks, where the paper uses projection shortcuts; use B or C")
    if variant == Variant.V1_5 and not spec.bottleneck:
        raise ValueError(f"variant v1.5 only moves the stride inside bottleneck blocks, which {name} has not; use v1")
    return spec


def build_model(
    name: str,
    shortcut: Shortcut | str | None = None,
    variant: Variant | str = Variant.V1,
    num_classes: int | None = None,
) -> nn.Module:
    """The network `name` of the registry; shortcut None means the paper's default for it."""
    spec = check_model_options(name, shortcut, variant)
    chosen = Shortcut(shortcut) if shortcut is not None else spec.default_shortcut
    classes = spec.num_classes if num_classes is None else num_classes
    return spec.builder(spec.depth, spec.residual, chosen, Variant(variant), classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_size: int) -> int:
    """Multiply-adds of one forward pass of one image, as the paper's Table 1 counts them
    (convolutions and the FC layer; BN, ReLU, pooling and additions are not counted).
    torch's FLOP counter counts 2 FLOPs per multiply-add, hence the halving."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device  # the meta device works too: counting needs only shapes
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            model(torch.zeros(1, 3, input_size, input_size, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def model_table() -> list[dict]:
    """One row per registered network with its default options, at the paper's input size."""
    rows = []
    for name, spec in MODELS.items():
        with torch.device("meta"):  # shapes only: no memory and no init cost, even for resnet1202
            model = build_model(name)
        rows.append(
            {
                "name": name,
                "family": spec.family,
                "depth": spec.depth,
                "residual": spec.residual,
                "shortcut": spec.default_shortcut.value if spec.default_shortcut else "-",
                "input": spec.input_size,
                "params": count_parameters(model),
                "macs": count_macs(model, spec.input_size),
            }
        )
    return rows


def format_model_table() -> str:
    header = f"{'model':<11}{'family':<10}{'depth':>6}{'shortcut':>10}{'input':>7}{'params':>10}{'mult-adds':>12}"
    lines = [header, "-" * len(header)]
    for r in model_table():
        lines.append(
            f"{r['name']:<11}{r['family']:<10}{r['depth']:>6}{r['shortcut']:>10}{r['input']:>7}"
            f"{r['params'] / 1e6:>9.2f}M{r['macs'] / 1e9:>11.3f}G"
        )
    lines.append("params in millions; mult-adds (convolutions + FC) of one image at the input size shown, in 1e9")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`reproduce models`: the registry as a table."""
    ArgumentParser(
        prog="reproduce models",
        description="every registered network: parameters and multiply-adds at the paper's input size",
    ).parse_args(argv)
    print(format_model_table())
    return 0


@dataclass(frozen=True)
class Arch:
    """The one record of what a network is (what a state_dict was made for, what a checkpoint and an
    MLflow model store as `architecture`): a registry name, the shortcut option as resolved (None
    for plain nets), the bottleneck variant."""

    name: str
    shortcut: Shortcut | None
    variant: Variant = Variant.V1

    def __str__(self) -> str:
        shortcut = f"shortcut {self.shortcut.value}" if self.shortcut else "no shortcuts"
        return f"{self.name} ({shortcut}, {self.variant.value})"

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "shortcut": self.shortcut.value if self.shortcut else None,
            "variant": self.variant.value,
        }

    @classmethod
    def from_dict(cls, stored: dict) -> "Arch":
        """The architecture as the suite stores it (as_dict's form): a checkpoint's `architecture`
        (checkpoint.architecture), an MLflow model's `reproduce.architecture` metadata."""
        shortcut = stored["shortcut"]
        return cls(stored["name"], Shortcut(shortcut) if shortcut else None, Variant(stored["variant"]))

    @classmethod
    def of(cls, name: str, shortcut=None, variant=Variant.V1) -> "Arch":
        """The architecture `build_model(name, shortcut, variant)` makes (shortcut None = the default)."""
        spec = check_model_options(name, shortcut, variant)
        chosen = Shortcut(shortcut) if shortcut is not None else spec.default_shortcut
        return cls(name, chosen, Variant(variant))
