"""Every section of params.yaml as one frozen, validated settings object: the one place params are read.

A stage parses the sections it uses once, at its entry (`TrainSettings.parse(params)`), and passes
the objects down; nothing below a stage reads params.yaml or a raw section dict. The classes are
pydantic models (strict types: `true` is no number, `"0.1"` no float; unknown keys refused, so a typo
is caught instead of silently falling back to a default). Any mistake becomes one `ConfigError`
line naming the key and what to write instead; no pydantic traceback reaches the user.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
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


# --- model: the backbone under the reward head ------------------------------------------------
class TinySettings(Settings):
    SECTION: ClassVar[str] = "model.tiny"
    vocab_size: int
    hidden_size: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)
    num_hidden_layers: int = Field(ge=1)
    num_attention_heads: int = Field(ge=1)
    num_key_value_heads: int = Field(ge=1)
    seed: int = 0


class ModelSettings(Settings):
    """`model:`; the only reader of `max_length` and `trust_remote_code`."""

    SECTION: ClassVar[str] = "model"
    backbone: str = "tiny"
    head_init: Literal["normal", "zero"] = "normal"
    max_length: int = Field(ge=8)  # tokens per rendered (prompt + response); longer rows are left-truncated
    trust_remote_code: bool = False
    tiny: TinySettings | None = None  # only for backbone: tiny

    @field_validator("backbone")
    @classmethod
    def _named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is empty: use tiny, smollm2-135m-instruct, a folder or a hub id")
        return value.strip()

    @model_validator(mode="after")
    def _tiny_given(self) -> "ModelSettings":
        if self.backbone == "tiny" and self.tiny is None:
            raise ValueError("'model.tiny' is missing: backbone tiny needs its sizes (see params.yaml)")
        return self


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


class SamplingSettings(Settings):
    """`sampling:` (`rmpipe sample-pairs`)."""

    SECTION: ClassVar[str] = "sampling"
    n_completions: int = Field(ge=2)  # a pair at least
    temperature: float = Field(gt=0)
    top_p: float = Field(gt=0, le=1)
    max_new_tokens: int = Field(ge=1)
    seed: int


# --- training and after ------------------------------------------------------------------------
class LoraSettings(Settings):
    """`train.lora:` LoRA adapters W + (alpha / r) B A on the backbone (PEFT); r 0 trains every weight."""

    SECTION: ClassVar[str] = "train.lora"
    r: int = Field(0, ge=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")  # names are checked on the backbone

    @model_validator(mode="after")
    def _targets(self) -> "LoraSettings":
        if self.r and not self.target_modules:
            raise ValueError("'train.lora.target_modules' is empty: name the backbone's linear layers to adapt")
        return self


class TrainSettings(Settings):
    """`train:` (DeepSpeed reward-model training)."""

    SECTION: ClassVar[str] = "train"
    seed: int
    epochs: int = Field(ge=1)
    lr: float = Field(gt=0)
    head_lr_mult: float
    weight_decay: float
    warmup_ratio: float = Field(ge=0, le=1)
    grad_clip: float
    tokens_per_batch: int = Field(ge=1)
    max_pairs_per_batch: int = Field(ge=1)
    use_margin: bool
    use_soft_labels: bool
    center_coef: float
    bf16: bool | Literal["auto"]
    gradient_checkpointing: bool
    zero_stage: Literal[0, 1, 2, 3]
    offload_optimizer: bool
    deepspeed_config: str | None
    num_procs: int = Field(ge=1)
    hostfile: str | None
    checkpoint_every: int = Field(ge=1)
    max_nonfinite_steps: int
    packing: Literal["auto", "none", "padding_free", "shared_prompt", "groups"]  # auto: resolved before training
    loss_weighting: Literal["pair", "group"] = "pair"  # pair: every comparison counts once; group: every prompt
    stop_after_steps: int | None = None  # debug hook: stop as if killed after this many steps
    lora: LoraSettings = LoraSettings()  # r 0: full fine-tuning

    @field_validator("bf16", mode="before")
    @classmethod
    def _bf16(cls, value: Any) -> Any:
        if value not in (True, False, "auto") or isinstance(value, int) and not isinstance(value, bool):
            raise ValueError(f"must be true, false or auto, got {value!r}")
        return value

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> "TrainSettings":
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("'train.offload_optimizer' needs 'train.zero_stage' 1, 2 or 3")
        return self

    @field_validator("zero_stage", mode="before")
    @classmethod
    def _stage(cls, value: Any) -> Any:
        if isinstance(value, bool):  # `true` == 1 to a Literal
            raise ValueError(f"must be one of 0, 1, 2 or 3, got {value!r}")
        return value


class EvalSettings(Settings):
    """`evaluate:`; thresholds decide `passed`."""

    SECTION: ClassVar[str] = "evaluate"
    batch_size: int = Field(ge=1)
    min_accuracy: float = Field(ge=0, le=1)
    max_ece: float = Field(ge=0, le=1)
    max_length_r2: float = Field(ge=0, le=1)
    battery_file: str
    battery_min_margin: float
    max_battery_failures: int = Field(ge=0)
    canary_rows: int = Field(ge=2)
    canary_tolerance: float = Field(ge=0)
    calibration_bins: int = Field(ge=1)
    calibration_min_pairs: int = Field(default=20, ge=1)  # the curve merges a smaller bin into its neighbour
    agreement_edges: tuple[float, ...]
    length_buckets: int = Field(ge=1)

    @field_validator("agreement_edges")
    @classmethod
    def _increasing(cls, edges: tuple[float, ...]) -> tuple[float, ...]:
        if len(edges) < 2 or list(edges) != sorted(edges):
            raise ValueError("must be at least two increasing numbers")
        return edges


class ExportSettings(Settings):
    """`export:` (verified Hugging Face folder, promotion gate)."""

    SECTION: ClassVar[str] = "export"
    out_dir: Path
    promoted_dir: Path
    parity_tolerance: float = Field(gt=0)  # max |reward(exported) - reward(trained)| on the golden set
    golden_pairs: int = Field(ge=1)
    promotion_tolerance: float = Field(ge=0)  # the gate's margin: refused only when significantly worse by more
    promotion_alpha: float = Field(default=0.05, gt=0, lt=1)  # one-sided level of the gate's paired test
    max_battery_regressions: int = Field(default=0, ge=0)  # battery pairs prod orders right and the candidate wrong
    save_adapter: bool = False  # a LoRA run: also the adapter folder (PeftModel.from_pretrained on the backbone)

    @field_validator("out_dir", "promoted_dir", mode="before")
    @classmethod
    def _path(cls, value: Any) -> Any:
        return Path(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _distinct(self) -> "ExportSettings":
        if self.out_dir.resolve() == self.promoted_dir.resolve():
            raise ValueError("'export.out_dir' and 'export.promoted_dir' must differ")
        return self
