"""`rmpipe score`: rewards from an exported model for a JSONL file of prompts and responses.

    rmpipe score models/export --input rows.jsonl [--output scores.jsonl]

Each row has `prompt` and either `response` (gets `reward`) or `chosen` + `rejected` (get
`reward_chosen`, `reward_rejected` and `margin`); every other field is echoed back as given.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from rmpipe.core.errors import DataError
from rmpipe.evaluation.evaluate import reward_fn_of, score_token_rows
from rmpipe.export.hf import load_exported
from rmpipe.model.render import encode_rows

log = logging.getLogger("rmpipe.export")


def read_score_input(path: Path) -> list[dict]:
    """JSONL rows with `prompt` and either `response` or `chosen` + `rejected`; a bad row names its line."""
    from rmpipe.core.schema import PromptError, canonical_prompt

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} not found")
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = canonical_prompt(row["prompt"])
        except (json.JSONDecodeError, TypeError, KeyError, PromptError) as exc:
            raise DataError(f"{path}:{line_no}: need a JSON object with a prompt ({type(exc).__name__}: {exc})") from None
        keys = ("response",) if "response" in row else ("chosen", "rejected")
        if not all(isinstance(row.get(k), str) for k in keys):
            raise DataError(f"{path}:{line_no}: need string 'response', or 'chosen' and 'rejected'")
        rows.append({**row, "_canonical": prompt, "_keys": keys})  # the prompt is echoed back as given
    return rows


def score_file(export_dir: Path, input_path: Path, batch_size: int = 16) -> list[dict]:
    """Each input row with `reward` (or `reward_chosen`, `reward_rejected`, `margin`) from the exported model."""
    hf, tokenizer, max_length = load_exported(export_dir)
    rows = read_score_input(input_path)
    prompts, responses, where = [], [], []
    for i, row in enumerate(rows):
        for key in row["_keys"]:
            prompts.append(row["_canonical"])
            responses.append(row[key])
            where.append((i, key))
    tokens, truncated = encode_rows(tokenizer, prompts, responses, max_length)
    if truncated:
        log.warning("%d responses longer than %d tokens were left-truncated", truncated, max_length)
    rewards = score_token_rows(reward_fn_of(hf), tokens, tokenizer.pad_token_id, batch_size)
    out = [{k: v for k, v in row.items() if k not in ("_keys", "_canonical")} for row in rows]
    for (i, key), reward in zip(where, rewards):
        out[i]["reward" if key == "response" else f"reward_{key}"] = float(reward)
    for row in out:
        if "reward_chosen" in row:
            row["margin"] = row["reward_chosen"] - row["reward_rejected"]
    return out
