"""Read params.yaml: the single place every stage takes its settings from.

Stages call `load_params()` and then `section(params, "collect")`; a missing
key or a value of the wrong kind raises `ConfigError` naming the key, so a typo
in params.yaml reads as a sentence rather than a KeyError traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from rmpipe.errors import ConfigError

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


def get(cfg: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, choices=None):
    """Fetch `cfg[key]`, checking its type (and allowed values): `get(cfg, "min_votes", int, "aggregate")`."""
    if key not in cfg:
        raise ConfigError(f"params.yaml: '{where}.{key}' is missing")
    value = cfg[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int in Python; a `true` where a number is expected is almost always a mistake.
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    elif float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    else:
        ok = isinstance(value, kinds)
    if not ok:
        names = " or ".join(k.__name__ for k in kinds)
        raise ConfigError(f"params.yaml: '{where}.{key}' must be {names}, got {value!r}")
    if choices is not None and value not in choices:
        raise ConfigError(f"params.yaml: '{where}.{key}' must be one of {list(choices)}, got {value!r}")
    return value


def fraction(cfg: dict[str, Any], key: str, where: str) -> float:
    value = float(get(cfg, key, float, where))
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"params.yaml: '{where}.{key}' must be between 0 and 1, got {value}")
    return value
