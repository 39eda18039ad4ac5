"""Read params.yaml: the single place every stage takes its settings from.

Stages call `load_params()` and hand the mapping to the section's settings class
(`TrainSettings.parse(params)`, `rmpipe.core.settings`), which checks every key: a missing key or
a value of the wrong kind is a `ConfigError` naming the key, so a typo in params.yaml reads as
a sentence rather than a KeyError traceback. A top-level section no stage reads (`trian:`) is refused
the same way, naming the closest known section. Messages name the file actually read (`--params FILE`),
not params.yaml.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from rmpipe.core.errors import ConfigError

PARAMS_FILE = "params.yaml"
# Every top-level section rmpipe reads (tests/test_settings.py keeps it equal to the settings classes' sections).
SECTIONS = ("sample_data", "data", "collect", "aggregate", "split", "validate", "model", "sampling", "train",
            "evaluate", "export")


class Params(dict):
    """The params mapping as `load_params` read it, remembering from which file (so messages can name it)."""

    source: str = PARAMS_FILE


def source_of(params: Any) -> str:
    return getattr(params, "source", PARAMS_FILE)


@contextlib.contextmanager
def naming(source: str | Path) -> Iterator[None]:
    """A ConfigError raised inside names `source` where it says params.yaml (the file given with --params)."""
    try:
        yield
    except ConfigError as exc:
        message, source = str(exc), str(source)
        if source == PARAMS_FILE or not message.startswith(PARAMS_FILE):
            raise
        raise type(exc)(source + message[len(PARAMS_FILE):]) from None


def dvc_yaml_sections(params_file: Path) -> set[str]:
    """Top-level sections the stages of the dvc.yaml beside `params_file` name in their `params:` (a project's
    own stages read params.yaml too)."""
    dvc_yaml = params_file.parent / "dvc.yaml"
    try:
        stages = (yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return set()
    names: set[str] = set()
    for stage in stages.values():
        body = stage.get("do", stage) if isinstance(stage, dict) else {}
        for entry in (body.get("params") or []) if isinstance(body, dict) else []:
            if isinstance(entry, str):
                names.add(entry.split(".")[0])
            elif isinstance(entry, dict) and params_file.name in entry:  # `- params.yaml: [keys]`
                keys = entry[params_file.name]
                if keys is None:  # the whole file is the stage's: every section is read
                    return {"*"}
                names.update(str(key).split(".")[0] for key in keys)
    return names


def unknown_sections(params: dict[str, Any], path: str | Path) -> None:
    """Refuse a top-level section nothing reads (a typo such as `trian:` would be ignored, silently): neither
    rmpipe (SECTIONS) nor a stage of the project's dvc.yaml (its `params:`)."""
    unknown = [name for name in params if name not in SECTIONS]
    known_here = dvc_yaml_sections(Path(path)) if unknown else set()
    for name in unknown:
        if name not in known_here and "*" not in known_here:
            close = difflib.get_close_matches(str(name), SECTIONS, n=1)
            hint = f"did you mean '{close[0]}:'?" if close else f"the sections are {', '.join(SECTIONS)}"
            raise ConfigError(f"{path}: unknown section '{name}:' ({hint}); rename or remove it")


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
    unknown_sections(params, path)
    loaded = Params(params)
    loaded.source = str(path)
    return loaded


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    value = params.get(name)
    if not isinstance(value, dict):
        raise ConfigError(f"{source_of(params)} has no '{name}:' section (or it is not a mapping)")
    return value
