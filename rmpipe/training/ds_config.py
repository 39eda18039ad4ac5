"""The DeepSpeed config of a training run, generated from `params.yaml: train` (or read from a JSON file).

One optimizer step = one global batch of variable size (see `rmpipe.model.batching`), so as far as
DeepSpeed is concerned every rank feeds a micro-batch of 1 with no gradient accumulation. The
learning-rate schedule (warmup + cosine) is rmpipe's own `warmup_cosine`, handed to DeepSpeed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from rmpipe.core.errors import ConfigError
from rmpipe.core.settings import TrainSettings


def bf16_wanted(setting: bool | str, device_type: str) -> bool:
    """bf16 when asked for (true) or when `auto` and the accelerator supports it; never on CPU."""
    if device_type == "cpu" or setting is False:
        return False
    if setting == "auto":
        return device_type == "cuda" and torch.cuda.is_bf16_supported()
    return True


def build_config(s: TrainSettings, world_size: int, bf16: bool) -> dict[str, Any]:
    """A DeepSpeed config for `world_size` ranks (the lr schedule comes from `lr_scheduler`)."""
    offload = s.offload_optimizer  # TrainSettings refuses it with ZeRO stage 0
    zero: dict[str, Any] = {"stage": s.zero_stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "gradient_clipping": s.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": s.lr,
                "betas": [0.9, 0.95],
                "eps": 1e-8,
                "weight_decay": s.weight_decay,
                # Plain torch AdamW: FusedAdam needs a CUDA build; offload brings DeepSpeed's CPU Adam.
                **({} if offload else {"torch_adam": True}),
            },
        },
        "steps_per_print": 10**9,  # rmpipe logs its own metrics
        "wall_clock_breakdown": False,
    }


def warmup_steps(warmup_ratio: float, total_steps: int) -> int:
    return max(1, round(warmup_ratio * total_steps))


def warmup_cosine(step: int, total_steps: int, warmup: int, floor: float = 0.1) -> float:
    """lr multiplier of optimizer step `step` (0-based): linear warmup to 1, then cosine down to `floor`.

    The first step already learns (1 / (warmup + 1)); DeepSpeed's WarmupCosineLR starts at 0 and, stepped
    after each optimizer step, gives the first two steps lr 0.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup - 1))
    return floor + (1.0 - floor) * (1.0 + math.cos(math.pi * progress)) / 2.0


def lr_scheduler(warmup_ratio: float, total_steps: int):
    """For `deepspeed.initialize(lr_scheduler=...)`: builds the schedule on DeepSpeed's optimizer.

    Used when the DeepSpeed config has no `scheduler` of its own (a user's JSON may bring one).
    """
    from torch.optim.lr_scheduler import LambdaLR

    warmup = warmup_steps(warmup_ratio, total_steps)
    return lambda optimizer: LambdaLR(optimizer, lambda step: warmup_cosine(step, total_steps, warmup))


def load_config(path: str | Path, world_size: int) -> dict[str, Any]:
    """A user-supplied DeepSpeed JSON (`train.deepspeed_config`); batch keys forced to rmpipe's batching."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params.yaml: 'train.deepspeed_config' points at {path}, which does not exist")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    for key, value in {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                       "train_batch_size": world_size}.items():
        if config.get(key, value) not in (value, "auto"):
            raise ConfigError(f"{path}: '{key}' must be {value} (rmpipe batches by tokens), got {config[key]!r}")
        config[key] = value
    return config


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float, head_lr_mult: float) -> list[dict]:
    """AdamW groups: decayed matrices, undecayed norms/biases, and the head at `lr * head_lr_mult`."""
    decay, no_decay, head = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("head."):
            head.append(param)
        elif param.ndim < 2:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": head, "weight_decay": weight_decay, "lr": lr * head_lr_mult},
    ]
    return [g for g in groups if g["params"]]
