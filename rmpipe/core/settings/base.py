"""The settings base: one params.yaml section as a frozen pydantic model, its errors as one line each."""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationError,
    model_validator,
)

from rmpipe.core.errors import ConfigError
from rmpipe.core.params import naming, section, source_of

SPLITS = ("train", "val", "test")  # = rmpipe.core.schema.SPLITS (kept here so settings import nothing heavy)
STRENGTHS = ("slight", "moderate", "strong", "very_strong")  # = rmpipe.core.schema.STRENGTHS
PACKING_MODES = ("none", "padding_free", "shared_prompt", "groups")  # = rmpipe.model.packing.MODES (a test checks)
FRACTION_TOLERANCE = 1e-6

# What each pydantic error type means, in the words of a params.yaml fix.
_KINDS = {
    "int_type": "a whole number", "float_type": "a number", "bool_type": "true or false",
    "string_type": "a string", "tuple_type": "a list", "list_type": "a list", "dict_type": "a mapping",
    "model_type": "a mapping", "is_instance_of": "a path (a string)", "path_type": "a path (a string)",
}


def _explain(where: str, error: Mapping[str, Any]) -> str:
    """One pydantic error as `'section.key' must be ..., got ...`."""
    key = ".".join([where, *(str(part) for part in error["loc"])])
    kind, ctx, got = error["type"], error.get("ctx") or {}, error.get("input")
    if kind == "missing":
        return f"'{key}' is missing: add it to the '{where}:' section"
    if kind == "extra_forbidden":
        return f"'{key}' is not a setting rmpipe knows: remove it or correct its spelling"
    if kind in _KINDS:
        return f"'{key}' must be {_KINDS[kind]}, got {got!r}"
    if kind == "literal_error":
        return f"'{key}' must be one of {ctx.get('expected')}, got {got!r}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        words = {"greater_than_equal": "at least", "greater_than": "greater than",
                 "less_than_equal": "at most", "less_than": "less than"}[kind]
        bound = next(iter(ctx.values()))
        return f"'{key}' must be {words} {bound}, got {got!r}"
    message = str(error.get("msg", "")).removeprefix("Value error, ")
    return f"'{key}' {message}" if error["loc"] else message


class Settings(BaseModel):
    """A params.yaml section. Subclasses set SECTION and declare its keys as fields."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    SECTION: ClassVar[str]
    REQUIRED: ClassVar[tuple[str, ...]] = ()  # keys params.yaml must spell out although code may default them

    def __init__(self, **data: Any) -> None:
        # Built in code (tests, library callers) or from params: the same one-line ConfigError either way.
        try:
            super().__init__(**data)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise ConfigError(f"params.yaml: {_explain(self.SECTION, errors[0])}{more}") from None

    @model_validator(mode="before")
    @classmethod
    def _lists_to_tuples(cls, data: Any) -> Any:
        # YAML has only lists; a frozen settings object holds tuples (hashable, not edited in place).
        if isinstance(data, Mapping):
            return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return data

    @classmethod
    def from_section(cls, cfg: Any):
        """Validate one section's mapping; any mistake -> ConfigError (one line, key + fix)."""
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"params.yaml: '{cls.SECTION}:' must be a mapping of settings, got {cfg!r}")
        for key in cls.REQUIRED:
            if key not in cfg:
                raise ConfigError(f"params.yaml: {_explain(cls.SECTION, {'type': 'missing', 'loc': (key,)})}")
        return cls(**{str(k): v for k, v in cfg.items()})

    @classmethod
    def parse(cls, params: Mapping[str, Any]):
        """This class's section of the whole params mapping (as `rmpipe.core.params.load_params` returns it)."""
        with naming(source_of(params)):
            return cls.from_section(section(params, cls.SECTION))
