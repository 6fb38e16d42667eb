"""Config, the whole run: its sections, the checks across them, the recipe hash and the run
directory named after it; and the one line a validation error becomes (_one_line walks Config's
fields, and Config.with_seed needs it, so both live here)."""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from reproduce.config.base import ConfigError, Normalize, Protocol, Section, _unknown_key
from reproduce.config.sections import DataConfig, EvalConfig, ModelConfig, OptimConfig, RunConfig, ScheduleConfig
from reproduce.models import MODELS


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
        for key in ("batch_size", "every", "target_top1_err"):  # nor do the evaluation's batch, cadence
            recipe["eval"].pop(key)  # (it draws no randomness) and the errors it watches for
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


def _flatten(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
