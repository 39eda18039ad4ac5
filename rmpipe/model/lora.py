"""LoRA adapters on the backbone (PEFT); the reward head stays outside them and trains in full.

    W' = W + (alpha / r) B A     A: r x d_in (random), B: d_out x r (zero): step 0 scores like the backbone
    r(x, y) = w . h_T(x, y)      the head of rmpipe.model.reward_model, untouched by PEFT

    model = with_adapters(model, lora)        # only A, B and the head keep requires_grad
    save_backbone(model.backbone, folder)     # backbone/ with W' merged (plain transformers) + adapter/ (PEFT)

The adapters sit inside the backbone's linear layers, so the custom masks and position ids of the packed
layouts reach attention exactly as without them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rmpipe.core.errors import ConfigError
from rmpipe.core.settings import LoraSettings

ADAPTER_DIR = "adapter"  # the trained adapter folder inside models/reward_model/


def linear_names(backbone: nn.Module) -> list[str]:
    """The names LoRA can target: the last part of each nn.Linear's module path (q_proj, up_proj, ...)."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in backbone.named_modules()
                   if isinstance(module, nn.Linear)})


def check_targets(backbone: nn.Module, lora: LoraSettings) -> None:
    """Every `train.lora.target_modules` name must be a linear layer of this backbone."""
    valid = linear_names(backbone)
    unknown = [name for name in lora.target_modules if name not in valid]
    if unknown:
        raise ConfigError(
            f"params.yaml: 'train.lora.target_modules' names {unknown}, which backbone "
            f"{type(backbone).__name__} has no linear layer called: use some of {valid}")


def lora_config(lora: LoraSettings, **extra):
    """PEFT's LoraConfig for these settings (plain LoRA: no bias, no rsLoRA, no DoRA)."""
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules), bias="none", **extra)


def with_adapters(model, lora: LoraSettings):
    """The reward model with LoRA on its backbone (r 0: unchanged). The head is not wrapped, so it trains in full."""
    from peft import get_peft_model

    if not lora.r:
        return model
    check_targets(model.backbone, lora)
    model.backbone = get_peft_model(model.backbone, lora_config(lora))
    return model


def is_adapted(backbone: nn.Module) -> bool:
    return hasattr(backbone, "peft_config")


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    counts = [(p.numel(), p.requires_grad) for p in model.parameters()]
    return sum(n for n, grad in counts if grad), sum(n for n, _ in counts)


def merged_state_dict(backbone) -> dict[str, torch.Tensor]:
    """The plain backbone's state dict with each adapted weight W replaced by W + (alpha / r) B A (PEFT's own
    delta), without touching the live model: what merge_and_unload would save."""
    from peft.tuners.lora import LoraLayer

    base = backbone.get_base_model()
    merged = {}
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                weight = module.get_base_layer().weight
                merged[f"{name}.weight"] = (weight + module.get_delta_weight("default").to(weight.dtype)).detach()
        for name, tensor in base.state_dict().items():
            if ".lora_" not in name:
                merged.setdefault(name.replace(".base_layer.", "."), tensor.detach())
    return merged


def save_backbone(backbone, folder: Path, backbone_dir: str) -> None:
    """backbone_dir/ as a plain transformers model (adapters merged) and, when adapted, the PEFT adapter beside it."""
    folder = Path(folder)
    if not is_adapted(backbone):
        backbone.save_pretrained(folder / backbone_dir, safe_serialization=True)
        return
    backbone.save_pretrained(folder / ADAPTER_DIR, safe_serialization=True)
    backbone.get_base_model().save_pretrained(folder / backbone_dir, state_dict=merged_state_dict(backbone),
                                              safe_serialization=True)
