"""The vote table as a folder of parquet parts, one per accepted batch (`data/collected/votes/`).

A part is named for its batch (`rmpipe.core.paths.part_name`) and its bytes are a function of the batch's
votes alone: row groups of ROWS_PER_GROUP rows, arrays cut at fixed row offsets (`rmpipe.core.parts`), zstd. So
adding or removing a batch leaves every other part's bytes as they were, and collect's memo can keep a
batch's part itself and put it back by a hard link (`PartsFolder.add_sealed`), with no decoding at all.
The folder's order is the batches' order (`rmpipe.core.paths.vote_parts`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rmpipe.core.parts import FixedGroups, link_or_copy
from rmpipe.core.paths import part_name
from rmpipe.data.collect import key_sets
from rmpipe.data.collect.fast import VOTES_SCHEMA

ROWS_PER_GROUP = 50_000  # parquet row group of a votes part: ~100 MB of long texts, read a group at a time


@dataclass
class PartCounts:
    """What the vote table's totals need of one part: its votes, distinct pair digests and annotators."""

    votes: int
    pairs: key_sets.Packed
    annotators: list[str]


def write_part(out: Path, votes: pa.Table | Path, rows_per_group: int = ROWS_PER_GROUP) -> PartCounts:
    """Write one batch's votes (a table, or a parquet file read a row group's worth at a time) as the part
    `out`, counting them on the way. The bytes depend on the rows only (`rmpipe.core.parts.FixedGroups`)."""
    batches = (votes.to_batches(max_chunksize=rows_per_group) if isinstance(votes, pa.Table)
               else pq.ParquetFile(votes).iter_batches(batch_size=rows_per_group))
    pairs, annotators, n = key_sets.DigestSet(), set(), 0
    with FixedGroups(out, VOTES_SCHEMA, rows_per_group) as writer:
        for batch in batches:
            pairs.update(key_sets.digests_of(pc.unique(batch["pair_id"])))
            annotators.update(pc.unique(batch["annotator_id"]).to_pylist())
            n += batch.num_rows
            writer.write(pa.Table.from_batches([batch], schema=VOTES_SCHEMA))
    return PartCounts(n, pairs.packed(), sorted(annotators))


class PartsFolder:
    """The votes folder being written: one part per accepted batch, in file-name order, and the totals."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.pairs = key_sets.DigestSet()  # millions of pair ids: 24 bytes each, not a str in a set
        self.annotators: set[str] = set()
        self.votes = 0

    def path_of(self, batch_id: str) -> Path:
        return self.folder / part_name(batch_id)

    def add(self, batch_id: str, votes: pa.Table | Path) -> None:
        """A batch's votes: a table held in memory, or a parquet file on disk (deleted once written)."""
        self._count(write_part(self.path_of(batch_id), votes))
        if isinstance(votes, Path):
            votes.unlink()

    def add_sealed(self, batch_id: str, part: Path, counts: PartCounts) -> None:
        """A part already written (collect's memo keeps them): linked in, its counts already known."""
        link_or_copy(part, self.path_of(batch_id))
        self._count(counts)

    def _count(self, counts: PartCounts) -> None:
        self.pairs.update(counts.pairs)
        self.annotators.update(counts.annotators)
        self.votes += counts.votes

    def close(self) -> dict[str, int]:
        return {"votes": self.votes, "pairs": len(self.pairs), "annotators": len(self.annotators)}
