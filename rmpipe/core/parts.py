"""Parquet parts whose bytes depend on their rows only, and sealed copies of them put back by a link.

Folder outputs made of parts (the votes, the aggregated pairs) keep a part's bytes when other parts come or
go; a memo can then hold a part itself and restore it by a hard link, never decoding it. For that a part's
bytes must be a function of its rows, not of how they arrived: `FixedGroups` writes row groups of a fixed
size, each cut into arrays at fixed row offsets (`rechunked`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Self

import pyarrow as pa
import pyarrow.parquet as pq

WRITE_BATCH_ROWS = 1024  # rows the parquet writer takes at a time; a part's arrays are cut at its multiples


def rechunked(table: pa.Table) -> pa.Table:
    """`table` in chunks of exactly WRITE_BATCH_ROWS rows (the last one shorter), whatever chunks it came in.

    The parquet writer takes a column chunk by chunk, WRITE_BATCH_ROWS rows at a time from each chunk's
    start, and decides page breaks and the dictionary fallback at those steps: the same rows in other chunks
    (a batch held in memory, one read back from a Dask worker's part, other read chunk sizes) gave other pages
    and other bytes. Cut at fixed row offsets, the bytes depend on the rows only (and each window of text
    stays far below Arrow's 2 GB per-array limit)."""
    windows = [table.slice(start, WRITE_BATCH_ROWS).combine_chunks()
               for start in range(0, table.num_rows, WRITE_BATCH_ROWS)]
    return pa.Table.from_batches([batch for window in windows for batch in window.to_batches()], schema=table.schema)


class FixedGroups:
    """A parquet file of `schema`, written in row groups of `rows` rows whatever sizes the tables come in."""

    def __init__(self, path: Path, schema: pa.Schema, rows: int, compression: str = "zstd"):
        self.schema, self.rows, self.written = schema, rows, 0
        self.writer = pq.ParquetWriter(path, schema, compression=compression, write_batch_size=WRITE_BATCH_ROWS)
        self.pending: list[pa.Table] = []

    def write(self, table: pa.Table) -> None:
        self.pending.append(table.cast(self.schema) if table.schema != self.schema else table)
        self._flush(final=False)

    def _flush(self, final: bool) -> None:
        """Write whole row groups from `pending` (all of it when `final`); keep the rest pending."""
        size = sum(t.num_rows for t in self.pending)
        if size < self.rows and not (final and size):
            return
        table = pa.concat_tables(self.pending)
        start = 0
        while table.num_rows - start >= self.rows or (final and start < table.num_rows):
            self.writer.write_table(rechunked(table.slice(start, self.rows)), row_group_size=self.rows)
            start += self.rows
        self.written += start if not final else table.num_rows
        self.pending = [table.slice(start)] if start < table.num_rows else []

    def close(self) -> None:
        self._flush(final=True)
        if self.written == 0:
            self.writer.write_table(self.schema.empty_table())  # a file needs its schema and a row group
        self.writer.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()
        else:
            self.writer.close()


def link_or_copy(source: Path, target: Path) -> None:
    """`target` holding `source`'s bytes: a hard link (no byte written), or a copy across filesystems."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
