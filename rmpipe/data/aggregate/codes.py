"""The vote table as integer codes: what every aggregation pass works on, a few bytes per vote.

Each id column (pair_id, annotator_id, batch_id, group_id, strength, choice) becomes a numpy
array of codes into its sorted distinct values (codes sort like the names; -1 = missing), built
from Arrow dictionary arrays one column at a time. No Python object per vote or per pair and no
pandas frame is built: the pair names stay one Arrow string array. `line` is read only to put
the votes in (batch_id, line) order, kept as a permutation only where the file is not in that
order already. The whole table is ~30 bytes a vote (README, Benchmarks: "Aggregate, nearly flat").
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass, field, fields
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from rmpipe.core.schema import CHOICES, VOTE_DEFAULTS

ID_COLUMNS = ("pair_id", "annotator_id", "batch_id", "group_id", "strength", "choice")


def release_memory() -> None:
    """Hand freed memory back to the OS between phases, so one phase's peak does not stack on the last one's
    leftovers: Arrow's pool keeps freed blocks, and glibc keeps the freed heap pages of mid-sized arrays."""
    pa.default_memory_pool().release_unused()
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None


def small_int(n: int) -> type:
    """The narrowest signed integer dtype holding codes -1 .. n-1."""
    return next(t for t in (np.int8, np.int16, np.int32, np.int64) if n <= np.iinfo(t).max)


def codes_of(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, pa.Array]:
    """A column's values as codes into its sorted distinct non-null values (-1 = null), and those values.
    The same codes as a pandas categorical with sorted categories (Arrow sorts strings by code point)."""
    if isinstance(column, pa.Array):
        column = pa.chunked_array([column])
    if pa.types.is_null(column.type) or column.null_count == len(column):
        return np.full(len(column), -1, np.int8), pa.array([], pa.string())
    if not pa.types.is_dictionary(column.type):
        column = pc.dictionary_encode(column)
    column = column.unify_dictionaries()
    values = column.chunk(0).dictionary if column.num_chunks else pa.array([], column.type.value_type)
    indices = np.concatenate([pc.fill_null(chunk.indices, -1).to_numpy() for chunk in column.chunks]
                             or [np.zeros(0, np.int32)])
    del column
    used = np.bincount(indices[indices >= 0], minlength=len(values)) > 0
    used &= values.is_valid().to_numpy(zero_copy_only=False)
    kept = np.flatnonzero(used)
    order = pc.array_sort_indices(values.take(pa.array(kept))).to_numpy()
    rank = np.full(len(values) + 1, -1, small_int(len(kept)))  # the last slot: index -1 (null) -> -1
    rank[kept[order]] = np.arange(len(kept))
    return rank[indices], values.take(pa.array(kept[order]))


def pair_key(pair: np.ndarray, other: np.ndarray, n_other: int, n_pairs: int) -> np.ndarray:
    """One integer per (pair, other code), ordered by pair then other: int32 where it fits (half the memory)."""
    n_other = max(n_other, 1)
    dtype = np.int32 if max(n_pairs, 1) * n_other < 2**31 else np.int64
    return pair.astype(dtype) * dtype(n_other) + other


def choice_codes(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """int8 per vote: the index of its choice in schema.CHOICES ("a", "b", "tie"), -1 for anything else."""
    codes, names = codes_of(column)
    lookup = np.array([CHOICES.index(n) if n in CHOICES else -1 for n in names.to_pylist()] + [-1], np.int8)
    return lookup[codes]


def input_order(batch: np.ndarray, line: np.ndarray) -> np.ndarray | None:
    """Row positions in (batch_id, line) order (ties: file order); None where the rows are in that order."""
    if len(batch) < 2:
        return None
    same = batch[1:] == batch[:-1]
    if bool(np.all((batch[1:] > batch[:-1]) | (same & (line[1:] >= line[:-1])))):
        return None
    return np.lexsort((line, batch))


@dataclass
class VoteCodes:
    """One entry per input vote, in input order; ids as codes into the sorted `*_names`."""

    pair: np.ndarray  # code into pair_names, -1 = missing
    annotator: np.ndarray
    batch: np.ndarray
    group: np.ndarray
    strength: np.ndarray
    choice: np.ndarray  # int8 index into schema.CHOICES, -1 = anything else
    margin: np.ndarray  # float64, NaN = none
    prejudged: np.ndarray  # bool
    weight: np.ndarray  # n_votes: the judgements a row stands for
    order: np.ndarray | None  # rows in (batch_id, line) order; None: input order is that order
    pair_names: pa.Array
    annotator_names: pd.Index
    batch_names: pd.Index
    group_names: pd.Index
    strength_names: pd.Index
    # from the text columns (aggregate_orient): canonical label, normalized text lengths
    label: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    len_first: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    len_second: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))

    def __len__(self) -> int:
        return len(self.pair)

    @property
    def chose_a(self) -> np.ndarray:
        return self.choice == CHOICES.index("a")

    def in_order(self, rows: np.ndarray) -> np.ndarray:
        """The positions where the bool mask `rows` is set, in (batch_id, line) order."""
        return np.flatnonzero(rows) if self.order is None else self.order[rows[self.order]]

    def of_pairs(self, per_pair: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """A per-pair array's value for each vote where the mask `rows` is set (pair code known), else False/0."""
        out = np.zeros(len(self), per_pair.dtype)
        out[rows] = per_pair[self.pair[rows]]
        return out

    def select(self, rows: np.ndarray, *columns: str) -> dict[str, np.ndarray]:
        """The named columns at the rows where the bool mask `rows` is set (each a copy of that subset)."""
        return {name: getattr(self, name)[rows] for name in columns}

    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in fields(self) if isinstance(getattr(self, f.name), np.ndarray))


def read_codes(read: Callable[[str], pa.ChunkedArray | None], n: int) -> VoteCodes:
    """The small vote columns as codes; `read(name)` gives one column (None where the table lacks it)."""
    names, codes = {}, {}
    for column in ID_COLUMNS[:-1]:
        values = read(column)
        codes[column], names[column] = codes_of(values if values is not None else pa.nulls(n, pa.string()))
        del values
        release_memory()  # a column's Arrow buffers: the next column's must not stack on them
    choice = choice_codes(read("choice"))
    order = input_order(codes["batch_id"], _filled(read("line"), None, n))
    margin = read("margin")
    return VoteCodes(
        pair=codes["pair_id"], annotator=codes["annotator_id"], batch=codes["batch_id"], group=codes["group_id"],
        strength=codes["strength"], choice=choice,
        margin=np.full(n, np.nan) if margin is None else _floats(margin),
        prejudged=_filled(read("prejudged"), VOTE_DEFAULTS["prejudged"], n).astype(bool),
        weight=_narrow(_filled(read("n_votes"), VOTE_DEFAULTS["n_votes"], n).astype(np.int64)),
        order=order,
        pair_names=names["pair_id"],
        **{f"{c.removesuffix('_id')}_names": pd.Index(names[c].to_pandas())
           for c in ("annotator_id", "batch_id", "group_id", "strength")},
    )


def _filled(column: pa.ChunkedArray | None, default, n: int) -> np.ndarray:
    """A column as numpy, nulls (or the whole column where absent) as `default`."""
    if column is None:
        return np.zeros(n, np.int64) if default is None else np.full(n, default)
    if default is not None:
        column = pc.fill_null(column, default)
    return column.to_numpy()


def _floats(column: pa.ChunkedArray) -> np.ndarray:
    if not pa.types.is_floating(column.type) and not pa.types.is_integer(column.type):
        return pd.to_numeric(column.to_pandas(), errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    return column.cast(pa.float64()).to_numpy(zero_copy_only=False)


def _narrow(values: np.ndarray) -> np.ndarray:
    """Integers in the narrowest dtype holding them (n_votes is 1 on nearly every row)."""
    if len(values) == 0:
        return values
    lo, hi = int(values.min()), int(values.max())
    return values.astype(small_int(max(abs(lo), hi) + 1))
