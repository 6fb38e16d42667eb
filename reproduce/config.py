"""The one config schema: typed, strict, checked once at start-up.

A run is described by a YAML file (configs/...) plus `key=value` overrides. Both go
through the same pydantic models, so an unknown key, a wrong type or an impossible value
is refused before anything runs, with one line naming the key, the bad value and the
closest valid choice (`ConfigError`; the CLI turns it into exit status 2).
"""

from __future__ import annotations

import difflib
import enum
import hashlib
import json
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from reproduce.errors import Refused
from reproduce.models import MODELS, Shortcut, Variant, check_model_options, model_names


class ConfigError(Refused, ValueError):
    """A config that cannot run; its message is one line meant for the user."""


class Protocol(str, enum.Enum):
    """How the final test error is measured."""

    SINGLE = "single"  # CIFAR-10: the single original 32x32 view (paper §4.2)
    CENTER224 = "center224"  # ImageNet: shorter side 256, one 224x224 centre crop
    TENCROP = "tencrop"  # ImageNet: shorter side 256, 10 crops averaged (paper Table 2, 3)
    MULTISCALE = "multiscale"  # ImageNet: whole image, shorter side 224..640, and flips, averaged (Table 4, §3.4)


class Normalize(str, enum.Enum):
    PIXEL_MEAN = "pixel_mean"  # subtract the per-pixel mean image of the training split
    CHANNEL = "channel"  # subtract per-channel mean, divide by per-channel std
    IMAGENET = "imagenet"  # fixed ImageNet channel mean/std (as the public CIFAR-10 checkpoints were trained)


class Section(BaseModel):
    # allow_inf_nan=False: every number must be finite (.inf and .nan are YAML floats).
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic reads true as 1; here a boolean is a number only where a boolean is asked for."""
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and annotation is not bool and bool not in typing.get_args(annotation):
            raise ValueError("a boolean (true/false) is not valid here")
        if isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value):
            raise ValueError("a boolean (true/false) is not valid here")
        return value


class ModelConfig(Section):
    name: str = Field(description="a name from the model registry (`reproduce models`)")
    shortcut: Shortcut | None = Field(None, description="A, B or C (paper §3.3); null = the model's paper default")
    variant: Variant = Field(Variant.V1, description="bottleneck stride placement: v1 (paper) or v1.5 (torchvision)")
    init: str | None = Field(
        None,
        description="start from these weights (a run dir, checkpoint, state_dict file or "
        "torchvision:resnet50.IMAGENET1K_V1; reproduce/weights.py); the classifier is replaced "
        "when the number of classes differs; null = He initialisation",
    )
    init_classifier: bool = Field(
        True,
        description="with model.init: take the weights' classifier when it has as many "
        "classes as the data (false: always a new one, for other classes of the same number)",
    )

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in MODELS:
            raise ValueError(_did_you_mean(name, model_names(), "model"))
        return name

    @field_validator("init")
    @classmethod
    def _weights_exist(cls, init: str | None) -> str | None:
        """The file or folder must be there (whether it fits is checked when it is loaded)."""
        import re

        if init is None:
            return init
        if init.startswith(("runs:/", "models:/")):
            if not re.fullmatch(r"runs:/\w+(/.+)?|models:/[^/]+/\S+", init):
                raise ValueError("give runs:/<run id>[/model] or models:/<registered name>/<version>")
        elif init.startswith("torchvision:"):
            if not re.fullmatch(r"torchvision:resnet\d+\.\w+", init):
                raise ValueError("give torchvision:resnet<depth>.<WEIGHTS>, e.g. torchvision:resnet50.IMAGENET1K_V1")
        elif not Path(init).exists():
            raise ValueError(
                "no such file or folder; give a run directory, a checkpoint or state_dict file, "
                "or torchvision:resnet50.IMAGENET1K_V1"
            )
        return init

    @model_validator(mode="after")
    def _options(self) -> "ModelConfig":
        check_model_options(self.name, self.shortcut, self.variant)
        if not self.init_classifier and self.init is None:
            raise ValueError(
                "model.init_classifier=false needs model.init (without it every layer is newly initialised)"
            )
        return self


class DataConfig(Section):
    dataset: Literal["cifar10", "imagenet", "folder"] = Field(
        description="folder: any train/<class>/*, val/<class>/* "
        "tree or .tar.gz of one, with the model family's transforms"
    )
    path: Path | None = Field(
        None,
        description="CIFAR-10: a cifar-10-batches-py folder, an image-folder tree or a .tar.gz of one; "
        "null = torchvision download into ./data. ImageNet: a folder with train/ and val/.",
    )
    synthetic: bool = Field(False, description="random tensors of the dataset's shapes (benchmarks only)")
    loader: Literal["torchvision", "ffcv", "gpu", "device"] = Field(
        "torchvision",
        description="torchvision: DataLoader worker processes decoding with PIL; ffcv: the .beton files that "
        "`reproduce prepare` wrote into data.path; gpu: CIFAR-10 held on the device and augmented there per batch; "
        "device: ImageNet JPEGs read by workers, decoded in batches and augmented on run.device (nvJPEG on a GPU)",
    )
    val_split: int = Field(0, ge=0, description="images held out of train as the validation split")
    workers: int = Field(
        4,
        ge=0,
        description="per rank: DataLoader worker processes (torchvision), decoding threads "
        "(ffcv, at least 1); unused by gpu",
    )
    augment: bool = Field(True, description="the paper's training augmentation")
    scale: tuple[int, int] = Field(
        (256, 480), description="ImageNet: shorter side drawn uniformly from [lo, hi] (§3.4)"
    )
    crop: int = Field(
        224,
        gt=0,
        description="ImageNet: training / test crop size in pixels; an image folder: the "
        "input size (default 224, or 32 for a CIFAR network)",
    )
    lighting: float = Field(0.1, ge=0, description="ImageNet: std of AlexNet PCA colour augmentation (0 = off)")
    train_crop: Literal["scale", "random_resized"] = Field(
        "scale",
        description="ImageNet training crop: scale = the paper's (shorter side uniform in data.scale, random crop); "
        "random_resized = Inception-style RandomResizedCrop (area 8-100%, aspect 3/4-4/3) to data.crop",
    )
    normalize: Normalize = Normalize.PIXEL_MEAN

    @field_validator("scale")
    @classmethod
    def _scale(cls, scale: tuple[int, int]) -> tuple[int, int]:
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"need 0 < lo <= hi, got {list(scale)}")
        return scale

    @field_validator("path")
    @classmethod
    def _exists(cls, path: Path | None) -> Path | None:
        if path is not None and not path.exists():
            raise ValueError("no such file or folder; point data.path at the dataset or set it to null")
        return path

    @model_validator(mode="after")
    def _loader_fits(self) -> "DataConfig":
        if self.loader == "gpu" and self.dataset != "cifar10":
            raise ValueError(
                "data.loader=gpu holds CIFAR-10 on the device; for imagenet use ffcv, device or torchvision"
            )
        if self.loader == "device" and self.dataset != "imagenet":
            raise ValueError(
                "data.loader=device decodes ImageNet-style JPEG folders; for cifar10 use gpu, ffcv or torchvision"
            )
        if self.loader == "ffcv" and self.normalize == Normalize.IMAGENET:
            raise ValueError(
                "data.normalize=imagenet is not in the .beton manifests; use data.loader=torchvision or gpu"
            )
        if self.loader == "ffcv" and self.path is None and not self.synthetic:
            raise ValueError("data.loader=ffcv needs data.path=DIR, a folder written by `reproduce prepare`")
        return self


class OptimConfig(Section):
    batch_size: int = Field(gt=0, description="global mini-batch, split evenly over the processes")
    lr: float = Field(gt=0, description="base learning rate")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    nesterov: bool = False
    pretrained_lr_scale: float = Field(
        1.0,
        ge=0,
        description="lr multiplier of the layers model.init provides "
        "(0 = frozen); a replaced classifier trains at optim.lr",
    )

    @field_validator("batch_size")
    @classmethod
    def _divisible(cls, batch: int, info: ValidationInfo) -> int:
        world = (info.context or {}).get("world_size", 1)
        if batch % world:
            raise ValueError(
                f"not divisible by the {world} processes; nearest valid is {max(world, round(batch / world) * world)}"
            )
        return batch


class ScheduleConfig(Section):
    iterations: int = Field(gt=0, description="optimizer steps in the whole run (the paper counts iterations)")
    milestones: tuple[int, ...] = Field((), description="iterations at which lr is multiplied by gamma")
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_iterations: int = Field(0, ge=0, description="iterations at warmup_lr before the base lr")
    warmup_lr: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _order(self) -> "ScheduleConfig":
        steps = list(self.milestones)
        if steps != sorted(set(steps)) or any(m <= 0 for m in steps):
            raise ValueError(f"schedule.milestones must be positive and strictly increasing, got {steps}")
        if steps and steps[-1] >= self.iterations:
            raise ValueError(
                f"schedule.milestones: milestone {steps[-1]} is not below schedule.iterations={self.iterations}"
            )
        if self.warmup_iterations and self.warmup_lr is None:
            raise ValueError("schedule.warmup_iterations is set but schedule.warmup_lr is null")
        if steps and self.warmup_iterations >= steps[0]:
            raise ValueError(
                f"schedule.warmup_iterations={self.warmup_iterations} must end before the first milestone {steps[0]}"
            )
        return self


class EvalConfig(Section):
    every: int = Field(gt=0, description="iterations between evaluations on the validation split")
    protocol: Protocol = Field(
        description="final test protocol: single (CIFAR), center224, tencrop or multiscale (ImageNet)"
    )
    batch_size: int = Field(256, gt=0, description="per-process evaluation batch")
    max_images: int | None = Field(None, gt=0, description="evaluate on the first N images only (smoke tests)")


class RunConfig(Section):
    dir: Path | None = Field(
        None, description="checkpoints + resolved config; null = runs/<experiment>/<model>-s<seed>-<hash>"
    )
    checkpoint_every: int = Field(gt=0, description="iterations between checkpoints (one is always written at the end)")
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(50, gt=0, description="iterations between logged training metrics")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool | Literal["auto"] = Field(
        False,
        description="bf16 autocast; auto = on where this machine runs it faster "
        "(a CUDA GPU with bf16; a CPU with AVX-512 BF16 or AMX, if a short measurement agrees)",
    )
    channels_last: bool | Literal["auto"] = Field(
        False, description="NHWC memory layout; auto = whichever a short measurement on this machine finds faster"
    )
    compile: bool = Field(False, description="torch.compile the model")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default",
        description="torch.compile mode; reduce-overhead replays each step's kernels as CUDA graphs "
        "(for the small CIFAR nets, whose steps are launch-bound on a GPU; on a CPU it compiles without graphs)",
    )
    deterministic: bool = Field(False, description="deterministic kernels (bitwise-repeatable on CPU)")
    progress: bool = Field(True, description="progress bar on rank 0")
    tracking_flush_s: float = Field(
        60.0,
        ge=0,
        description="at the end, how long to wait for an unreachable MLflow "
        "server before writing unsent metrics to the run directory",
    )
    collective_timeout_s: float = Field(
        600.0,
        gt=0,
        description="a rank waiting longer than this for the others fails, naming the stalled rank, instead of hanging",
    )
    system_metrics: bool | Literal["auto"] = Field(
        "auto",
        description="MLflow system metrics (system/*: CPU, memory, "
        "GPU use) every 10 s; auto = on for CUDA jobs, off on the CPU, unless "
        "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING says otherwise",
    )
    log_model: bool = Field(
        True,
        description="when the run finishes, log the network as an MLflow model (artifact "
        "`model`: mlflow.pytorch.load_model('runs:/<run id>/model'), reproduce evaluate --weights runs:/<run id>)",
    )
    register_model: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="also register that model in the MLflow model "
        "registry under this name (a new version per run); null = not registered",
    )

    @field_validator("dir")
    @classmethod
    def _a_folder(cls, path: Path | None) -> Path | None:
        if path is not None and path.exists() and not path.is_dir():
            raise ValueError("is a file, not a folder; point run.dir at a folder (it is created if missing)")
        return path

    @model_validator(mode="after")
    def _compile_mode_needs_compile(self) -> "RunConfig":
        if self.compile_mode != "default" and not self.compile:
            raise ValueError(
                f"run.compile_mode={self.compile_mode} has no effect while run.compile is false; set run.compile=true"
            )
        if self.register_model is not None and not self.log_model:
            raise ValueError("run.register_model needs run.log_model=true (the registered version is the logged model)")
        return self


class Config(Section):
    experiment: str = Field(min_length=1, description="MLflow experiment name")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="0 .. 2**63-1: torch's generators take 64-bit seeds")
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    eval: EvalConfig
    run: RunConfig

    @model_validator(mode="before")
    @classmethod
    def _cifar_nets_on_folders_at_their_size(cls, raw: Any) -> Any:
        """data.dataset=folder with a CIFAR network and no data.crop: the network's own 32x32
        input, not the ImageNet default of 224 (49x the compute for the same net)."""
        data, model = (raw.get("data"), raw.get("model")) if isinstance(raw, dict) else (None, None)
        if (
            isinstance(data, dict)
            and isinstance(model, dict)
            and data.get("dataset") == "folder"
            and "crop" not in data
        ):
            spec = MODELS.get(model.get("name"))
            if spec is not None and spec.family == "cifar":
                return {**raw, "data": {**data, "crop": spec.input_size}}
        return raw

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        family = MODELS[self.model.name].family
        want = "cifar10" if family == "cifar" else "imagenet"
        if self.data.dataset not in (want, "folder"):
            raise ValueError(
                f"model {self.model.name} is a network for {want} but data.dataset is {self.data.dataset}; use {want}"
            )
        allowed = (
            [Protocol.SINGLE] if family == "cifar" else [Protocol.CENTER224, Protocol.TENCROP, Protocol.MULTISCALE]
        )
        if self.eval.protocol not in allowed:
            raise ValueError(
                f"eval.protocol {self.eval.protocol.value} does not apply to {want}; use {allowed[0].value}"
            )
        if self.eval.protocol == Protocol.MULTISCALE and (self.data.loader != "torchvision" or self.data.synthetic):
            raise ValueError(
                "eval.protocol multiscale needs data.loader=torchvision on real images (whole images of several sizes)"
            )
        if self.data.dataset == "folder" and (
            self.data.path is None
            or self.data.synthetic
            or self.data.loader != "torchvision"
            or self.data.normalize != Normalize.IMAGENET
        ):
            raise ValueError(
                "data.dataset=folder needs data.path (train/ and val/ class folders), data.loader=torchvision, "
                "data.synthetic=false and data.normalize=imagenet"
            )
        if self.data.dataset == "imagenet" and self.data.path is None and not self.data.synthetic:
            raise ValueError("data.path is required for imagenet (a folder with train/ and val/)")
        return self

    def with_seed(self, seed: int, world_size: int = 1) -> "Config":
        """The same config with another seed, validated (a sweep's grid: each file is read once)."""
        try:
            return Config.model_validate(
                {**self.model_dump(mode="json"), "seed": seed}, context={"world_size": world_size}
            )
        except ValidationError as err:
            raise ConfigError(_one_line(err)) from None

    def recipe_hash(self) -> str:
        """Hash of everything that defines the experiment except the seed: runs that share it
        are repeats of one recipe, and the report groups them."""
        recipe = self.model_dump(mode="json", exclude={"seed": True, "run": True, "experiment": True})
        for key in ("path", "workers"):  # where the data lies and how fast it loads do not change the result
            recipe["data"].pop(key)
        for key in ("batch_size", "every"):  # nor do the evaluation's batch and cadence (it draws no randomness)
            recipe["eval"].pop(key)
        recipe["numerics"] = {k: getattr(self.run, k) for k in ("amp", "deterministic")}
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]

    def run_dir(self) -> Path:
        if self.run.dir is not None:
            return self.run.dir
        return Path("runs") / self.experiment / f"{self.model.name}-s{self.seed}-{self.recipe_hash()}"

    def flat(self) -> dict[str, Any]:
        """`section.key -> value` for MLflow params."""
        return dict(_flatten(self.model_dump(mode="json")))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_config(
    path: str | Path | None, overrides: list[str] = (), world_size: int = 1, base: dict | None = None
) -> Config:
    """Read a YAML file, apply `key=value` overrides, validate. Raises ConfigError."""
    raw: dict[str, Any] = dict(base or {})
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(
                f"config {path} is a folder, not a config file; pick a YAML file in it "
                "(e.g. configs/cifar10/resnet20.yaml)"
            )
        if not path.is_file():
            raise ConfigError(
                f"config file {path} not found; pick one under configs/ (e.g. configs/cifar10/resnet20.yaml)"
            )
        try:
            raw = yaml.load(path.read_bytes().decode("utf-8"), Loader=_StrictLoader)
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start}); give a YAML file") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file {path}{where} is not valid YAML: {getattr(err, 'problem', err)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    try:
        return Config.model_validate(raw, context={"world_size": world_size})
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None


class _StrictLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error (PyYAML keeps the
    last value silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _apply_override(raw: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not key=value (e.g. optim.lr=0.05)")
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        value = text
    *parents, leaf = key.split(".")
    node, schema = raw, Config
    for part in parents:
        field = schema.model_fields.get(part) if schema else None
        if field is None or not isinstance(node.get(part, {}), dict):
            raise ConfigError(_unknown_key(key, ".".join(parents[: parents.index(part)]), part, schema))
        node = node.setdefault(part, {})
        schema = (
            field.annotation if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel) else None
        )
    if schema is not None and leaf not in schema.model_fields:
        raise ConfigError(_unknown_key(key, ".".join(parents), leaf, schema))
    node[leaf] = value


def _one_line(err: ValidationError) -> str:
    errors = err.errors(include_url=False)
    first = errors[0]
    loc = [str(p) for p in first["loc"] if not isinstance(p, int)]
    if first["type"] != "extra_forbidden":
        loc = _field_path(loc)
    key = ".".join(loc) or "config"
    value = first.get("input")
    msg = first["msg"].removeprefix("Value error, ")
    same_field = [e for e in errors if _field_path([str(p) for p in e["loc"] if not isinstance(p, int)]) == loc]
    if len(same_field) > 1 and len(first["loc"]) > len(loc):  # a union (true/false or 'auto'): say every choice
        msg = " or ".join(
            e["msg"].removeprefix("Input should be ").replace(", unable to interpret input", "") for e in same_field
        )
        msg = f"should be {msg}"
        errors = [e for e in errors if e not in same_field[1:]]
    if first["type"] == "extra_forbidden":
        schema = _schema_at(loc[:-1])
        return "config error: " + _unknown_key(key, ".".join(loc[:-1]), loc[-1], schema)
    if first["type"] == "missing":
        return f"config error: {key} is missing; add it to the config or pass {key}=VALUE"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    if isinstance(value, dict):  # a check across the keys of a section: the message names them
        where = f"{key}: " if loc else ""
        return f"config error: {where}{msg}{more}".replace("\n", " ")
    if first["type"] in ("enum", "literal_error") and isinstance(value, str):
        choices = [c.strip(" '") for c in msg.split("should be", 1)[-1].replace(" or ", ",").split(",")]
        close = difflib.get_close_matches(value, choices, n=1, cutoff=0.0)
        if close:
            msg += f"; closest valid is '{close[0]}'"
    return f"config error: {key} = {value!r}: {msg}{more}".replace("\n", " ")


def _field_path(loc: list[str]) -> list[str]:
    """The config keys of an error location, without pydantic's union-member tags ('bool', ...)."""
    schema: Any = Config
    for i, part in enumerate(loc):
        if not (isinstance(schema, type) and issubclass(schema, BaseModel)) or part not in schema.model_fields:
            return loc[:i]
        schema = schema.model_fields[part].annotation
    return loc


def _schema_at(loc: list[str]) -> type[BaseModel] | None:
    schema: Any = Config
    for part in loc:
        field = schema.model_fields.get(part) if schema else None
        schema = field.annotation if field is not None else None
    return schema if isinstance(schema, type) and issubclass(schema, BaseModel) else None


def _unknown_key(key: str, parent: str, name: str, schema: type[BaseModel] | None) -> str:
    valid = list(schema.model_fields) if schema else []
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    prefix = f"{parent}." if parent else ""
    hint = (
        f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys here: {', '.join(valid)}" if valid else ""
    )
    return f"unknown key '{key}'{hint}"


def _did_you_mean(value: str, choices: list[str], what: str) -> str:
    close = difflib.get_close_matches(value, choices, n=1, cutoff=0.0)
    return f"unknown {what} '{value}'; closest valid is '{close[0]}'" if close else f"unknown {what} '{value}'"


def _flatten(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
