"""The data stages' sections: `data:`, `sample_data:`, `collect:`, `aggregate:`, `split:`, `validate:`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping

from pydantic import Field, field_validator, model_validator

from rmpipe.core.errors import ConfigError
from rmpipe.core.params import naming, source_of
from rmpipe.core.settings.base import (
    FRACTION_TOLERANCE,
    SPLITS,
    STRENGTHS,
    Settings,
)


# --- data stages -------------------------------------------------------------------------------
class DataSettings(Settings):
    """`data:` (where the data stages' parallel work runs; never what comes out). Absent: local."""

    SECTION: ClassVar[str] = "data"
    engine: Literal["local", "dask"] = "local"
    scheduler: str = ""  # a Dask scheduler address (tcp://host:8786); empty: start a LocalCluster
    workers: int = Field(0, ge=0)  # LocalCluster worker processes; 0: Dask's default for this machine

    @field_validator("scheduler", mode="before")
    @classmethod
    def _empty(cls, value: Any) -> Any:
        return "" if value is None else value

    @classmethod
    def parse(cls, params: Mapping[str, Any]):
        with naming(source_of(params)):
            return cls.from_section(params.get("data") or {})  # an optional section


class SampleDataSettings(Settings):
    """`sample_data:` (`rmpipe sample-data`: the bundled default batches)."""

    SECTION: ClassVar[str] = "sample_data"
    seed: int
    n_pairs: int = Field(ge=1)  # comparisons delivered as vote rows
    n_batches: int = Field(ge=1)  # vote-row files, alternating .jsonl / .csv
    pair_rows: int = Field(0, ge=0)  # extra comparisons delivered as already-judged pair rows (.parquet)
    long_texts: bool = False  # benchmark mode: prompts of 300-3000 chars, responses of a few hundred
    # {votes: share}; mostly 3 lets one annotator hold > 30% of votes (the annotator report flags it)
    votes_per_pair: dict[int, float] = Field(default_factory=lambda: {3: 0.82, 4: 0.13, 5: 0.05})

    @field_validator("votes_per_pair")
    @classmethod
    def _shares(cls, shares: dict[int, float]) -> dict[int, float]:
        if not shares or min(shares) < 1 or abs(sum(shares.values()) - 1) > 1e-6:
            raise ValueError(f"must map vote counts (>= 1) to shares summing to 1, got {shares}")
        return shares


class CollectSettings(Settings):
    """`collect:` (batch files in, votes out)."""

    SECTION: ClassVar[str] = "collect"
    incoming_dir: Path
    max_bad_share: float = Field(ge=0, le=1)  # a batch with a larger share of bad rows is rejected whole
    max_field_chars: int = Field(ge=1)
    max_file_mb: float = Field(gt=0)
    on_rejected_batch: Literal["fail", "skip"]
    margin_from_scores: bool = False  # score_chosen - score_rejected (a group's score gap) becomes the margin
    hf_split: str = "train"  # the split read from a DatasetDict folder or a shard folder

    @field_validator("incoming_dir", mode="before")
    @classmethod
    def _path(cls, value: Any) -> Any:
        return Path(value) if isinstance(value, str) else value


def check_fractions(fractions: Any) -> dict[str, float]:
    """`{train, val, test}` fractions, each >= 0 and summing to 1 (within 1e-6), else ConfigError."""
    if not isinstance(fractions, Mapping) or set(fractions) != set(SPLITS):
        raise ConfigError(
            f"params.yaml: 'split.fractions' must map exactly {list(SPLITS)} to numbers, got {fractions!r}"
        )
    values: dict[str, float] = {}
    for name in SPLITS:
        value = fractions[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"params.yaml: 'split.fractions.{name}' must be a number, got {value!r}")
        values[name] = float(value)
    shown = ", ".join(f"{name}={value:g}" for name, value in values.items())
    if any(value < 0 for value in values.values()):
        raise ConfigError(f"params.yaml: 'split.fractions' must be non-negative, got {shown}")
    total = sum(values.values())
    if abs(total - 1.0) > FRACTION_TOLERANCE:
        raise ConfigError(f"params.yaml: 'split.fractions' must sum to 1, got {shown} (sum {total:g})")
    return values


class DawidSkeneSettings(Settings):
    SECTION: ClassVar[str] = "aggregate.dawid_skene"
    n_iter: int = Field(20, ge=1)  # at most this many EM iterations
    tol: float = 1e-4  # stop when the per-vote evidence bound improves by less than this


class AggregateSettings(Settings):
    """`aggregate:`. Defaults serve settings built in code; params.yaml must name the REQUIRED keys."""

    SECTION: ClassVar[str] = "aggregate"
    REQUIRED: ClassVar[tuple[str, ...]] = ("method", "min_votes", "tie_policy", "strength_margin", "agreement_floor",
                                           "share_ceiling", "exclude_flagged", "dawid_skene")
    method: Literal["majority", "dawid_skene"] = "majority"
    min_votes: int = Field(2, ge=1)
    max_dropped_share: float = Field(0.5, ge=0, le=1)
    tie_policy: Literal["drop", "soft"] = "drop"
    strength_margin: dict[str, float] = Field(
        default_factory=lambda: {"slight": 0.0, "moderate": 0.33, "strong": 0.67, "very_strong": 1.0})
    agreement_floor: float = Field(0.6, ge=0, le=1)
    share_ceiling: float = Field(0.3, ge=0, le=1)
    exclude_flagged: bool = False
    exclude_annotators: tuple[str, ...] = ()  # named out, e.g. by `rmpipe retract --annotator`
    dawid_skene: DawidSkeneSettings = DawidSkeneSettings()

    @field_validator("strength_margin")
    @classmethod
    def _every_strength(cls, margins: dict[str, float]) -> dict[str, float]:
        missing = [s for s in STRENGTHS if s not in margins]
        if missing:
            raise ValueError(f"has no value for {missing}")
        return margins

    @field_validator("exclude_annotators", mode="before")
    @classmethod
    def _ids(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise ValueError("must be a list of annotator ids, not one string")
        return tuple(str(a) for a in value or ())  # ids may read as numbers from YAML


class SplitSettings(Settings):
    SECTION: ClassVar[str] = "split"
    salt: str
    fractions: dict[str, float]

    @field_validator("fractions", mode="before")
    @classmethod
    def _fractions(cls, value: Any) -> dict[str, float]:
        return check_fractions(value)  # its ConfigError names the split and the sum


class ValidateSettings(Settings):
    SECTION: ClassVar[str] = "validate"
    min_response_chars: int = Field(ge=0)
    max_response_chars: int
    chosen_longer_share: tuple[float, float]

    @model_validator(mode="after")
    def _bands(self) -> "ValidateSettings":
        if self.min_response_chars > self.max_response_chars:
            raise ValueError(
                "'validate.min_response_chars' and 'validate.max_response_chars' must satisfy "
                f"0 <= min <= max, got {self.min_response_chars} and {self.max_response_chars}")
        low, high = self.chosen_longer_share
        if not 0 <= low <= high <= 1:
            raise ValueError("'validate.chosen_longer_share' must be [low, high] with "
                             f"0 <= low <= high <= 1, got {list(self.chosen_longer_share)}")
        return self
