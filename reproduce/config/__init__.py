"""The one config schema: typed, strict, checked once at start-up.

A run is described by a YAML file (configs/...) plus `key=value` overrides. Both go
through the same pydantic models, so an unknown key, a wrong type or an impossible value
is refused before anything runs, with one line naming the key, the bad value and the
closest valid choice (`ConfigError`; the CLI turns it into exit status 2).

Modules, each importing only those above it:
  base      ConfigError, Protocol, Normalize, the strict Section base, did-you-mean words
  sections  ModelConfig, DataConfig, OptimConfig, ScheduleConfig, EvalConfig, RunConfig
  schema    Config (checks across sections, recipe hash, run dir), _one_line (a ValidationError
            as one line), _flatten
  load      load_config: the strict YAML loader, `key=value` overrides

Every name importers use is here: import from `reproduce.config`, not from its modules.
"""

from __future__ import annotations

from reproduce.config.base import ConfigError, Normalize, Protocol, Section, _did_you_mean, _unknown_key
from reproduce.config.load import _apply_override, _StrictLoader, load_config
from reproduce.config.schema import Config, _field_path, _flatten, _one_line, _schema_at
from reproduce.config.sections import DataConfig, EvalConfig, ModelConfig, OptimConfig, RunConfig, ScheduleConfig

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "Normalize",
    "OptimConfig",
    "Protocol",
    "RunConfig",
    "ScheduleConfig",
    "Section",
    "load_config",
    # private, but imported elsewhere (checkpoint: _flatten; report.responses: _one_line) or by tests
    "_StrictLoader",
    "_apply_override",
    "_did_you_mean",
    "_field_path",
    "_flatten",
    "_one_line",
    "_schema_at",
    "_unknown_key",
]
