"""What the tensors of a state_dict tell about the network they were made for (family, depth, block
kind, where the projection shortcuts are, number of classes), and the architecture they agree on with
what the source's format and the user state. See reproduce/weights/__init__.py for the rules."""

from __future__ import annotations

import re

from reproduce.errors import Refused
from reproduce.models import MODELS, Arch, Shortcut, Variant, check_model_options
from reproduce.models.imagenet import LAYERS


class WeightsError(Refused, ValueError):
    """Weights that cannot be used as asked; the message is one line."""


def check_same(found: Arch, stated: tuple, source: str) -> None:
    """One line naming both when a stated option contradicts the weights' architecture."""
    name, shortcut, variant = stated
    if (
        (name is not None and name != found.name)
        or (shortcut is not None and shortcut != found.shortcut)
        or (variant is not None and variant != found.variant)
    ):
        asked = Arch(name or found.name, shortcut or found.shortcut, variant or found.variant)
        raise WeightsError(
            f"{source} holds weights of {found}, but {asked} was asked for; "
            "set model.name / model.shortcut / model.variant (--model) to the weights' or use other weights"
        )


def classes_of(state: dict) -> int:
    for key in ("fc.weight", "linear.weight"):
        if key in state:
            return int(state[key].shape[0])
    raise WeightsError("the state_dict has no classifier (fc.weight or linear.weight)")


def _blocks(state: dict, layers: int) -> list[int]:
    counts = []
    for i in range(1, layers + 1):
        found = {int(m.group(1)) for k in state if (m := re.match(rf"layer{i}\.(\d+)\.", k))}
        counts.append(max(found) + 1 if found else 0)
    return counts


def _recognise(state: dict, source: str) -> tuple[str, int, bool, str]:
    """(family, depth, bottleneck, projections: "none" / "B" / "C") from the tensors."""
    if "fc.weight" in state and "layer4.0.conv1.weight" in state:
        family, bottleneck, counts = "imagenet", "layer1.0.conv3.weight" in state, _blocks(state, 4)
        depths = [d for d, (block, layers) in LAYERS.items() if layers == counts and (d >= 50) == bottleneck]
        if not depths:
            raise WeightsError(
                f"{source}: an ImageNet ResNet with {counts} blocks per stage is not one of depths {sorted(LAYERS)}"
            )
        depth, key = depths[0], "downsample"
    elif "linear.weight" in state and "layer3.0.conv1.weight" in state:
        family, bottleneck, counts = "cifar", False, _blocks(state, 3)
        if len(set(counts)) != 1:
            raise WeightsError(f"{source}: a CIFAR ResNet needs equal stages, found {counts} blocks")
        depth, key = 6 * counts[0] + 2, "shortcut"
    else:
        raise WeightsError(
            f"{source}: not a ResNet state_dict this suite knows (no fc/linear with layer1..4 or "
            "layer1..3); give torchvision-style or the suite's CIFAR key names"
        )
    with_proj = {(i, j) for i, n in enumerate(counts, 1) for j in range(n) if f"layer{i}.{j}.{key}.0.weight" in state}
    changing = {(i, 0) for i in range(1, len(counts) + 1) if i > 1 or bottleneck}
    everywhere = {(i, j) for i, n in enumerate(counts, 1) for j in range(n)}
    projections = {frozenset(): "none", frozenset(changing): "B", frozenset(everywhere): "C"}.get(frozenset(with_proj))
    if projections is None:
        raise WeightsError(
            f"{source}: projection shortcuts on blocks {sorted(with_proj)} match none of options A, B, C"
        )
    return family, depth, bottleneck, projections


def resolve_arch(
    state: dict, stated: tuple, source: str, residual_hint: bool, variant_hint: Variant | None
) -> tuple[Arch, int]:
    family, depth, bottleneck, projections = _recognise(state, source)
    name, shortcut, variant = stated
    tensors = f"{'CIFAR' if family == 'cifar' else 'ImageNet'} {'bottleneck' if bottleneck else 'basic-block'} net of depth {depth}"
    if name is None:
        if projections == "none" and not residual_hint:
            raise WeightsError(
                f"{source}: the {tensors} without projection tensors is resnet{depth} with option A "
                f"or plain{depth}; name the model (--model resnet{depth} or plain{depth})"
            )
        name = f"resnet{depth}"
    spec = MODELS.get(name)
    if spec is None or spec.family != family or spec.depth != depth:
        raise WeightsError(
            f"{source} holds the {tensors}, but the model asked for is {name}; use "
            f"resnet{depth}" + (f" or plain{depth}" if projections == "none" else "")
        )
    if not spec.residual:
        found_shortcut = None
        if residual_hint:
            raise WeightsError(
                f"{source} holds ResNet weights (its format says so), but {name} is a plain net; use resnet{depth}"
            )
        if projections != "none":
            raise WeightsError(
                f"{source} holds projection shortcuts (option {projections}), but {name} is a plain net; "
                f"use resnet{depth}"
            )
    else:
        found_shortcut = Shortcut.A if projections == "none" else Shortcut(projections)
    if bottleneck:
        if variant_hint is None and variant is None:
            raise WeightsError(
                f"{source}: a bottleneck state_dict does not tell v1 from v1.5 (same tensors, the stride "
                "moves); state model.variant=v1 (the paper's) or v1.5 (torchvision's)"
            )
        found_variant = variant_hint or variant
    else:
        found_variant = Variant.V1
    arch = Arch(name, found_shortcut, found_variant)
    check_same(arch, (None, shortcut, variant), source)
    try:
        check_model_options(arch.name, arch.shortcut, arch.variant)
    except ValueError as err:
        raise WeightsError(f"{source}: {err}") from None
    return arch, classes_of(state)
