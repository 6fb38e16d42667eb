"""The one place that turns a weights file or name into a state_dict and the architecture it
was made for (`reproduce evaluate --weights`, `model.init`).

Accepted sources:
  RUN_DIR                          the suite's run directory: its newest intact checkpoint
  .../ckpt-NNNNNNNN.pt             one of the suite's checkpoints (sha256 checked)
  runs:/<run id>[/model], models:/<name>/<version>   a network the suite logged to MLflow
                                   (run.log_model); its architecture is in the model's metadata
  torchvision:resnet50.IMAGENET1K_V1   torchvision's named weights, read from the local torch
                                   hub cache (torch.hub.get_dir()/checkpoints); never downloaded
  any other file                   a state_dict (or a dict holding one under `state_dict`), keys
                                   optionally prefixed `module.` (DDP): torchvision-style ImageNet
                                   ResNets and the suite's / the public CIFAR-10 ResNets

The architecture (model name, shortcut option, bottleneck variant) comes from, in order:
the suite's checkpoint (it stores it); what the tensors tell (family, depth, basic or
bottleneck blocks, where the projection shortcuts are: none / where the shape changes (B) /
everywhere (C), number of classes); what the source's format says; what the user states
(`--model`, `model.shortcut`, `model.variant`). What none of them tells is refused, never
guessed:
  * v1 and v1.5 bottlenecks have identical tensors (only a stride moves), so a foreign
    bottleneck state_dict needs `model.variant` stated; torchvision's named weights are v1.5
    (torchvision's layout), and the suite's checkpoints say which they are;
  * a net without projection tensors is a ResNet with option A or a plain net: the model name
    must say which, except for the public CIFAR-10 checkpoints (`state_dict` + `best_prec1`),
    which are option-A ResNets.
A stated option that contradicts the weights is refused in one line naming both.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from reproduce import checkpoint
from reproduce.errors import Refused
from reproduce.models import MODELS, Arch, Shortcut, Variant, build_model, check_model_options
from reproduce.models.imagenet import LAYERS

TORCHVISION_PREFIX = "torchvision:"
MLFLOW_PREFIXES = ("runs:/", "models:/")


class WeightsError(Refused, ValueError):
    """Weights that cannot be used as asked; the message is one line."""


@dataclass(frozen=True)
class Weights:
    state_dict: dict[str, torch.Tensor]
    arch: Arch
    num_classes: int
    format: str  # checkpoint / torchvision-named / state_dict / public-cifar
    source: str  # the file read
    sha256: str  # of the file read
    extra: dict = field(default_factory=dict)  # e.g. best_prec1 of a public CIFAR checkpoint
    normalize: str | None = None  # the data.normalize the network was trained with, where the source says

    def build(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The network of `arch` with these weights, loaded strictly."""
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

    def resolve(
        self, name: str | None = None, shortcut: Shortcut | str | None = None, variant: Variant | str | None = None
    ) -> Weights:
        """These weights with their architecture; `name`, `shortcut`, `variant` as in load_weights."""
        return self._resolved(_stated(name, shortcut, variant))

    def model_name(self) -> str:
        """The registry name the source stores, else the one the tensors tell (WeightsError where
        they cannot: then the model must be named)."""
        return self.stored.name if self.stored is not None else self.resolve().arch.name

    def _resolved(self, stated: tuple) -> Weights:
        if self.stored is not None:
            check_same(self.stored, stated, self.given)
            arch, classes = self.stored, _classes(self.state_dict)
        else:
            arch, classes = _resolve(self.state_dict, stated, self.given, self.residual_hint, self.variant_hint)
        if self.format == "torchvision-named":
            model_name = self.extra["weights"].partition(".")[0]
            if arch.name != model_name:
                raise WeightsError(f"{self.given} holds weights of {model_name}, but {arch} was asked for")
        return Weights(
            self.state_dict, arch, classes, self.format, self.source, self.sha256, self.extra, self.normalize
        )


def load_weights(
    source: str | Path,
    name: str | None = None,
    shortcut: Shortcut | str | None = None,
    variant: Variant | str | None = None,
) -> Weights:
    """The weights of `source` and their architecture. `name`, `shortcut`, `variant` are what
    the user stated (None = not stated); they must agree with the weights. WeightsError otherwise."""
    stated = _stated(name, shortcut, variant)
    return read_weights(source)._resolved(stated)


def _stated(name, shortcut, variant) -> tuple:
    return (
        name,
        Shortcut(shortcut) if shortcut is not None else None,
        Variant(variant) if variant is not None else None,
    )


def read_weights(source: str | Path) -> RawWeights:
    """`source` read once, its architecture not yet resolved (RawWeights.resolve). Of a run
    directory, its newest intact checkpoint; a damaged newer one is named in a warning and left as
    it is (reading weights never changes the folder they are in). WeightsError in one line otherwise."""
    text = str(source)
    if text.startswith(TORCHVISION_PREFIX):
        return _torchvision_named(text)
    if text.startswith(MLFLOW_PREFIXES):
        return _mlflow_model(text)
    path = Path(text)
    if path.is_dir():
        try:
            latest = checkpoint.read_latest(path)
        except checkpoint.CheckpointError as err:
            raise WeightsError(str(err)) from None
        if latest is None:
            raise WeightsError(
                f"{path} is a folder without an intact ckpt-*.pt checkpoint; give a run directory or a weights file"
            )
        return _suite(*latest)
    if not path.is_file():
        raise WeightsError(
            f"weights {text} not found; give a run directory, a checkpoint or state_dict file, "
            "or torchvision:resnet50.IMAGENET1K_V1"
        )
    if checkpoint.NAME.match(path.name) and path.with_name(path.name + ".sha256").exists():
        try:
            return _suite(path, *checkpoint.read(path))
        except checkpoint.CheckpointError as err:
            raise WeightsError(str(err)) from None
    obj, digest = _torch_load(path)
    if isinstance(obj, dict) and {"model", "iteration", "config"} <= set(obj):
        raise WeightsError(
            f"{path} is one of the suite's checkpoints but its .sha256 file is missing or it was renamed; "
            "keep ckpt-NNNNNNNN.pt beside its .sha256 (or pass the run directory)"
        )
    public = isinstance(obj, dict) and "state_dict" in obj and "best_prec1" in obj
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} holds no state_dict of tensors (a dict name -> tensor, or one under 'state_dict')")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    extra = {"best_prec1": float(obj["best_prec1"])} if public else {}
    return RawWeights(
        state,
        "public-cifar" if public else "state_dict",
        str(path),
        str(path),
        digest,
        extra,
        normalize="imagenet" if public else None,  # the public CIFAR-10 files: ImageNet's mean and std
        residual_hint=public,  # they are option-A ResNets
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


# ---------------------------------------------------------------------------- sources
def _suite(path: Path, state: dict, digest: str) -> RawWeights:
    """One of the suite's checkpoints, already read and checked against its digest."""
    return RawWeights(
        state["model"],
        "checkpoint",
        str(path),
        str(path),
        digest,
        {"iteration": state["iteration"], "mlflow_run_id": state.get("mlflow_run_id")},
        normalize=state.get("config", {}).get("data", {}).get("normalize"),
        stored=Arch.from_dict(checkpoint.architecture_of(state)),
    )


def _torchvision_named(text: str) -> RawWeights:
    from torchvision.models import get_model_weights

    spec = text.removeprefix(TORCHVISION_PREFIX)
    model_name, _, weights_name = spec.partition(".")
    depth = re.fullmatch(r"resnet(\d+)", model_name)
    if not depth or int(depth.group(1)) not in LAYERS or not weights_name:
        raise WeightsError(
            f"{text}: give torchvision:resnet<18|34|50|101|152>.<WEIGHTS>, e.g. torchvision:resnet50.IMAGENET1K_V1"
        )
    try:
        entry = get_model_weights(model_name)[weights_name]
    except KeyError:
        choices = ", ".join(w.name for w in get_model_weights(model_name))
        raise WeightsError(
            f"{text}: torchvision has no {model_name} weights '{weights_name}'; choose from {choices}"
        ) from None
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(entry.url).name
    if not path.is_file():
        raise WeightsError(
            f"{text}: {path} not found (nothing is downloaded here); fetch {entry.url} into {path.parent}"
        )
    state, digest = _torch_load(path)
    bottleneck = int(depth.group(1)) >= 50
    return RawWeights(
        state,
        "torchvision-named",
        str(path),
        text,
        digest,
        {"weights": spec},
        residual_hint=True,
        variant_hint=Variant.V1_5 if bottleneck else Variant.V1,  # torchvision's layout: v1.5
    )


def _model_uri(text: str) -> str:
    """runs:/<id> names the run; the network the suite logged in it is its `model`."""
    return text.rstrip("/") + "/model" if text.startswith("runs:/") and text.rstrip("/").count("/") == 1 else text


def _mlflow_model(uri: str) -> RawWeights:
    """A network logged by the suite (`run.log_model`), or any MLflow PyTorch model of a ResNet
    this suite knows (its architecture then recognised from the tensors)."""
    import os

    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file otherwise
    uri = _model_uri(uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(uri))
        info = mlflow.models.get_model_info(str(local))
        net = mlflow.pytorch.load_model(str(local), map_location="cpu")
    except Exception as err:  # no such run or model, no model in it, store unreachable, not a PyTorch model
        raise WeightsError(
            f"{uri}: cannot load an MLflow PyTorch model ({_first_line(err)}); give "
            "runs:/<run id of a finished training run> or models:/<name>/<version>"
        ) from None
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    stored = (info.metadata or {}).get("reproduce.architecture")
    files = sorted(p for p in (local / "data").rglob("*") if p.is_file()) if (local / "data").is_dir() else []
    digest = hashlib.sha256(b"".join(_sha256(p).encode() for p in files)).hexdigest()
    return RawWeights(
        state,
        "mlflow-model",
        uri,
        uri,
        digest,
        {"model_uuid": info.model_uuid or ""},
        normalize=(info.metadata or {}).get("reproduce.normalize"),
        stored=Arch.from_dict(stored) if stored else None,
    )


def _torch_load(path: Path) -> tuple[object, str]:
    """What `path` holds (tensors and plain containers only) and its sha256, from one read of the file."""
    blob = path.read_bytes()
    if not blob:
        raise WeightsError(f"{path} is empty (0 bytes); give a weights file")
    try:
        obj = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for foreign objects, RuntimeError for a damaged zip
        raise WeightsError(f"{path} cannot be read as tensors ({_first_line(err)})") from None
    return obj, hashlib.sha256(blob).hexdigest()


def _first_line(err: Exception) -> str:
    """The first line of `err`'s message, or its type where the message is empty (EOFError: '')."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:160]


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _classes(state: dict) -> int:
    for key in ("fc.weight", "linear.weight"):
        if key in state:
            return int(state[key].shape[0])
    raise WeightsError("the state_dict has no classifier (fc.weight or linear.weight)")


# ---------------------------------------------------------------------------- what the tensors tell
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


def _resolve(
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
    return arch, _classes(state)


# ---------------------------------------------------------------------------- model.init
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
