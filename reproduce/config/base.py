"""What every part of the config shares: ConfigError, the two enums, the strict Section base
(no unknown keys, frozen, finite numbers, no booleans as numbers), and the did-you-mean words
of an error. Imports nothing from the rest of the package."""

from __future__ import annotations

import difflib
import enum
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from reproduce.errors import Refused


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
