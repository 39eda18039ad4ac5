"""Read params.yaml: the single place every stage takes its settings from.

Stages call `load_params()` and hand the mapping to the section's settings class
(`TrainSettings.parse(params)`, `rmpipe.core.settings`), which checks every key: a missing key or
a value of the wrong kind is a `ConfigError` naming the key, so a typo in params.yaml reads as
a sentence rather than a KeyError traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from rmpipe.core.errors import ConfigError

PARAMS_FILE = "params.yaml"


def load_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} not found: run from the project root (where dvc.yaml is)")
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path} must be a mapping of sections, got {type(params).__name__}")
    return params


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    value = params.get(name)
    if not isinstance(value, dict):
        raise ConfigError(f"params.yaml has no '{name}:' section (or it is not a mapping)")
    return value
