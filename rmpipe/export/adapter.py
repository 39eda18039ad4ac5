"""A LoRA run's adapter as a PEFT folder on the backbone (`export.save_adapter`), beside the merged export.

    model, tokenizer, max_length = load_adapter(export_dir / "adapter", backbone)   # what a user runs:
        base = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1)  (+ the export's pad)
        model = PeftModel.from_pretrained(base, export_dir / "adapter")

The folder holds the LoRA matrices (task SEQ_CLS) and the reward head as PEFT's `modules_to_save`
(`score`), so the head travels with the adapter (the OpenRLHF#873 trap), plus the export's tokenizer.
Its parity is checked like the merged export's: every golden reward within `export.parity_tolerance`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rmpipe.core.errors import DataError
from rmpipe.model.lora import ADAPTER_DIR

ADAPTER_EXPORT = "adapter"  # the folder inside the export


def sequence_classifier_base(backbone: str | Path, tokenizer, trust_remote_code: bool = False):
    """The plain backbone as `AutoModelForSequenceClassification` (num_labels=1) pooling by the export's pad id;
    the embeddings grow by the export's dedicated pad row when it added one (that row is never attended to)."""
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(
        str(backbone), num_labels=1, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id >= base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(tokenizer.pad_token_id + 1, mean_resizing=False)
    base.config.pad_token_id = tokenizer.pad_token_id
    return base


def write_adapter(folder: Path, model_dir: Path, backbone: str | Path, head: torch.Tensor, tokenizer,
                  trust_remote_code: bool = False) -> None:
    """`folder`: the trained adapter (models/reward_model/adapter/) re-keyed for a sequence classifier, the head as
    its `score`, and the tokenizer."""
    from peft import (
        LoraConfig,
        get_peft_model,
        load_peft_weights,
        set_peft_model_state_dict,
    )

    trained = Path(model_dir) / ADAPTER_DIR
    if not (trained / "adapter_config.json").exists():
        raise DataError(f"'export.save_adapter' is true but {model_dir} holds no LoRA adapter: "
                        "train with train.lora.r > 0, or set export.save_adapter: false")
    config = LoraConfig.from_pretrained(str(trained))
    config.task_type, config.modules_to_save = "SEQ_CLS", ["score"]
    base = sequence_classifier_base(backbone, tokenizer, trust_remote_code)
    model = get_peft_model(base, config)
    inner = f"base_model.model.{base.base_model_prefix}."  # the backbone sits one level down in the classifier
    weights = {inner + key.removeprefix("base_model.model."): value
               for key, value in load_peft_weights(str(trained)).items()}
    weights["base_model.model.score.weight"] = head.detach().float().cpu()
    result = set_peft_model_state_dict(model, weights)
    if result.unexpected_keys:
        raise DataError(f"the trained adapter does not fit backbone {backbone}: {result.unexpected_keys[:3]}")
    model.peft_config["default"].base_model_name_or_path = str(backbone)
    # the resized embedding (a pad row no token attends to) stays out: load_adapter grows the base the same way
    model.save_pretrained(str(folder), safe_serialization=True, save_embedding_layers=False)
    tokenizer.save_pretrained(str(folder))


def load_adapter(adapter_dir: Path, backbone: str | Path, trust_remote_code: bool = False):
    """(model, tokenizer, max_length) of an adapter export, loaded with PEFT on the plain backbone."""
    from peft import PeftModel

    from rmpipe.export.hf import exported_tokenizer

    tokenizer, max_length = exported_tokenizer(Path(adapter_dir), trust_remote_code)
    base = sequence_classifier_base(backbone, tokenizer, trust_remote_code)
    return PeftModel.from_pretrained(base, safetensors_adapter(adapter_dir)).eval(), tokenizer, max_length


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def safetensors_adapter(adapter_dir: Path) -> str:
    """The adapter folder, once it holds safetensors weights. PEFT's from_pretrained has no use_safetensors:
    it reads adapter_model.safetensors when present and falls back to a pickled adapter_model.bin."""
    if not (Path(adapter_dir) / ADAPTER_WEIGHTS).is_file():
        raise DataError(f"{adapter_dir} holds no {ADAPTER_WEIGHTS}: rmpipe loads adapters from safetensors only "
                        "(a pickled adapter_model.bin can run code)")
    return str(adapter_dir)
