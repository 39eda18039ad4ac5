"""The cross-split checks' frames (pair_id unique, (prompt, chosen, rejected) unique, one split per
prompt) on exact int32 codes of the id strings, never on a Python string per row.

After the per-chunk suites, each split's pair_id and prompt_hash are read once more, one narrow
column at a time (from the split's file when the stage passes one), and coded across all splits: two
rows get one code exactly when their strings are equal. Rows are grouped in buckets by their last
bytes and length (equal strings always share a bucket), and Arrow dictionary-encodes one bucket at a
time (its hash table compares the bytes; no hash decides equality), so its working memory is a
bucket's. GX checks the codes, so its verdicts and counts are the strings' own; the prompts frame is
ordered by each prompt's first row, as the strings' frame was, and the few codes GX reports as examples
are read back from the row where each first appears (`Coded.decode`) for the failure line and the data
docs. Held per pair: a 4-byte code per column. An id column of another type (already a schema failure)
is compared by its text form.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

ID_COLUMNS = ("pair_id", "prompt_hash")
SplitSource = pd.DataFrame | Path | Sequence  # a split's frame, its file, or its parts (frames or files) in order


def _is_null(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _large_strings(ids: pa.Array | pa.ChunkedArray) -> pa.ChunkedArray:
    ids = pa.chunked_array([ids]) if isinstance(ids, pa.Array) else ids
    if pa.types.is_large_string(ids.type):
        return ids
    if pa.types.is_string(ids.type):
        return ids.cast(pa.large_string())
    return pa.chunked_array([pa.array([None if v is None else str(v) for v in ids.to_pylist()], pa.large_string())])


def _rows(source: pd.DataFrame | Path) -> int:
    return len(source) if isinstance(source, pd.DataFrame) else pq.ParquetFile(source).metadata.num_rows


def read_ids(source: SplitSource, column: str) -> pa.ChunkedArray | None:
    """One split's `column` as large strings (None where the split lacks it): the file's column alone, or the
    frame's; of a list of parts, theirs in order (a part without it: nulls)."""
    if isinstance(source, (list, tuple)):
        pieces = [read_ids(part, column) for part in source]
        if all(piece is None for piece in pieces):
            return None
        return pa.chunked_array([chunk for part, piece in zip(source, pieces) for chunk in
                                 (piece.chunks if piece is not None else [pa.nulls(_rows(part), pa.large_string())])],
                                pa.large_string())
    if isinstance(source, pd.DataFrame):
        if column not in source.columns:
            return None
        try:
            return _large_strings(pa.array(source[column], from_pandas=True))
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed Python objects
            return _large_strings(pa.array([None if _is_null(v) else str(v) for v in source[column]], pa.large_string()))
    parquet = pq.ParquetFile(source, pre_buffer=False)
    if column not in parquet.schema_arrow.names:
        return None
    batches = [batch.column(0) for batch in parquet.iter_batches(batch_size=65_536, columns=[column])]
    return _large_strings(pa.chunked_array(batches, parquet.schema_arrow.field(column).type))


def _id_at(source: SplitSource, column: str, row: int) -> Any:
    """The string at `row` of one split's `column`, reading only the row group that holds it (for an example)."""
    if isinstance(source, (list, tuple)):
        for part in source:
            if row < _rows(part):
                return _id_at(part, column, row)
            row -= _rows(part)
        raise IndexError(f"row {row} is past the end of the split's parts")
    if isinstance(source, pd.DataFrame):
        return read_ids(source.iloc[row:row + 1], column)[0].as_py()
    parquet = pq.ParquetFile(source)
    start = 0
    for group in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        if row < start + rows:
            return _large_strings(parquet.read_row_group(group, columns=[column]).column(column))[row - start].as_py()
        start += rows
    raise IndexError(f"row {row} is past the end of {source}")


@dataclass
class Coded:
    """A column of every split as int32 codes (-1: null): equal codes exactly where the strings are equal.

    `first_row[code]`: the row (counted across the splits in order) where the code's string first appears;
    `decode` reads the string back from there, so no string is held once the codes are made."""

    codes: np.ndarray
    first_row: np.ndarray
    sources: Sequence[SplitSource]
    rows: Sequence[int]
    column: str

    def series(self) -> pd.Series:
        """The codes as GX reads them: int32, or float64 with NaN where the string is null (GX skips nulls)."""
        if (self.codes < 0).any():
            return pd.Series(np.where(self.codes < 0, np.nan, self.codes))
        return pd.Series(self.codes)

    def decode(self, value: Any) -> Any:
        if _is_null(value):
            return value
        row = int(self.first_row[int(value)])
        split = int(np.searchsorted(np.cumsum(self.rows), row, side="right"))
        return _id_at(self.sources[split], self.column, row - int(sum(self.rows[:split])))


BUCKET_ROWS = 65_536  # rows Arrow's hash table encodes at a time (~250 bytes a distinct string while it works)


def _buckets(ids: pa.Array, n_buckets: int) -> np.ndarray:
    """Each row's bucket (-1: null), from its last two bytes and its length: equal strings share a bucket."""
    if len(ids) == 0:
        return np.empty(0, np.int32)
    offsets = np.frombuffer(ids.buffers()[1], np.int64)[ids.offset:ids.offset + len(ids) + 1]
    data = ids.buffers()[2]
    data = np.frombuffer(data, np.uint8) if data is not None and data.size else np.zeros(1, np.uint8)
    ends, lengths = offsets[1:], np.diff(offsets)
    last = np.where(lengths >= 1, data[np.clip(ends - 1, 0, data.size - 1)], 0).astype(np.int64)
    second = np.where(lengths >= 2, data[np.clip(ends - 2, 0, data.size - 1)], 0)
    bucket = (((last * 257 + second) * 31 + lengths) % n_buckets).astype(np.int32)
    if ids.null_count:
        bucket[ids.is_null().to_numpy(zero_copy_only=False)] = -1
    return bucket


def _read_all(sources: Sequence[SplitSource], column: str, rows: Sequence[int]) -> list[pa.Array] | None:
    """`column` of every split as large-string chunks (a split without it: nulls); None if no split has it."""
    chunks, found = [], False
    for source, n in zip(sources, rows):
        part = read_ids(source, column)
        found |= part is not None
        chunks += part.chunks if part is not None else [pa.nulls(n, pa.large_string())]
        pa.default_memory_pool().release_unused()  # the reader's page buffers
    return chunks if found else None


def _take(chunks: list[pa.Array], starts: np.ndarray, rows: np.ndarray) -> pa.Array:
    """The strings at `rows` (ascending, counted across the chunks) without joining the chunks."""
    cut = np.searchsorted(rows, starts)
    return pa.concat_arrays([chunk.take(rows[lo:hi] - start) for chunk, start, lo, hi
                             in zip(chunks, starts, cut[:-1], cut[1:]) if hi > lo] or [pa.array([], pa.large_string())])


def encode(sources: Sequence[SplitSource], column: str, rows: Sequence[int]) -> Coded | None:
    """`column` of every split (a split without it: nulls) as codes, Arrow's dictionary encoding run one
    bucket of rows at a time (bounded working memory; codes of different buckets never meet: distinct)."""
    chunks = _read_all(sources, column, rows)
    if chunks is None:
        return None
    total = sum(map(len, chunks))
    n_buckets = max(1, total // BUCKET_ROWS)
    bucket = np.concatenate([_buckets(chunk, n_buckets) for chunk in chunks] or [np.empty(0, np.int32)])
    order = np.argsort(bucket, kind="stable")  # rows grouped by bucket, in row order within one
    bounds = np.concatenate([[0], np.cumsum(np.bincount(bucket + 1, minlength=n_buckets + 1))])
    del bucket
    starts = np.concatenate([[0], np.cumsum([len(c) for c in chunks])])
    codes, first_rows, next_code = np.full(total, -1, np.int32), [np.empty(0, np.int64)], 0
    for b in range(1, n_buckets + 1):  # bucket -1 (nulls) keeps code -1
        at = order[bounds[b]:bounds[b + 1]]
        if len(at):
            encoded = _take(chunks, starts, at).dictionary_encode()
            local = encoded.indices.to_numpy()
            codes[at] = local + next_code
            first_rows.append(at[np.unique(local, return_index=True)[1]])
            next_code += len(encoded.dictionary)
            del encoded
            pa.default_memory_pool().release_unused()  # else each bucket's hash table stays resident
    return Coded(codes, np.concatenate(first_rows), list(sources), list(rows), column)


def all_splits_frame(pair_ids: Coded | None, prompts: Coded | None, keys: Sequence[tuple | None],
                     rows: int) -> pd.DataFrame:
    """pair_id and prompt_hash codes and the response keys of every row of every split (keys only where every split has them)."""
    columns: dict[str, Any] = {}
    if pair_ids is not None:
        columns["pair_id"] = pair_ids.series()
    if prompts is not None:
        columns["prompt_hash"] = prompts.series()
    if keys and all(k is not None for k in keys):
        columns["chosen_key"] = np.concatenate([k[0] for k in keys])
        columns["rejected_key"] = np.concatenate([k[1] for k in keys])
    return pd.DataFrame(columns, index=pd.RangeIndex(rows))


def prompts_frame(prompts: Coded | None, rows: Sequence[int]) -> pd.DataFrame:
    """One row per prompt_hash code, in order of first appearance, with the number of splits it appears in."""
    if prompts is None:
        return pd.DataFrame({"prompt_hash": pd.Series(dtype="int32"), "n_splits": pd.Series(dtype="int64")})
    split = np.repeat(np.arange(len(rows), dtype=np.int64), rows)
    placed = prompts.codes >= 0
    in_split = np.unique(prompts.codes[placed].astype(np.int64) * len(rows) + split[placed])
    n_splits = np.bincount(in_split // len(rows), minlength=len(prompts.first_row))
    order = np.argsort(prompts.first_row, kind="stable")
    return pd.DataFrame({"prompt_hash": order.astype(np.int32), "n_splits": n_splits[order]})


def unexpected_counts(values: list, limit: int) -> list[dict] | None:
    """GX's `partial_unexpected_counts` of a list of examples (None where GX leaves it out: unhashable values)."""
    hashable = [tuple(v.values()) if isinstance(v, dict) else v for v in values]
    try:
        return [{"value": k, "count": n} for k, n in sorted(Counter(hashable).most_common(limit),
                                                               key=lambda x: (-x[1], x[0]))]
    except TypeError:
        return None


def decode_examples(results: list, coded: dict[str, Coded], limit: int) -> bool:
    """Put the strings back in place of the codes in each failed result's examples (what GX reported, in its
    order); True if there were any (a passed result has none)."""
    failed = [r for r in results if not r.success]
    for r in failed:
        result = r.result or {}
        kwargs = r.expectation_config.kwargs
        column = kwargs.get("column")
        if "partial_unexpected_list" in result:
            if column in coded:
                result["partial_unexpected_list"] = [coded[column].decode(v) for v in result["partial_unexpected_list"]]
            elif kwargs.get("column_list"):
                result["partial_unexpected_list"] = [
                    {k: coded[k].decode(v) if k in coded else v for k, v in row.items()}
                    for row in result["partial_unexpected_list"]]
            if "partial_unexpected_counts" in result:
                counts = unexpected_counts(result["partial_unexpected_list"], limit)
                if counts is not None:
                    result["partial_unexpected_counts"] = counts
        if "partial_unexpected_index_list" in result:
            result["partial_unexpected_index_list"] = [
                {k: coded[k].decode(v) if k in coded else v for k, v in row.items()} if isinstance(row, dict) else row
                for row in result["partial_unexpected_index_list"]]
    return bool(failed)
