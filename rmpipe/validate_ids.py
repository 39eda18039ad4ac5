"""The cross-split checks' frames (pair_id unique, (prompt, chosen, rejected) unique, one split per
prompt) on exact int32 codes of the id strings, never on a Python string per row.

After the per-chunk suites, each split's pair_id and prompt_hash are read once more, one narrow
column at a time (from the split's file when the stage passes one), and Arrow dictionary-encodes each
column across all splits: every distinct string gets a code, in order of first appearance, and two
rows get one code exactly when their strings are equal (Arrow's hash table compares the bytes; no hash
decides equality). GX checks the codes, so its verdicts, counts and the order of its examples are the
strings' own; the few codes it reports as examples are mapped back to their strings (`decode`) for the
failure line and the data docs. Held per pair: a 4-byte code per column and the strings once in Arrow
buffers. An id column of another type (already a schema failure) is compared by its text form.
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
SplitSource = pd.DataFrame | Path


def _is_null(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def read_ids(source: SplitSource, column: str) -> pa.Array | None:
    """One split's `column` as large strings (None where the split lacks it): the file's column alone, or the frame's."""
    if isinstance(source, pd.DataFrame):
        if column not in source.columns:
            return None
        try:
            ids = pa.array(source[column], from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed Python objects
            ids = pa.array([None if _is_null(v) else str(v) for v in source[column]], pa.large_string())
    else:
        if column not in pq.read_schema(source).names:
            return None
        ids = pq.read_table(source, columns=[column]).column(column).combine_chunks()
    if not pa.types.is_large_string(ids.type):
        ids = ids.cast(pa.large_string()) if pa.types.is_string(ids.type) else pa.array(
            [None if v is None else str(v) for v in ids.to_pylist()], pa.large_string())
    return ids


@dataclass
class Coded:
    """A column of every split as codes (-1: null) into `strings`, the distinct values in order of first appearance."""

    strings: pa.Array
    codes: np.ndarray

    def series(self) -> pd.Series:
        """The codes as GX reads them: int32, or float64 with NaN where the string is null (GX skips nulls)."""
        if (self.codes < 0).any():
            return pd.Series(np.where(self.codes < 0, np.nan, self.codes))
        return pd.Series(self.codes)

    def decode(self, value: Any) -> Any:
        return value if _is_null(value) else self.strings[int(value)].as_py()


def encode(parts: Sequence[pa.Array | None], rows: Sequence[int]) -> Coded | None:
    """The splits' columns (None: the split lacks it, its rows count as nulls) as one coded column."""
    if all(part is None for part in parts):
        return None
    chunks = [pa.nulls(n, pa.large_string()) if part is None else part for part, n in zip(parts, rows)]
    encoded = pa.chunked_array(chunks, pa.large_string()).dictionary_encode()  # one dictionary for all chunks
    codes = np.concatenate([c.indices.fill_null(-1).to_numpy(zero_copy_only=False) for c in encoded.chunks]
                           or [np.empty(0, np.int32)]).astype(np.int32, copy=False)
    strings = encoded.chunk(encoded.num_chunks - 1).dictionary if encoded.num_chunks else pa.array([], pa.large_string())
    return Coded(strings, codes)


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
    """One row per prompt_hash code (in order of first appearance) with the number of splits it appears in."""
    if prompts is None:
        return pd.DataFrame({"prompt_hash": pd.Series(dtype="int32"), "n_splits": pd.Series(dtype="int64")})
    split = np.repeat(np.arange(len(rows), dtype=np.int64), rows)
    placed = prompts.codes >= 0
    in_split = np.unique(prompts.codes[placed].astype(np.int64) * len(rows) + split[placed])
    n_splits = np.bincount(in_split // len(rows), minlength=len(prompts.strings))
    return pd.DataFrame({"prompt_hash": np.arange(len(prompts.strings), dtype=np.int32), "n_splits": n_splits})


def unexpected_counts(values: list, limit: int) -> list[dict] | None:
    """GX's `partial_unexpected_counts` of a list of examples (None where GX leaves it out: unhashable values)."""
    hashable = [tuple(v.values()) if isinstance(v, dict) else v for v in values]
    try:
        return [{"value": k, "count": n} for k, n in sorted(Counter(hashable).most_common(limit),
                                                               key=lambda x: (-x[1], x[0]))]
    except TypeError:
        return None


def decode_examples(results: list, coded: dict[str, Coded], limit: int) -> None:
    """Put the strings back in place of the codes in each result's examples (what GX reported, in its order)."""
    for r in results:
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
