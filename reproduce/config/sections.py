"""The sections of a config, one pydantic model each: model, data, optim, schedule, eval, run.
Each checks its own keys (and the keys of its own section together); checks across sections are
Config's (schema.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from reproduce.config.base import Normalize, Protocol, Section, _did_you_mean
from reproduce.models import MODELS, Shortcut, Variant, check_model_options, model_names


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
    target_top1_err: tuple[float, ...] = Field(
        (),
        description="top-1 error targets (%): the run logs the first iteration and training wall time at "
        "which its evaluated error (validation, or test where there is no validation split) reached each "
        "(metrics time_to_<split>_top1_err_<target>_iteration and _s); () = none",
    )

    @field_validator("target_top1_err")
    @classmethod
    def _targets(cls, targets: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < t < 100 for t in targets) or len(set(targets)) != len(targets):
            raise ValueError(f"give distinct errors in % between 0 and 100, got {list(targets)}")
        return targets


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
