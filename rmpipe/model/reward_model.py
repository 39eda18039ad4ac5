"""The reward model, next to its equations.

    r(x, y)  = w . h_T(x, y)          h_T: backbone state at the last *real* token, w in R^d, no bias
    loss     = -log s(r_c - r_r - m)   Bradley-Terry (s = sigmoid), optional per-pair margin m (Llama-2)
    soft     = -(p log s(d) + (1 - p) log s(-d)),  d = r_c - r_r - m,  p = share of votes for chosen
    centre   = lambda * (r_c + r_r)^2  optional reward-centering term (keeps rewards near 0)

The last real token is found from the attention mask, never from `pad_token_id`: a
tokenizer whose pad token equals its EOS token (SmolLM2, Llama-3, ...) would otherwise
pool the wrong position and pin the loss at ln 2.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HEAD_FILE = "head.safetensors"
CONFIG_FILE = "reward_model.json"
BACKBONE_DIR = "backbone"


# --- pooling --------------------------------------------------------------------------------
def last_real_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of `attention_mask` (B, T): right or left padding alike."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=-1)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only, so left padding does not shift positions."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def pool_last_real_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, d) states -> (B, d) states at each row's last real token."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, last_real_token_index(attention_mask)]


# --- head -----------------------------------------------------------------------------------
def make_head(hidden_size: int, init: str = "normal", generator: torch.Generator | None = None) -> nn.Linear:
    """`Linear(d, 1, bias=False)`, initialised N(0, 1/d) ("normal") or to zero ("zero")."""
    head = nn.Linear(hidden_size, 1, bias=False)
    with torch.no_grad():
        if init == "normal":
            head.weight.normal_(0.0, 1.0 / math.sqrt(hidden_size), generator=generator)
        elif init == "zero":
            head.weight.zero_()
        else:
            raise ValueError(f"head init must be 'normal' or 'zero', got {init!r}")
    return head


# --- loss -----------------------------------------------------------------------------------
def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    soft_label: torch.Tensor | None = None,
    center_coef: float = 0.0,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean Bradley-Terry loss over a batch of pairs (see module docstring); `logsigmoid` keeps it finite.

    `weight` (one per pair) makes it the weighted mean sum(w * loss) / sum(w), e.g. 1 / (pairs of the
    prompt) so that each prompt counts once (InstructGPT)."""
    d = r_chosen - r_rejected
    if margin is not None:
        d = d - margin
    if soft_label is None:
        loss = -F.logsigmoid(d)
    else:
        p = soft_label
        loss = -(p * F.logsigmoid(d) + (1 - p) * F.logsigmoid(-d))
    if center_coef:
        loss = loss + center_coef * (r_chosen + r_rejected) ** 2
    if weight is not None:
        return (weight * loss).sum() / weight.sum()
    return loss.mean()


# --- model ----------------------------------------------------------------------------------
@dataclass
class RewardModelConfig:
    hidden_size: int
    head_init: str = "normal"
    pooling: str = "last_real_token_from_attention_mask"


class RewardModel(nn.Module):
    """A Hugging Face backbone without its LM head, plus a bias-free linear head read at the last real token."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.head = head

    @classmethod
    def from_backbone(cls, backbone: nn.Module, head_init: str = "normal", seed: int = 0) -> "RewardModel":
        generator = torch.Generator().manual_seed(seed)
        return cls(backbone, make_head(backbone.config.hidden_size, head_init, generator))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        read_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rewards from padded rows or from packed rows (`rmpipe.model.packing`).

        padded: (B, T) ids and 0/1 mask -> (B,) rewards, each read at its row's last real token.
        packed: (R, W) ids, (R, 1, W, W) bool mask (who sees whom), (R, W) positions and (N,) flat
                indices into the R x W positions -> (N,) rewards read there.
        """
        if read_at is None:
            position_ids = positions_from_mask(attention_mask)
        else:
            attention_mask = self._backbone_mask(attention_mask)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False)
        if read_at is None:
            pooled = pool_last_real_token(out.last_hidden_state, attention_mask)
        else:
            pooled = out.last_hidden_state.flatten(0, 1)[read_at]
        return self.head(pooled.to(self.head.weight.dtype)).squeeze(-1)

    def _backbone_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """SDPA takes a boolean mask as is; eager attention adds the mask to its scores."""
        if getattr(self.backbone.config, "_attn_implementation", "sdpa") != "eager":
            return allowed
        dtype = next(self.backbone.parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)

    def score_pairs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass over chosen rows stacked on rejected rows (2B, T) -> (r_chosen, r_rejected)."""
        rewards = self(input_ids, attention_mask)
        r_chosen, r_rejected = rewards.chunk(2)
        return r_chosen, r_rejected

    # --- persistence: safetensors only ------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        """backbone/ (LoRA adapters merged in: a plain transformers model; the adapter in adapter/), head, config."""
        from safetensors.torch import save_file

        from rmpipe.model.lora import save_backbone

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_backbone(self.backbone, path, BACKBONE_DIR)
        save_file({"weight": self.head.weight.detach().contiguous().cpu()}, str(path / HEAD_FILE))
        config = RewardModelConfig(hidden_size=self.head.in_features)
        (path / CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        trust_remote_code: bool = False) -> "RewardModel":
        from safetensors.torch import load_file
        from transformers import AutoModel

        path = Path(path)
        config = RewardModelConfig(**json.loads((path / CONFIG_FILE).read_text(encoding="utf-8")))
        backbone = AutoModel.from_pretrained(path / BACKBONE_DIR, dtype=dtype, trust_remote_code=trust_remote_code,
                                           use_safetensors=True)
        head = make_head(config.hidden_size, "zero")
        head.load_state_dict(load_file(str(path / HEAD_FILE)))
        return cls(backbone, head.to(dtype))
