"""Tokenize preference pairs once, then group them into length-bucketed batches under a token budget.

A *global batch* is what one optimizer step sees. Its cost is the tokens the model computes for
it in the chosen layout (`rmpipe.packing`): for the stacked layout, the padded `2B x T` tensor
(chosen rows on top of rejected rows, right-padded to the longest row); for the packed layouts,
the sum of the pairs' own tokens. Pairs of similar length go together either way, so little
compute is spent on padding and packed rows come out nearly full.

With W DeepSpeed ranks, every global batch is split into W shards (rank r takes rows r, r+W, ...
of the length-sorted batch). Every rank therefore runs the same number of steps per epoch with
about the same number of tokens, and the optimisation is the same for any W: the loss of each
shard is weighted by its share of the global batch (see `shard_weight`).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from rmpipe.packing import common_prefix_length
from rmpipe.render import encode

log = logging.getLogger("rmpipe.batching")


@dataclass
class TokenizedPairs:
    """Token ids of every pair's chosen and rejected rendering, plus its training targets."""

    chosen: list[list[int]]
    rejected: list[list[int]]
    margin: np.ndarray  # float32, one per pair
    soft_label: np.ndarray  # float32, one per pair
    pair_ids: list[str] = field(default_factory=list)
    n_truncated: int = 0  # pairs where chosen or rejected was cut to max_length
    prefix: np.ndarray | None = None  # int64 per pair: tokens shared by chosen and rejected (the prompt)

    def __post_init__(self) -> None:
        if self.prefix is None:
            self.prefix = np.array([common_prefix_length(c, r) for c, r in zip(self.chosen, self.rejected)],
                                   dtype=np.int64)

    def __len__(self) -> int:
        return len(self.chosen)

    def lengths(self) -> np.ndarray:
        """Per pair, the longer of its two rows: the T it forces on a stacked batch."""
        return np.array([max(len(c), len(r)) for c, r in zip(self.chosen, self.rejected)], dtype=np.int64)

    def tokens(self, packing: str) -> np.ndarray:
        """Per pair, the tokens layout `packing` computes for it (stacked: its longer row, padded later)."""
        if packing == "none":
            return self.lengths()
        both = np.array([len(c) + len(r) for c, r in zip(self.chosen, self.rejected)], dtype=np.int64)
        return both - self.prefix if packing == "shared_prompt" else both


def truncate_left(ids: list[int], max_length: int) -> tuple[list[int], bool]:
    """Keep the last `max_length` ids: the reward is read at the end, where the template's final tokens are."""
    if len(ids) <= max_length:
        return ids, False
    return ids[-max_length:], True


def tokenize_pairs(tokenizer, frame: pd.DataFrame, max_length: int) -> TokenizedPairs:
    """Render and encode every pair (via `rmpipe.render.encode`), left-truncating and counting long ones."""
    chosen, rejected, n_truncated = [], [], 0
    for prompt, good, bad in zip(frame["prompt"], frame["chosen"], frame["rejected"]):
        c, cut_c = truncate_left(encode(tokenizer, prompt, good), max_length)
        r, cut_r = truncate_left(encode(tokenizer, prompt, bad), max_length)
        chosen.append(c)
        rejected.append(r)
        n_truncated += cut_c or cut_r
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
    )


def padded_tokens(lengths: np.ndarray, rows: list[int]) -> int:
    """Cost of a stacked batch: 2B x T, T the longest row in it."""
    return 2 * len(rows) * int(lengths[rows].max()) if rows else 0


def plan_batches(
    lengths: np.ndarray,
    tokens_per_batch: int,
    max_pairs_per_batch: int,
    seed: int,
    epoch: int = 0,
    shuffle: bool = True,
    min_pairs: int = 1,
    packed_tokens: np.ndarray | None = None,
) -> list[list[int]]:
    """Global batches of pair indices for one epoch; every pair exactly once; same inputs, same plan.

    Pairs are ordered by `lengths` (the longer row of each pair) in every layout, so a budget that
    does not bind gives the same batches whichever layout computes them. A batch's cost is its padded
    stack, or with `packed_tokens` (`TokenizedPairs.tokens(packing)`) the sum of its pairs' tokens.

    Pairs are sorted by length (ties broken by a seeded random key, so neighbours change between
    epochs) and cut greedily where the next pair would break the budget or the pair cap; the batch
    order is then shuffled with `seed + epoch`. A batch holds at least `min_pairs` pairs (the number
    of ranks), even if that alone exceeds the budget; a short tail joins the batch before it.
    """
    n = len(lengths)
    if n == 0:
        return []
    rng = np.random.default_rng([seed, epoch])
    tiebreak = rng.random(n) if shuffle else np.arange(n)
    order = np.lexsort((tiebreak, lengths))
    batches: list[list[int]] = []
    current: list[int] = []
    for idx in order.tolist():
        grown = current + [idx]
        cost = padded_tokens(lengths, grown) if packed_tokens is None else int(packed_tokens[grown].sum())
        too_big = cost > tokens_per_batch or len(grown) > max_pairs_per_batch
        if current and too_big and len(current) >= min_pairs:
            batches.append(current)
            current = [idx]
        else:
            current = grown
    if len(current) < min_pairs and batches:
        batches[-1].extend(current)
    else:
        batches.append(current)
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(batches)
    return batches


def shard(batch: list[int], lengths: np.ndarray, rank: int, world_size: int) -> list[int]:
    """This rank's share of a global batch: every W-th pair of the length-sorted batch (balanced tokens)."""
    by_length = sorted(batch, key=lambda i: (lengths[i], i))
    return by_length[rank::world_size]


def shard_weight(n_shard: int, n_global: int, world_size: int) -> float:
    """Scale on a shard's mean loss so DeepSpeed's mean over ranks equals the mean over the global batch."""
    return n_shard * world_size / n_global
