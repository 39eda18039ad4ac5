"""The output rows: one per kept pair, in pair_id order, built chunk by chunk.

The number columns (counts, agreement, soft label, margin, batch ids, group) are computed for
every kept pair at once from integer codes; the texts are joined back by pair code one
PairTexts bucket at a time, so a chunk of output rows is all the text ever held here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from rmpipe.aggregate_labels import Pass
from rmpipe.aggregate_settings import SECOND, TIE, AggregateSettings
from rmpipe.aggregate_texts import SCHEMA as TEXT_SCHEMA
from rmpipe.aggregate_texts import PairTexts
from rmpipe.schema import prompt_hash


def _batch_lists(votes: pd.DataFrame, pair_codes: np.ndarray, batch_names: pd.Index) -> pa.ListArray:
    """Sorted distinct batch ids per pair, one list per pair code (ascending), all pairs at once."""
    n_batches = max(len(batch_names), 1)
    combos = np.sort(votes["pair"].to_numpy().astype(np.int64) * n_batches + votes["batch"].to_numpy())
    combos = combos[np.r_[True, combos[1:] != combos[:-1]]] if len(combos) else combos
    combo_pair, combo_batch = np.divmod(combos, n_batches)  # sorted by pair, then by batch name
    starts = np.searchsorted(combo_pair, pair_codes)
    if not np.array_equal(combo_pair[np.r_[True, combo_pair[1:] != combo_pair[:-1]]] if len(combos) else combo_pair, pair_codes):
        raise RuntimeError("aggregate: batch ids requested for pairs without votes")
    offsets = np.append(starts, len(combos)).astype(np.int32)
    values = pa.array(np.asarray(batch_names, dtype=object)[combo_batch], pa.string())
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def _pair_groups(used: pd.DataFrame, group: pd.Categorical | pd.Series, n_pairs: int) -> np.ndarray:
    """Per pair code: the ranked/rated group its first grouped vote came from (pairs of one group share it:
    the same prompt and responses), None for pairs from A/B votes and pair rows only."""
    out = np.full(n_pairs, None, dtype=object)
    codes = np.asarray(group.cat.codes)[used.index.to_numpy()]
    grouped = codes >= 0
    if grouped.any():
        pair = used["pair"].to_numpy()[grouped]
        first = np.unique(pair, return_index=True)[1]  # input order: file name, then line
        out[pair[first]] = np.asarray(group.cat.categories, dtype=object)[codes[grouped][first]]
    return out


def _pair_margins(votes: pd.DataFrame, label: np.ndarray, settings: AggregateSettings) -> np.ndarray:
    """Mean margin over the votes agreeing with the aggregated label; explicit margins win; else 0.0."""
    pair = votes["pair"].to_numpy()
    agree = votes["label"].to_numpy() == label[pair]
    strength_codes = votes["strength"].cat.codes.to_numpy()
    per_category = [settings.strength_margin.get(s, np.nan) for s in votes["strength"].cat.categories]
    strength = np.append(np.asarray(per_category, dtype=float), np.nan)[strength_codes]  # code -1 -> NaN

    def sums(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        use = agree & ~np.isnan(values)
        return np.bincount(pair[use], weights=values[use], minlength=len(label)), np.bincount(pair[use], minlength=len(label))

    explicit_sum, explicit_n = sums(votes["margin"].to_numpy())
    strength_sum, strength_n = sums(strength)
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
    batch_ids: pa.ListArray
    group_id: np.ndarray
    codes: np.ndarray


def pair_columns(used: pd.DataFrame, final: Pass, keep: np.ndarray, votes: pd.DataFrame,
                 settings: AggregateSettings) -> PairColumns:
    """`used`: the votes behind the kept pairs (codes pair/batch/label...); `votes`: the oriented vote table."""
    pair_names = votes["pair_id"].cat.categories
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
        "margin": _pair_margins(used, final.label, settings)[codes].astype(float),
        "prejudged": final.prejudged[codes],
    })
    return PairColumns(
        pair_id=pa.array(np.asarray(pair_names[codes], dtype=object), pa.string()),
        second_wins=second_wins,
        numbers=numbers,
        batch_ids=_batch_lists(used, codes, votes["batch_id"].cat.categories),
        group_id=_pair_groups(used, votes["group_id"], len(pair_names))[codes],
        codes=codes,
    )


def _chunk(columns: PairColumns, start: int, texts: pa.Table) -> pd.DataFrame:
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
    # batch_ids as plain object lists: an ArrowDtype column leaves pandas metadata that read_parquet cannot parse.
    return table.to_pandas()


def pair_chunks(columns: PairColumns, texts: PairTexts) -> Iterator[pd.DataFrame]:
    """The output rows in pair_id order, one frame per PairTexts bucket (at least one frame)."""
    start = 0
    for rows in texts.sorted_rows(columns.codes):
        if rows.num_rows:
            yield _chunk(columns, start, rows)
            start += rows.num_rows
    if start != len(columns.codes):
        raise RuntimeError(f"aggregate: {len(columns.codes) - start} kept pairs have no texts")
    if start == 0:
        yield _chunk(columns, 0, TEXT_SCHEMA.empty_table())
