"""The texts of each pair's representative vote, keyed by pair code, in buckets of codes.

Aggregation works on integer codes (pair codes sort like pair_ids); only the output needs the
texts, in pair_id order, while the votes arrive in file order. Rows are appended to the bucket
their code falls in (codes [0, k), [k, 2k), ...) as the vote table streams by: in memory, or
as Arrow IPC files in a folder when one is given. Reading back bucket by bucket, each sorted by
code, yields the texts in output order while holding one bucket at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

SCHEMA = pa.schema([("code", pa.int64()), ("prompt", pa.string()), ("prompt_hash", pa.string()),
                    ("first", pa.string()), ("second", pa.string())])


class PairTexts:
    """Rows (code, prompt, prompt_hash, first, second); one row per pair code at most."""

    def __init__(self, folder: Path | None = None, bucket_codes: int | None = None):
        self.folder = folder
        self.bucket_codes = bucket_codes if folder is not None and bucket_codes else None  # None: one bucket
        self._memory: dict[int, list[pa.Table]] = {}
        self._writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}

    def _bucket_of(self, codes: np.ndarray) -> np.ndarray:
        return np.zeros(len(codes), np.int64) if self.bucket_codes is None else codes // self.bucket_codes

    def add(self, rows: pa.Table) -> None:
        rows = rows.cast(SCHEMA)
        buckets = self._bucket_of(rows.column("code").to_numpy())
        for bucket in np.unique(buckets):
            part = rows.filter(pa.array(buckets == bucket)) if len(np.unique(buckets)) > 1 else rows
            if self.folder is None:
                self._memory.setdefault(int(bucket), []).append(part)
            else:
                writer = self._writers.get(int(bucket))
                if writer is None:
                    sink = pa.OSFile(str(self.folder / f"pairs-{int(bucket):06d}.arrow"), "wb")
                    writer = self._writers[int(bucket)] = pa.ipc.new_file(sink, SCHEMA)
                writer.write_table(part)

    def finish(self) -> None:
        """Close the bucket files (after the last `add`)."""
        for writer in self._writers.values():
            writer.close()

    def bucket_ids(self) -> list[int]:
        return sorted(self._memory if self.folder is None else self._writers)

    def read(self, bucket: int) -> pa.Table:
        """One bucket's rows, in the order they were added."""
        if self.folder is None:
            return pa.concat_tables(self._memory[bucket])
        with pa.OSFile(str(self.folder / f"pairs-{bucket:06d}.arrow")) as source:
            return pa.ipc.open_file(source).read_all()

    def sorted_rows(self, wanted: np.ndarray) -> Iterator[pa.Table]:
        """The rows whose code is in `wanted` (sorted codes), bucket by bucket in code order, each bucket's
        strings contiguous (one take: a take on many chunks would concatenate them on every call)."""
        for bucket in self.bucket_ids():
            table = self.read(bucket)
            codes = table.column("code").to_numpy()
            order = np.argsort(codes, kind="stable")
            order = order[np.isin(codes[order], wanted)]
            yield table.take(pa.array(order)).combine_chunks()
            del table
            pa.default_memory_pool().release_unused()
