"""load_config: a YAML file (read strictly: a key given twice is an error), then `key=value`
overrides (an unknown key is refused with the closest valid one), then Config's validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from reproduce.config.base import ConfigError, _unknown_key
from reproduce.config.schema import Config, _one_line


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
