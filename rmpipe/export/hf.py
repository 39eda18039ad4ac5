"""A trained RewardModel as a plain Hugging Face `*ForSequenceClassification` model, and the proof that it scores alike.

    hf, tokenizer = to_sequence_classifier(model, tokenizer, sample_rows)
    hf, tokenizer, max_length = load_exported(folder)        # what any downstream user runs
    parity(folder, golden, max_length, batch_size)           # re-scores the golden set, both padding sides

Plain transformers finds the scored token as the last one that is not `pad_token_id`.
That equals our attention-mask pooling only if the pad token never occurs in rendered
text, so a tokenizer whose pad is its EOS / end-of-turn token (SmolLM2) gets a new,
dedicated pad token (embeddings resized; the new row is never attended to).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from rmpipe.core.errors import DataError
from rmpipe.evaluation.evaluate import reward_fn_of, score_token_rows
from rmpipe.model.render import encode_rows

log = logging.getLogger("rmpipe.export")

EXPORT_PAD = "<|rm_pad|>"
GOLDEN_FILE = "golden.jsonl"


# --- RewardModel -> *ForSequenceClassification ------------------------------------------------
def pad_is_safe(tokenizer, sample_rows: list[list[int]]) -> bool:
    """A pad id is safe for pad-id pooling when it is set, is no eos/bos, and never appears in rendered rows."""
    pad = tokenizer.pad_token_id
    if pad is None or pad in {tokenizer.eos_token_id, tokenizer.bos_token_id}:
        return False
    return all(pad not in row for row in sample_rows)


def to_sequence_classifier(model, tokenizer, sample_rows: list[list[int]], trust_remote_code: bool = False):
    """(hf_model, tokenizer): our backbone + head as `AutoModelForSequenceClassification`, num_labels=1.

    Works on copies; `sample_rows` (rendered golden rows) prove whether the current pad token is safe.
    """
    from transformers import AutoModelForSequenceClassification

    tokenizer = copy.deepcopy(tokenizer)
    if not pad_is_safe(tokenizer, sample_rows):
        log.info("pad token %r is not safe for pad-id pooling (it is eos/bos or occurs in rendered text): "
                 "adding dedicated pad %r", tokenizer.pad_token, EXPORT_PAD)
        tokenizer.add_special_tokens({"pad_token": EXPORT_PAD})
    config = copy.deepcopy(model.backbone.config)
    config.num_labels = 1
    config.architectures = None  # filled in by save_pretrained from the class
    hf = AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)  # config's own pad id: in range until resized
    score = getattr(hf, "score", None)
    if not isinstance(score, torch.nn.Linear) or score.bias is not None:
        raise DataError(f"{type(hf).__name__} has no bias-free `score` head: this architecture cannot be exported")
    hf.base_model.load_state_dict(model.backbone.state_dict(), strict=True)
    with torch.no_grad():
        score.weight.copy_(model.head.weight)
    rows = hf.get_input_embeddings().num_embeddings
    if tokenizer.pad_token_id >= rows:
        hf.resize_token_embeddings(tokenizer.pad_token_id + 1, mean_resizing=False)
        with torch.no_grad():  # the pad row is never attended to; zero keeps the file deterministic
            hf.get_input_embeddings().weight[tokenizer.pad_token_id].zero_()
    hf.config.pad_token_id = tokenizer.pad_token_id  # what plain transformers pools by
    return hf.float().eval(), tokenizer


def exported_tokenizer(export_dir: Path, trust_remote_code: bool = False):
    """(tokenizer, max_length) of an export. rmpipe encodes whole rows then left-truncates to max_length,
    so the tokenizer's own limit is lifted here to keep it from warning about rows it never truncates."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export_dir, trust_remote_code=trust_remote_code)
    max_length = int(tokenizer.model_max_length)
    tokenizer.model_max_length = int(1e30)
    return tokenizer, max_length


def load_exported(export_dir: Path, trust_remote_code: bool = False):
    """(model, tokenizer, max_length) of an export with plain transformers: what any downstream user would run."""
    from transformers import AutoModelForSequenceClassification

    export_dir = Path(export_dir)
    if not (export_dir / "config.json").exists():
        raise DataError(f"{export_dir} is not an exported model (no config.json): run the export stage first")
    hf = AutoModelForSequenceClassification.from_pretrained(export_dir, dtype=torch.float32, use_safetensors=True,
                                                            trust_remote_code=trust_remote_code).eval()
    return (hf, *exported_tokenizer(export_dir, trust_remote_code))


# --- golden set -------------------------------------------------------------------------------
def golden_rows(test: pd.DataFrame, battery: list[dict], n_pairs: int, eos_token: str | None) -> list[dict]:
    """Prompt/response rows the export must score like the trained model: test pairs, battery, an eos-in-text row."""
    rows = []
    for source, frame in (("test", test.head(n_pairs)), ("battery", pd.DataFrame(battery))):
        for pair in frame.itertuples(index=False):
            rows.append({"source": source, "prompt": pair.prompt, "response": pair.chosen})
            rows.append({"source": source, "prompt": pair.prompt, "response": pair.rejected})
    if eos_token and rows:  # the pad == eos trap: eos inside the text must not end the scored sequence early
        rows.append({"source": "eos_in_text", "prompt": rows[0]["prompt"],
                     "response": f"First part.{eos_token}\nSecond part after the end-of-turn token."})
    return rows


def parity(export_dir: Path, golden: list[dict], max_length: int, batch_size: int,
           trust_remote_code: bool = False, loaded: tuple | None = None) -> dict:
    """Re-load the export with plain transformers (or take `loaded`: (model, tokenizer, ...) loaded another way,
    e.g. an adapter with PEFT) and re-score `golden`, right- and left-padded."""
    hf, tokenizer, *_ = loaded or load_exported(export_dir, trust_remote_code)
    rows, _ = encode_rows(tokenizer, [g["prompt"] for g in golden], [g["response"] for g in golden], max_length)
    expected = np.array([g["reward"] for g in golden])
    diffs = {}
    for side in ("right", "left"):
        got = score_token_rows(reward_fn_of(hf), rows, tokenizer.pad_token_id, batch_size, side)
        diffs[side] = float(np.max(np.abs(got - expected)))
    return {"n_rows": len(golden), "max_abs_diff": max(diffs.values()), "by_padding_side": diffs,
            "pad_token": tokenizer.pad_token, "pad_in_text": any(tokenizer.pad_token_id in r for r in rows)}


def load_golden(export_dir: Path) -> list[dict]:
    path = Path(export_dir) / GOLDEN_FILE
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
