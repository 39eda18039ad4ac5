"""The output rows: one per kept pair, in pair_id order, built chunk by chunk.

The number columns (counts, agreement, soft label, margin, batch ids, group) are computed for
every kept pair at once from integer codes; the texts are joined back by pair code one
PairTexts bucket at a time, so a chunk of output rows is all the text ever held here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from rmpipe.core.schema import prompt_hash
from rmpipe.data.aggregate.codes import VoteCodes, pair_key
from rmpipe.data.aggregate.labels import Pass
from rmpipe.data.aggregate.texts import SCHEMA as TEXT_SCHEMA
from rmpipe.data.aggregate.texts import PairTexts
from rmpipe.data.aggregate.vocab import SECOND, TIE, AggregateSettings

SCHEMA = pa.schema([  # one output row (= vocab.OUTPUT_COLUMNS): every part has these types, whatever its values
    ("pair_id", pa.string()), ("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
    ("n_votes", pa.int64()), ("n_chosen", pa.int64()), ("n_rejected", pa.int64()), ("n_tie", pa.int64()),
    ("agreement", pa.float64()), ("soft_label", pa.float64()), ("margin", pa.float64()),
    ("prompt_hash", pa.string()), ("batch_ids", pa.list_(pa.string())), ("prejudged", pa.bool_()),
    ("group_id", pa.string()),
])


@dataclass
class BatchLists:
    """Sorted distinct batch ids per kept pair, as codes (a byte or two each); strings only per output chunk."""

    offsets: np.ndarray  # int64, one more than pairs: pair k's batches are batch[offsets[k]:offsets[k + 1]]
    batch: np.ndarray  # codes into names, sorted within each pair
    names: np.ndarray  # object: the batch ids

    def take(self, rows: np.ndarray) -> BatchLists:
        """The lists of the pairs at positions `rows` (ascending)."""
        lengths = np.diff(self.offsets)[rows]
        offsets = np.append(0, np.cumsum(lengths)).astype(np.int64)
        # each picked list's positions: its old start, counted up along the list (no Python loop over pairs)
        positions = np.repeat(self.offsets[rows] - offsets[:-1], lengths) + np.arange(offsets[-1])
        return BatchLists(offsets=offsets, batch=self.batch[positions], names=self.names)

    def slice(self, start: int, n: int) -> pa.ListArray:
        offsets = self.offsets[start:start + n + 1]
        values = pa.array(self.names[self.batch[offsets[0]:offsets[-1]]], pa.string())
        return pa.ListArray.from_arrays(pa.array((offsets - offsets[0]).astype(np.int32)), values)


def _batch_lists(pair: np.ndarray, batch: np.ndarray, pair_codes: np.ndarray, batch_names: pd.Index) -> BatchLists:
    """Sorted distinct batch ids per pair, one list per pair code (ascending), all pairs at once."""
    n_batches = max(len(batch_names), 1)
    combos = np.sort(pair_key(pair, batch, n_batches, int(pair.max()) + 1 if len(pair) else 1))
    combos = combos[np.r_[True, combos[1:] != combos[:-1]]] if len(combos) else combos  # (np.unique: 50x slower)
    combo_pair, combo_batch = np.divmod(combos, n_batches)
    del combos
    starts = np.searchsorted(combo_pair, pair_codes)
    if not np.array_equal(combo_pair[np.r_[True, combo_pair[1:] != combo_pair[:-1]]] if len(combo_pair) else combo_pair, pair_codes):
        raise RuntimeError("aggregate: batch ids requested for pairs without votes")
    return BatchLists(offsets=np.append(starts, len(combo_pair)), batch=combo_batch.astype(batch.dtype),
                      names=np.asarray(batch_names, dtype=object))


def _pair_groups(pair: np.ndarray, group: np.ndarray, group_names: pd.Index, n_pairs: int) -> np.ndarray:
    """Per pair code: the ranked/rated group its first grouped vote came from (pairs of one group share it:
    the same prompt and responses), None for pairs from A/B votes and pair rows only. Votes in input order."""
    out = np.full(n_pairs, None, dtype=object)
    grouped = group >= 0
    if grouped.any():
        pair = pair[grouped]
        first = np.unique(pair, return_index=True)[1]  # input order: file name, then line
        out[pair[first]] = np.asarray(group_names, dtype=object)[group[grouped][first]]
    return out


def _pair_margins(votes: VoteCodes, used: np.ndarray, label: np.ndarray, settings: AggregateSettings) -> np.ndarray:
    """Mean margin over the `used` votes agreeing with the aggregated label; explicit margins win; else 0.0.
    Sums over bool masks of the votes that have a value, in vote order (the same sums as over every vote)."""
    agree = used & (votes.label == votes.of_pairs(label, used))
    per_category = [settings.strength_margin.get(s, np.nan) for s in votes.strength_names]
    strength_margin = np.append(np.asarray(per_category, dtype=float), np.nan)  # code -1 -> NaN

    def sums(rows: np.ndarray, values: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        pair = votes.pair[rows]
        return np.bincount(pair, weights=values(rows), minlength=len(label)), np.bincount(pair, minlength=len(label))

    explicit_sum, explicit_n = sums(agree & ~np.isnan(votes.margin), lambda rows: votes.margin[rows])
    has_strength = agree & ~np.isnan(strength_margin)[votes.strength]
    strength_sum, strength_n = sums(has_strength, lambda rows: strength_margin[votes.strength[rows]])
    with np.errstate(invalid="ignore", divide="ignore"):
        margin = np.where(
            explicit_n > 0, explicit_sum / explicit_n, np.where(strength_n > 0, strength_sum / strength_n, 0.0)
        )
    margin[label == TIE] = 0.0  # a tie expresses no preference strength
    return margin


def _hash_prompts(prompts: pa.ChunkedArray | pa.Array, slice_rows: int = 10_000) -> pa.Array:
    """schema.prompt_hash once per distinct prompt (in slices: never all prompts as Python strings at once)."""
    if len(prompts) == 0:
        return pa.array([], pa.string())
    encoded = pc.dictionary_encode(prompts)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.unify_dictionaries().combine_chunks()
    distinct = encoded.dictionary
    hashes = [
        prompt_hash(p) for start in range(0, len(distinct), slice_rows) for p in distinct.slice(start, slice_rows).to_pylist()
    ]
    return pa.array(hashes, pa.string()).take(encoded.indices)


def _prompt_hashes(prompts: pa.Array | pa.ChunkedArray, given: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The prompt hashes collect carried; computed only where missing (an older or hand-built vote table)."""
    if isinstance(given, pa.ChunkedArray):
        given = given.combine_chunks()
    missing = pc.is_null(given)
    if not pc.any(missing).as_py():
        return given
    computed = _hash_prompts(pc.filter(prompts, missing))
    return pc.replace_with_mask(given, missing, computed)


@dataclass
class PairColumns:
    """Everything but the texts, for the kept pairs in code (= pair_id) order."""

    pair_id: pa.Array
    second_wins: np.ndarray
    numbers: pd.DataFrame  # n_votes .. margin, prejudged: also what the report's means read
    batch_ids: BatchLists
    group_id: np.ndarray
    codes: np.ndarray

    def take(self, rows: np.ndarray) -> PairColumns:
        """The kept pairs at positions `rows` (ascending: still in pair_id order)."""
        return PairColumns(pair_id=self.pair_id.take(pa.array(rows, pa.int64())), second_wins=self.second_wins[rows],
                           numbers=self.numbers.iloc[rows].reset_index(drop=True), batch_ids=self.batch_ids.take(rows),
                           group_id=self.group_id[rows], codes=self.codes[rows])

    def digest(self) -> str:
        """sha256 of everything an output row takes from here (the pair codes aside: they number the pairs of
        this run, not what a row says): with the texts' source, what decides a pairs part's bytes."""
        n = len(self.codes)
        table = pa.table({
            "pair_id": self.pair_id, "second_wins": pa.array(self.second_wins, pa.bool_()),
            **{name: pa.array(self.numbers[name].to_numpy()) for name in self.numbers.columns},
            "batch_ids": self.batch_ids.slice(0, n), "group_id": pa.array(self.group_id, pa.string()),
        })
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table.combine_chunks())
        return hashlib.sha256(sink.getvalue()).hexdigest()


def pair_columns(votes: VoteCodes, used: np.ndarray, final: Pass, keep: np.ndarray,
                 settings: AggregateSettings) -> PairColumns:
    """`used`: a mask of the votes behind the kept pairs; `votes`: the coded vote table."""
    pair_names = votes.pair_names
    codes = np.flatnonzero(keep)
    label = final.label[codes]
    counts = final.counts[codes]
    second_wins = label == SECOND
    n_chosen = np.where(second_wins, counts[:, 1], counts[:, 0])  # ties: canonical order
    n_rejected = np.where(second_wins, counts[:, 0], counts[:, 1])
    n_label = np.take_along_axis(counts, label[:, None].astype(np.int64), axis=1)[:, 0]
    decided = n_chosen + n_rejected
    with np.errstate(invalid="ignore", divide="ignore"):
        soft_label = np.where((label == TIE) | (decided == 0), 0.5, n_chosen / decided)
    numbers = pd.DataFrame({
        "n_votes": final.weighted[codes].astype(np.int64),
        "n_chosen": n_chosen.astype(np.int64),
        "n_rejected": n_rejected.astype(np.int64),
        "n_tie": counts[:, 2].astype(np.int64),
        "agreement": n_label / np.maximum(counts.sum(axis=1), 1),
        "soft_label": soft_label.astype(float),
        "margin": _pair_margins(votes, used, final.label, settings)[codes].astype(float),
        "prejudged": final.prejudged[codes],
    })
    return PairColumns(
        pair_id=pair_names.take(pa.array(codes, pa.int64())).cast(pa.string()),
        second_wins=second_wins,
        numbers=numbers,
        batch_ids=_batch_lists(votes.pair[used], votes.batch[used], codes, votes.batch_names),
        group_id=_pair_groups(votes.pair[used], votes.group[used], votes.group_names, len(pair_names))[codes],
        codes=codes,
    )


def _chunk(columns: PairColumns, start: int, texts: pa.Table) -> pa.Table:
    """Output rows start .. start + len(texts); `texts` holds their PairTexts rows, in the same order."""
    n = texts.num_rows
    if not np.array_equal(texts.column("code").to_numpy(), columns.codes[start:start + n]):
        raise RuntimeError("aggregate: pair texts out of step with the pair rows")
    part = columns.numbers.iloc[start:start + n]
    wins = pa.array(columns.second_wins[start:start + n], pa.bool_())
    prompt = texts.column("prompt")
    table = pa.table({
        "pair_id": columns.pair_id.slice(start, n),
        "prompt": prompt,
        "chosen": pc.if_else(wins, texts.column("second"), texts.column("first")),
        "rejected": pc.if_else(wins, texts.column("first"), texts.column("second")),
        **{name: part[name].to_numpy() for name in ("n_votes", "n_chosen", "n_rejected", "n_tie", "agreement",
                                                     "soft_label", "margin")},
        "prompt_hash": _prompt_hashes(prompt, texts.column("prompt_hash")),
        "batch_ids": columns.batch_ids.slice(start, n),
        "prejudged": part["prejudged"].to_numpy(),
        "group_id": pa.array(columns.group_id[start:start + n], pa.string()),
    })
    return table.cast(SCHEMA)


def pair_tables(columns: PairColumns, texts: PairTexts) -> Iterator[pa.Table]:
    """The output rows (SCHEMA) in pair_id order, one table per PairTexts bucket (at least one table)."""
    start = 0
    for rows in texts.sorted_rows(columns.codes):
        if rows.num_rows:
            yield _chunk(columns, start, rows)
            start += rows.num_rows
    if start != len(columns.codes):
        raise RuntimeError(f"aggregate: {len(columns.codes) - start} kept pairs have no texts")
    if start == 0:
        yield _chunk(columns, 0, TEXT_SCHEMA.empty_table())


def pair_chunks(columns: PairColumns, texts: PairTexts) -> Iterator[pd.DataFrame]:
    """`pair_tables` as DataFrames (batch_ids as plain object lists, as read_parquet gives them back)."""
    for table in pair_tables(columns, texts):
        yield table.to_pandas()
