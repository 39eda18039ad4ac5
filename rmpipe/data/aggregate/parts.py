"""The pairs as a folder of parts (`data/aggregated/pairs/`), each written only when what it holds changed.

A kept pair belongs to the votes part holding its representative vote (its lowest (batch_id, line) vote
with a known choice: the vote whose texts the output row carries), and its row goes to the pairs part of
the same name. So a pairs part's bytes are a function of that one votes part and of its pairs' computed
columns (`PairColumns`): with the memo (`aggregate.memo`), an unchanged part is linked back unread, and
only the parts whose pairs changed have their texts decoded and written. A part's bytes depend on its rows
only (`rmpipe.core.parts.FixedGroups`), so a run from scratch writes the same bytes.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rmpipe.core.parts import FixedGroups, link_or_copy
from rmpipe.data.aggregate.codes import VoteCodes, release_memory
from rmpipe.data.aggregate.memo import AggregateMemo
from rmpipe.data.aggregate.orient import (
    BUCKET_BYTES,
    TEXT_COLUMNS,
    VoteParts,
    _keep_texts,
    _Orientation,
    canonical_key,
)
from rmpipe.data.aggregate.pairs import SCHEMA, PairColumns, pair_tables
from rmpipe.data.aggregate.texts import PairTexts

ROWS_PER_GROUP = 16_384  # rows per row group of a pairs part


def part_hashes(source: VoteParts, memo: AggregateMemo) -> list[str]:
    """sha256 of each votes part (from the ledger where collect recorded it): what the memo's entries are keyed by."""
    return [memo.sha_of(part) for part in source.parts]


def orient_parts(codes: VoteCodes, source: VoteParts, memo: AggregateMemo | None, hashes: list[str],
                 reps: np.ndarray, spill: Path | None, batch_rows: int) -> dict[int, PairTexts]:
    """Fill each vote's canonical label and text lengths, part by part: from the memo where it holds the part,
    else from the part's text columns (then kept in the memo). A part read here also hands its representative
    votes' texts (`reps`: their sorted row positions) to a store, returned by part: its pairs part is most
    likely new too, and its texts are then not decoded twice."""
    facts = _Orientation(codes)
    columns = [c for c in TEXT_COLUMNS if c in source.names]
    texts: dict[int, PairTexts] = {}
    for k, part in enumerate(source.parts):
        lo, hi = int(source.starts[k]), int(source.starts[k + 1])
        stored = memo.load_facts(hashes[k], part.name) if memo is not None else None
        if stored is not None and all(len(values) == hi - lo for values in stored):
            codes.label[lo:hi], codes.len_first[lo:hi], codes.len_second[lo:hi] = stored
            continue
        here = reps[np.searchsorted(reps, lo):np.searchsorted(reps, hi)]
        store = texts[k] = _text_store(source, k, codes.pair[here], spill)
        start = lo
        for batch in source.batches(k, columns, batch_rows):
            first_is_a = facts.fill(start, batch)
            a, b = np.searchsorted(here, [start, start + batch.num_rows])
            if b > a:
                _keep_texts(store, batch, here[a:b] - start, first_is_a, codes.pair[here[a:b]])
            start += batch.num_rows
            del batch, first_is_a
        store.finish()
        if start != hi:
            raise RuntimeError(f"{part}: {start - lo} text rows, {hi - lo} in its footer")
        if memo is not None:
            memo.store_facts(hashes[k], (codes.label[lo:hi], codes.len_first[lo:hi], codes.len_second[lo:hi]))
        release_memory()
    return texts


def write_pair_parts(columns: PairColumns, codes: VoteCodes, source: VoteParts, out: Path, memo: AggregateMemo | None,
                     hashes: list[str], reps: np.ndarray, texts: dict[int, PairTexts], spill: Path | None,
                     batch_rows: int) -> int:
    """Write the kept pairs into `out` (an empty folder), one part per votes part holding representative
    votes; reuse a memoized part where its key matches. `texts`: stores `orient_parts` filled (other parts'
    texts are read here). Returns the parts written or linked."""
    rep_of = np.full(len(codes.pair_names), -1, np.int64)
    rep_of[codes.pair[reps]] = reps
    rep = rep_of[columns.codes]
    if len(rep) and rep.min() < 0:
        raise RuntimeError("aggregate: a kept pair has no representative vote")
    part_of = np.searchsorted(source.starts, rep, side="right") - 1
    for k in np.unique(part_of).tolist():
        chosen = np.flatnonzero(part_of == k)
        sub = columns.take(chosen)
        target = out / source.parts[k].name
        key = memo.pairs_key(hashes[k], sub.digest()) if memo is not None else None
        sealed = memo.load_part(key, target.name) if memo is not None else None
        if sealed is None:
            def write(path: Path, sub: PairColumns = sub, k: int = k, rows: np.ndarray = rep[chosen]) -> None:
                store = texts.get(k)
                if store is None:
                    store = _part_texts(source, k, rows, codes.pair[rows], spill, batch_rows)
                with FixedGroups(path, SCHEMA, ROWS_PER_GROUP, compression="snappy") as writer:
                    for table in pair_tables(sub, store):
                        writer.write(table)
                release_memory()

            if memo is None:
                write(target)
                continue
            sealed = memo.store_part(key, write)
        link_or_copy(sealed, target)
        memo.linked(sealed, target)
    return len(np.unique(part_of))


def _text_store(source: VoteParts, k: int, pair_codes: np.ndarray, spill: Path | None) -> PairTexts:
    """An empty store for the texts of part k's pairs `pair_codes`, in buckets of ~BUCKET_BYTES when spilled."""
    columns = [c for c in TEXT_COLUMNS if c in source.names]
    buckets = math.ceil(source.text_bytes_per_row([k], columns) * len(pair_codes) / BUCKET_BYTES) or 1
    span = int(pair_codes.max()) + 1 if len(pair_codes) else 1
    folder = None
    if spill is not None:
        folder = spill / f"part-{k:06d}"
        folder.mkdir(parents=True, exist_ok=True)
    return PairTexts(folder=folder, bucket_codes=math.ceil(span / buckets))


def _part_texts(source: VoteParts, k: int, rows: np.ndarray, pair_codes: np.ndarray, spill: Path | None,
                batch_rows: int) -> PairTexts:
    """The texts of the representative votes `rows` (global positions, all in part k), keyed by pair code,
    first/second in canonical order; spilled in buckets of pair codes when `spill` is given."""
    order = np.argsort(rows, kind="stable")
    rows, pair_codes = rows[order], pair_codes[order]
    store = _text_store(source, k, pair_codes, spill)
    start = int(source.starts[k])
    for batch in source.batches(k, [c for c in TEXT_COLUMNS if c in source.names], batch_rows):
        lo, hi = np.searchsorted(rows, [start, start + batch.num_rows])
        if hi > lo:
            picked = batch.take(pa.array(rows[lo:hi] - start))
            first_is_a = pc.fill_null(pc.less_equal(canonical_key(picked.column("response_a")),
                                                    canonical_key(picked.column("response_b"))), True)
            _keep_texts(store, picked, np.arange(hi - lo), first_is_a, pair_codes[lo:hi])
        start += batch.num_rows
    store.finish()
    return store
