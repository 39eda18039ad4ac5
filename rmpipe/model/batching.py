"""Tokenized preference pairs (`TokenizedPairs`, made by `rmpipe.model.render.tokenize_pairs`) grouped into
length-bucketed batches under a token budget.

A *global batch* is what one optimizer step sees. Its cost is the tokens the model computes for
it in the chosen layout (`rmpipe.model.packing`): for the stacked layout, the padded `2B x T` tensor
(chosen rows on top of rejected rows, right-padded to the longest row); for the packed layouts,
the sum of the pairs' own tokens. Pairs of similar length go together either way, so little
compute is spent on padding and packed rows come out nearly full.

The planner packs *units*: one pair each, or for the `groups` layout the pairs of one prompt (a
group; cut into sub-groups where a whole group would exceed the budget), so a batch holds whole
groups and each group's prompt is computed once.

With W DeepSpeed ranks, every global batch is split into W shards (rank r takes units r, r+W, ...
of the length-sorted batch). Every rank therefore runs the same number of steps per epoch with
about the same number of tokens, and the optimisation is the same for any W: the loss of each
shard is weighted by its share of the global batch (see `shard_weight`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from rmpipe.model.packing import common_prefix_length, group_members, group_tokens


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
    group: np.ndarray | None = None  # int64 per pair: pairs of one prompt share an id (default: one pair each)
    n_truncated_rows: int = 0  # sequences (chosen or rejected) cut to max_length

    def __post_init__(self) -> None:
        if self.prefix is None:
            self.prefix = np.array([common_prefix_length(c, r) for c, r in zip(self.chosen, self.rejected)],
                                   dtype=np.int64)
        if self.group is None:
            self.group = np.arange(len(self.chosen), dtype=np.int64)

    def has_groups(self) -> bool:
        """True when some prompt has two or more pairs (the `groups` layout has something to share)."""
        return len(np.unique(self.group)) < len(self.group)

    def pair_weights(self, weighting: str) -> np.ndarray:
        """Loss weight per pair: 1 each ("pair"), or 1 / (pairs of its prompt) ("group": each prompt counts once)."""
        if weighting == "pair":
            return np.ones(len(self), np.float32)
        _, inverse, counts = np.unique(self.group, return_inverse=True, return_counts=True)
        return (1.0 / counts[inverse]).astype(np.float32)

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
        return both - self.prefix if packing in ("shared_prompt", "groups") else both

    def units(self, packing: str, tokens_per_batch: int, max_pairs: int | None = None) -> "Units":
        """What the planner packs in layout `packing`: single pairs, or (`groups`) each prompt's pairs,
        cut greedily into sub-groups of at most `tokens_per_batch` tokens and `max_pairs` pairs (a single
        pair may exceed the budget)."""
        if packing != "groups":
            return Units([[i] for i in range(len(self))], self.lengths(), self.tokens(packing))
        members, tokens = [], []
        for group in group_members(self.group, list(range(len(self)))):
            current: list[int] = []
            for i in group:
                grown = current + [i]
                cost = group_tokens([s for k in grown for s in (self.chosen[k], self.rejected[k])])
                if current and (cost > tokens_per_batch or max_pairs is not None and len(grown) > max_pairs):
                    members.append(current)
                    current = [i]
                else:
                    current = grown
            members.append(current)
        for m in members:
            tokens.append(group_tokens([s for k in m for s in (self.chosen[k], self.rejected[k])]))
        lengths = self.lengths()
        return Units(members, np.array([lengths[m].max() for m in members], dtype=np.int64),
                     np.array(tokens, dtype=np.int64))


@dataclass
class Units:
    """The planner's items: `members[u]` are the pair indices of unit u, with its sort length and token cost."""

    members: list[list[int]]
    lengths: np.ndarray  # the longest sequence in the unit (the sort key; a stacked batch's T)
    tokens: np.ndarray  # tokens the layout computes for the unit

    def sizes(self) -> np.ndarray:
        return np.array([len(m) for m in self.members], dtype=np.int64)

    def first_pair(self) -> np.ndarray:
        return np.array([m[0] for m in self.members], dtype=np.int64)

    def rows(self, units: list[int]) -> list[int]:
        """The pair indices of `units`, in order."""
        return [i for u in units for i in self.members[u]]


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
    sizes: np.ndarray | None = None,
    first_pair: np.ndarray | None = None,
) -> list[list[int]]:
    """Global batches of pair indices for one epoch; every pair exactly once; same inputs, same plan.

    Pairs are ordered by `lengths` (the longer row of each pair) in every layout, so a budget that
    does not bind gives the same batches whichever layout computes them. A batch's cost is its padded
    stack, or with `packed_tokens` (`TokenizedPairs.tokens(packing)`) the sum of its pairs' tokens.

    Pairs are sorted by length (ties broken by a seeded random key, so neighbours change between
    epochs) and cut greedily where the next pair would break the budget or the pair cap; the batch
    order is then shuffled with `seed + epoch`. A batch holds at least `min_pairs` pairs (the number
    of ranks), even if that alone exceeds the budget; a short tail joins the batch before it.

    With `sizes` (pairs per item, `Units.sizes`) the items are units of several pairs: the pair cap
    counts pairs, `min_pairs` counts units (each rank needs one). `first_pair` (`Units.first_pair`) gives
    each unit the random tie-break key of its first pair, so a unit takes that pair's place in the order
    and units of one pair are ordered exactly as the pairs themselves would be.
    """
    n = len(lengths)
    if n == 0:
        return []
    rng = np.random.default_rng([seed, epoch])
    keys = n if first_pair is None else int(first_pair.max()) + 1
    tiebreak = rng.random(keys) if shuffle else np.arange(keys)
    if first_pair is not None:
        tiebreak = tiebreak[first_pair]
    order = np.lexsort((tiebreak, lengths))
    batches: list[list[int]] = []
    current: list[int] = []
    for idx in order.tolist():
        grown = current + [idx]
        cost = padded_tokens(lengths, grown) if packed_tokens is None else int(packed_tokens[grown].sum())
        n_pairs = len(grown) if sizes is None else int(sizes[grown].sum())
        too_big = cost > tokens_per_batch or n_pairs > max_pairs_per_batch
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


def shard_weight(n_shard: float, n_global: float, world_size: int) -> float:
    """Scale on a shard's (weighted) mean loss so DeepSpeed's mean over ranks equals the global batch's.

    `n_shard`, `n_global`: the pair weights summed over the shard and over the global batch (pair counts
    for per-pair weighting)."""
    return n_shard * world_size / n_global
