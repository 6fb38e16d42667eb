"""Each kind of weights source read once into RawWeights: the suite's run directories and checkpoints,
MLflow models, torchvision's named weights (local hub cache only), exported programs (.pt2, export.py)
and plain state_dict files."""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import torch

from reproduce import checkpoint
from reproduce.models import Arch, Shortcut, Variant
from reproduce.models.imagenet import LAYERS
from reproduce.weights import export
from reproduce.weights.records import RawWeights, Weights, stated
from reproduce.weights.tensors import WeightsError

TORCHVISION_PREFIX = "torchvision:"
MLFLOW_PREFIXES = ("runs:/", "models:/")


def load_weights(
    source: str | Path,
    name: str | None = None,
    shortcut: Shortcut | str | None = None,
    variant: Variant | str | None = None,
) -> Weights:
    """The weights of `source` and their architecture. `name`, `shortcut`, `variant` are what
    the user stated (None = not stated); they must agree with the weights. WeightsError otherwise."""
    return read_weights(source)._resolved(stated(name, shortcut, variant))


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
    if path.suffix == export.SUFFIX:
        return export.read_program(path)
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
    """runs:/<id> names the run; the network the suite logged in it is its logged model (named
    after the run; `model` in runs logged before that)."""
    if not (text.startswith("runs:/") and text.rstrip("/").count("/") == 1):
        return text
    import mlflow

    run_id = text.rstrip("/").removeprefix("runs:/")
    try:  # searched in the run's own experiment (by default MLflow searches only the active one)
        models = mlflow.search_logged_models(
            experiment_ids=[mlflow.get_run(run_id).info.experiment_id],
            filter_string=f"source_run_id = '{run_id}'",
            output_format="list",
        )
    except Exception:  # noqa: BLE001 (no such run, store away: the load below says so in one line)
        models = []
    newest = max(models, key=lambda m: m.creation_timestamp, default=None)  # a resumed run may log it again
    return f"models:/{newest.model_id}" if newest is not None else f"runs:/{run_id}/model"


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
