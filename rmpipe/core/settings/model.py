"""The model's sections: `model:` (the backbone), `sampling:`, `train:` (LoRA included), `evaluate:`, `export:`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from rmpipe.core.settings.base import (
    Settings,
)


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
