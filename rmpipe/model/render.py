"""Text to token ids, the one way: used by training (through the tokenize stage), evaluation, export and scoring.

The prompt (canonical chat JSON, see `rmpipe.core.schema`) plus the response as an assistant turn go through the
backbone's own chat template, are encoded without added special tokens, and are cut from the left to
`model.max_length` (the reward is read at the end). Any drift between how training and scoring render text
silently changes rewards, so nothing else in rmpipe builds model input by hand.

    render / encode              one (prompt, response): the text scored, its ids
    truncate_left                the length rule
    encode_rows                  many rows for scoring (evaluation, export parity, `rmpipe score`)
    tokenize_pairs / _splits     preference pairs for training: chosen + rejected ids, targets, groups
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import pandas as pd

from rmpipe.core.schema import prompt_messages
from rmpipe.model.batching import TokenizedPairs

log = logging.getLogger("rmpipe.render")


def conversation(prompt: str, response: str) -> list[dict[str, str]]:
    return prompt_messages(prompt) + [{"role": "assistant", "content": response}]


def render(tokenizer, prompt: str, response: str) -> str:
    """The exact text the reward model scores for this prompt and response."""
    return tokenizer.apply_chat_template(conversation(prompt, response), tokenize=False)


def encode(tokenizer, prompt: str, response: str) -> list[int]:
    """Token ids of `render(...)`; the template already holds every special token, so none are added.

    Rows longer than `model.max_length` are left-truncated and counted by the caller, so transformers'
    "will result in indexing errors" warning about them would be wrong: verbose=False."""
    return tokenizer(render(tokenizer, prompt, response), add_special_tokens=False, verbose=False)["input_ids"]


def truncate_left(ids: list[int], max_length: int) -> tuple[list[int], bool]:
    """Keep the last `max_length` ids: the reward is read at the end, where the template's final tokens are."""
    if len(ids) <= max_length:
        return ids, False
    return ids[-max_length:], True


def group_ids(frame: pd.DataFrame) -> np.ndarray:
    """Dense group id per pair: pairs with one `prompt_hash` (the prompt itself where there is none) share one.

    Built here, from the split, so no upstream stage has to know about groups; the split keeps a prompt in
    one split, so a group never straddles splits."""
    if frame.empty:
        return np.zeros(0, np.int64)
    key = frame["prompt"].map(lambda p: f"prompt:{p}")
    if "prompt_hash" in frame:
        key = frame["prompt_hash"].map(lambda h: f"hash:{h}", na_action="ignore").fillna(key)
    return pd.factorize(key, sort=False)[0].astype(np.int64)


def tokenize_pairs(tokenizer, frame: pd.DataFrame, max_length: int) -> TokenizedPairs:
    """Render and encode every pair (via `rmpipe.model.render.encode`), left-truncating and counting long ones."""
    chosen, rejected, n_truncated, n_rows = [], [], 0, 0
    for prompt, good, bad in zip(frame["prompt"], frame["chosen"], frame["rejected"]):
        c, cut_c = truncate_left(encode(tokenizer, prompt, good), max_length)
        r, cut_r = truncate_left(encode(tokenizer, prompt, bad), max_length)
        chosen.append(c)
        rejected.append(r)
        n_truncated += cut_c or cut_r
        n_rows += cut_c + cut_r
    if n_truncated:
        log.warning("%d of %d pairs are longer than max_length=%d: left-truncated (their ends kept)",
                    n_truncated, len(frame), max_length)
    return TokenizedPairs(
        chosen=chosen,
        rejected=rejected,
        margin=frame["margin"].to_numpy(dtype=np.float32, na_value=np.nan) if "margin" in frame else
        np.zeros(len(frame), np.float32),
        soft_label=frame["soft_label"].to_numpy(dtype=np.float32) if "soft_label" in frame else
        np.ones(len(frame), np.float32),
        pair_ids=[str(p) for p in frame["pair_id"]] if "pair_id" in frame else [],
        n_truncated=n_truncated,
        group=group_ids(frame),
        n_truncated_rows=n_rows,
    )


def encode_rows(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_length: int) -> tuple[list[list[int]], int]:
    """Token rows through the chat template, left-truncated to `max_length`; also how many were truncated."""
    rows, truncated = [], 0
    for prompt, response in zip(prompts, responses, strict=True):
        ids, cut = truncate_left(encode(tokenizer, prompt, response), max_length)  # the training rule
        rows.append(ids)
        truncated += cut
    return rows, truncated


def tokenize_splits(tokenizer, frames: dict[str, pd.DataFrame], max_length: int) -> dict[str, TokenizedPairs]:
    return {name: tokenize_pairs(tokenizer, frame, max_length) for name, frame in frames.items()}
