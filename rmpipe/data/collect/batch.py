"""Collect, one batch: a batch file -> its votes (an Arrow table, or a parquet part on disk), its
quarantined rows with reasons, and its report entry.

`collect.batch` is a function of the file, the settings and what earlier batches hold (content
hashes of the files read, keys of the votes accepted), so batches can be checked one by one, in
any process. The batch is read in chunks (`collect.read`), each chunk goes through the column-wise
fast path (`collect.fast`) and its remaining rows through the per-row path
(`collect.rows.Normalizer`), and the chunk's votes are appended to the batch's part as they come:
memory is that of a chunk plus one 16-byte key per vote (duplicate votes are found across chunks
and batches by key).

Statuses in the report entry:

  accepted          its votes are in the table
  rejected          too many bad rows (over `max_bad_share`), no rows at all, or the file cannot be read
  refused           not read at all: a symlink, a bad name, or over `max_file_mb`
  duplicate_of:<b>  byte-identical to batch <b>, already counted
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rmpipe.core import schema
from rmpipe.core.io import folder_sha256, sha256_file
from rmpipe.core.settings import CollectSettings
from rmpipe.data import retractions
from rmpipe.data.collect import hf_batches, key_sets
from rmpipe.data.collect.fast import VOTES_SCHEMA, fast_votes, votes_table
from rmpipe.data.collect.fields import REASONS, Bad
from rmpipe.data.collect.key_sets import SeenVotes, vote_key
from rmpipe.core.paths import CHUNK_ROWS
from rmpipe.data.collect.read import UNREADABLE, Chunk, chunks, raw_text
from rmpipe.data.collect.rows import ANNOTATOR, PAIR_ID, PREJUDGED, Normalizer

FORMATS = schema.BATCH_FORMATS
NO_ROWS = ("has no usable vote rows (it holds no rows at all: an empty file, a header only or blank lines): "
           "nothing to train on; deliver it with its rows or remove it")  # admission's words for it too
POLICIES = ("fail", "skip")  # collect.on_rejected_batch (CollectSettings checks it)


@dataclass
class BatchResult:
    """One batch file, checked: its report entry, its quarantined rows and its votes.

    The votes (whatever the status; only an accepted batch's reach the vote table) are in
    `table` when `collect.batch` was given no `votes_to` path, else in the parquet part at
    `part`. `keys` maps each vote's (annotator, pair) key to its line, for later batches.
    """

    batch_id: str
    report: dict
    quarantine: list[dict] = field(default_factory=list)
    table: pa.Table | None = None
    part: Path | None = None
    keys: dict[bytes, int] | key_sets.KeyLines = field(default_factory=dict)  # KeyLines: from collect's memo

    @property
    def accepted(self) -> bool:
        return self.report["status"] == "accepted"

    @property
    def votes(self) -> pd.DataFrame:
        """The batch's votes as a DataFrame (text columns of Python strings, as before chunking)."""
        table = self.table if self.part is None else pq.read_table(self.part)
        return votes_frame(table if table is not None else VOTES_SCHEMA.empty_table())


def votes_frame(table: pa.Table) -> pd.DataFrame:
    """A vote table as pandas with object text columns (None for a missing text)."""
    columns = {}
    for name in table.column_names:
        column = table[name]
        columns[name] = (pd.Series(column.to_pylist(), dtype=object) if pa.types.is_string(column.type)
                         else column.to_numpy())
    return pd.DataFrame(columns, columns=table.column_names)


# ----------------------------------------------------------------------------------------------
# Before reading: refusals
# ----------------------------------------------------------------------------------------------


def _file_problem(path: Path, conf: CollectSettings) -> str | None:
    """Why a batch file (or dataset folder) is refused unread, or None."""
    name = path.name
    if "/" in name or "\\" in name or ".." in name:
        return f"file name {name!r} holds a path separator or '..': rename it"
    if (size := len(name.encode("utf-8", "surrogateescape"))) > schema.MAX_BATCH_NAME_BYTES:
        return (f"file name is {size} bytes long, over {schema.MAX_BATCH_NAME_BYTES}: too long for its "
                f"{hf_batches.SOURCE_SUFFIX} sidecar and the names derived from it; rename it shorter")
    if path.is_symlink():
        return ("is a symbolic link; batches must be regular files inside the incoming folder "
                "(copy the file in; with DVC use `dvc config cache.type copy`)")
    if path.is_dir():
        return _folder_problem(path, conf)
    if not path.is_file():
        return "is not a regular file"
    size_mb = path.stat().st_size / 2**20
    if size_mb > conf.max_file_mb:
        return f"file is {size_mb:.1f} MB, over collect.max_file_mb={conf.max_file_mb:g}: split it into smaller batches"
    return None


def _folder_problem(path: Path, conf: CollectSettings) -> str | None:
    """A dataset folder: every file inside a regular file (no links out of the incoming folder), within max_file_mb."""
    files = hf_batches.folder_files(path)
    links = [f.relative_to(path).as_posix() for f in files if f.is_symlink()]
    if links:
        return (f"holds symbolic links ({', '.join(links[:3])}); a dataset folder must hold regular files only "
                "(copy them in; with DVC use `dvc config cache.type copy`)")
    size_mb = sum(f.stat().st_size for f in files) / 2**20
    if size_mb > conf.max_file_mb:
        return (f"dataset folder is {size_mb:.1f} MB, over collect.max_file_mb={conf.max_file_mb:g}: "
                "split it into smaller batches")
    return None


def _new_entry(path: Path) -> dict[str, Any]:
    return {
        "batch_id": path.name,
        "format": hf_batches.folder_kind(path) if path.is_dir() and not path.is_symlink() else FORMATS.get(path.suffix.lower()),
        "bytes": None, "sha256": None, "status": None,
        "rows_read": 0, "rows_normalized": 0, "rows_quarantined": 0, "rows_excluded_with_batch": 0, "votes": 0,
        "shapes": {}, "bad_share": 0.0, "top_reasons": [], "message": None,
    }


def _screen(path: Path, conf: CollectSettings, entry: dict, seen_files: Mapping[str, str], retracted: list[dict],
            sha_of: Callable[[Path], str] = sha256_file) -> bool:
    """Settle a batch that is not to be read (refused, unreadable, retracted, a duplicate file): True if so."""
    batch_id = path.name
    problem = _file_problem(path, conf)
    if problem:
        entry.update(status="refused", message=f"{batch_id}: {problem}")
        return True
    try:
        if path.is_dir():
            entry["bytes"] = sum(f.stat().st_size for f in hf_batches.folder_files(path))
            entry["sha256"] = folder_sha256(path)
        else:
            entry["bytes"] = path.stat().st_size
            entry["sha256"] = sha_of(path)
    except OSError as exc:  # e.g. chmod 000: the batch cannot be read at all
        entry.update(status="rejected", message=f"{batch_id}: cannot read the file ({exc.strerror or exc}): "
                                                "fix its permissions (chmod a+r) or remove it")
        return True
    if (why := retractions.refusal(retracted, batch_id, entry["sha256"])) is not None:
        entry.update(status="refused", message=why)
        return True
    if entry["sha256"] in seen_files:
        original = seen_files[entry["sha256"]]
        entry.update(status=f"duplicate_of:{original}",
                     message=f"{batch_id} has the same bytes as {original}: counted once, under {original}")
        return True
    return False


def screen(path: Path, conf: CollectSettings, seen_files: Mapping[str, str], retracted: list[dict],
           sha_of: Callable[[Path], str] = sha256_file) -> tuple[dict, bool]:
    """(report entry, settled): settled without reading its rows (refused, retracted, a duplicate file...)."""
    entry = _new_entry(path)
    return entry, _screen(path, conf, entry, seen_files, retracted, sha_of)


def read_files(entry: dict) -> bool:
    """Whether a batch's bytes were read (a later file with the same bytes is then its duplicate)."""
    return entry["sha256"] is not None and entry["status"] in ("accepted", "rejected")


# ----------------------------------------------------------------------------------------------
# Reading: chunk by chunk
# ----------------------------------------------------------------------------------------------


class _Batch:
    """What one batch has gathered so far: its votes (written as they come), quarantine and counts."""

    def __init__(self, batch_id: str, earlier: SeenVotes, votes_to: Path | None, hold_bytes: float):
        self.batch_id, self.earlier = batch_id, earlier
        self.first_here: dict[bytes, int] = {}  # vote key -> line of its vote in this batch
        self.before: dict[bytes, str] = {}  # vote key -> where an earlier batch has it, for the chunk at hand
        self.quarantine: list[dict] = []
        self.shapes = Counter({"vote": 0, "pair": 0, "ranked": 0})  # normalized rows per shape
        self.group_votes = self.rows_read = self.votes = 0
        self.tables: list[pa.Table] = []  # votes held in memory (all of them when there is no `votes_to`)
        self.held = 0  # their bytes
        self.votes_to, self.hold_bytes = votes_to, hold_bytes
        self.writer: pq.ParquetWriter | None = None

    def _earlier(self, key: bytes) -> str | None:
        line = self.first_here.get(key)
        return f"line {line}" if line is not None else self.before.get(key)

    def add(self, chunk: Chunk, norm: Normalizer, fast: bool) -> None:
        """Every row of the chunk to the votes or the quarantine, in line order."""
        self.rows_read += len(chunk.lines)
        found = fast_votes(chunk.table, norm, chunk.nulls_may_be_absent, self.batch_id) if fast and chunk.table is not None else None
        fast_rows, fast_table = found if found is not None else (np.zeros(0, dtype=np.int64), None)
        fast_at = {chunk.table_rows[row]: i for i, row in enumerate(fast_rows.tolist())}
        keys = [] if fast_table is None else key_sets.joined_digests(fast_table["annotator_id"], fast_table["pair_id"])
        fast_shape = "pair" if fast_table is not None and fast_table.num_rows and fast_table["prejudged"][0].as_py() else "vote"
        slow = {pos: self._outcome(chunk, pos, norm) for pos in range(len(chunk.lines)) if pos not in fast_at}
        self._look_up_earlier(keys + [key for _, _, row_keys in slow.values() for key in row_keys])
        slow_lines: list[int] = []
        slow_votes: list[tuple] = []
        order: list[int] = []  # rows of concat(fast votes, slow votes) to keep, in line order
        for pos, line in enumerate(chunk.lines):
            i = fast_at.get(pos)
            if i is not None:
                earlier = self._earlier(keys[i])
                if earlier is None:
                    self.first_here[keys[i]] = line
                    self.shapes[fast_shape] += 1
                    order.append(i)
                    continue
                outcome, raw = _duplicate(fast_table["annotator_id"][i].as_py(), earlier), chunk.record(pos)[1]
            else:
                outcome, raw, row_keys = slow[pos]
                outcome = self._admit(outcome, row_keys, line, slow_lines, slow_votes, order, len(fast_at))
                if outcome is None:
                    continue
            self.quarantine.append({"batch_id": self.batch_id, "line": line, "code": outcome.code,
                                    "reason": outcome.reason, "raw": raw_text(raw)})
        self._write(fast_table, [chunk.lines[chunk.table_rows[r]] for r in fast_rows.tolist()],
                    slow_lines, slow_votes, order)

    def _outcome(self, chunk: Chunk, pos: int, norm: Normalizer) -> tuple[Any, Any, list[bytes]]:
        """A row of the per-row path: (its vote(s) or why not, the raw record, its votes' keys)."""
        rec, raw = chunk.record(pos)
        outcome = rec if type(rec) is Bad else norm.normalize(rec, self.batch_id)
        return outcome, raw, _vote_keys(outcome)

    def _look_up_earlier(self, keys: list[bytes]) -> None:
        """Which of the chunk's vote keys earlier batches hold, in one search (a search per vote costs ~30 us)."""
        self.before = {key: where for key, where in zip(keys, self.earlier.where_each(keys)) if where is not None}

    def _admit(self, outcome: Any, keys: list[bytes], line: int, lines: list[int], votes: list[tuple],
               order: list[int], offset: int) -> Bad | None:
        """A per-row outcome (and its votes' keys) into the votes (None) or the reason it goes to quarantine."""
        if type(outcome) is tuple:
            key = keys[0]
            earlier = self._earlier(key)
            if earlier is not None:
                return _duplicate(outcome[ANNOTATOR], earlier)
            self.first_here[key] = line
            self.shapes["pair" if outcome[PREJUDGED] else "vote"] += 1
            group = [outcome]
        elif type(outcome) is list:  # a ranked/rated group: all its comparisons, or (any repeated) none
            repeated = next(((v, self._earlier(k)) for v, k in zip(outcome, keys) if self._earlier(k)), None)
            if repeated is not None:
                return Bad("duplicate_vote", f"duplicate vote: annotator {repeated[0][ANNOTATOR]} already judged a "
                                             f"comparison of this group ({repeated[1]}); the first vote is kept, this "
                                             "whole group is not")
            self.first_here.update({k: line for k in keys})
            self.shapes["ranked"] += 1
            self.group_votes += len(outcome)
            group = outcome
        else:
            return outcome
        order.extend(range(offset + len(votes), offset + len(votes) + len(group)))
        votes.extend(group)
        lines.extend([line] * len(group))
        return None

    def _write(self, fast_table: pa.Table | None, fast_lines: list[int], slow_lines: list[int],
               slow_votes: list[tuple], order: list[int]) -> None:
        parts = [votes_table(self.batch_id, slow_lines, slow_votes)]
        if fast_table is not None:
            ids = pa.array([self.batch_id] * len(fast_lines), pa.string())
            parts.insert(0, pa.table([ids, pa.array(fast_lines, pa.int64()), *fast_table.columns], schema=VOTES_SCHEMA))
        table = pa.concat_tables(parts)
        if order != list(range(table.num_rows)):  # all rows kept in order: no copy
            table = table.take(pa.array(order, pa.int64()))
        self.votes += table.num_rows
        self.tables.append(table)
        self.held += table.nbytes
        if self.votes_to is not None and self.held > self.hold_bytes:
            self._spill()

    def _spill(self) -> None:
        """Move the votes held in memory to the part on disk (opened at the first spill)."""
        if self.writer is None:  # read back once by the merge: not worth compressing or dictionary-encoding
            self.writer = pq.ParquetWriter(self.votes_to, VOTES_SCHEMA, compression="none", use_dictionary=False)
        for table in self.tables:
            if table.num_rows:
                self.writer.write_table(table)
        self.tables, self.held = [], 0

    def close(self) -> tuple[pa.Table | None, Path | None]:
        """(votes held in memory, or None when they went to the part; the part, or None)."""
        if self.writer is not None:
            self._spill()
            self.writer.close()
            return None, self.votes_to
        return (pa.concat_tables(self.tables) if self.tables else VOTES_SCHEMA.empty_table()), None


def _vote_keys(outcome: Any) -> list[bytes]:
    """The vote keys of a per-row outcome: one for a vote, one per comparison of a group, none for a Bad."""
    if type(outcome) is tuple:
        return [vote_key(outcome[ANNOTATOR], outcome[PAIR_ID])]
    if type(outcome) is list:
        return [vote_key(vote[ANNOTATOR], vote[PAIR_ID]) for vote in outcome]
    return []


def _duplicate(annotator: str, earlier: str) -> Bad:
    return Bad("duplicate_vote", f"duplicate vote: annotator {annotator} already judged this pair ({earlier}); "
                                 "the first vote is kept")


def _top_reasons(quarantine: list[dict], n: int = 5) -> list[dict]:
    counts = Counter(row["code"] for row in quarantine)
    first = {}
    for row in quarantine:
        first.setdefault(row["code"], row)
    return [
        {"reason": REASONS[code], "code": code, "count": count,
         "example": f"line {first[code]['line']}: {first[code]['reason']}"}
        for code, count in counts.most_common(n)
    ]


def _rejection_message(entry: dict, conf: CollectSettings) -> str:
    top = "; ".join(f"{r['reason']} x{r['count']} (e.g. {r['example']})" for r in entry["top_reasons"][:3])
    return (f"{entry['batch_id']}: {entry['bad_share']:.1%} of its {entry['rows_read']} rows are bad, over "
            f"collect.max_bad_share={conf.max_bad_share:g}; top reasons: {top}")


def _settle(entry: dict, batch: _Batch, unreadable: str | None, conf: CollectSettings) -> None:
    """The entry's counts and status once the batch is read."""
    shapes = batch.shapes
    entry["rows_read"] = batch.rows_read
    entry["rows_normalized"] = sum(shapes.values())
    entry["votes"] = batch.votes
    # What each row became: a vote row or pair row is one vote; a group of K responses is K(K-1)/2 votes.
    entry["shapes"] = {"vote_rows": shapes["vote"], "pair_rows": shapes["pair"], "ranked_rows": shapes["ranked"],
                       "votes_from_ranked_rows": batch.group_votes}
    entry["rows_quarantined"] = len(batch.quarantine)
    entry["bad_share"] = round(len(batch.quarantine) / entry["rows_read"], 6) if entry["rows_read"] else 0.0
    entry["top_reasons"] = _top_reasons(batch.quarantine)
    if unreadable:
        entry.update(status="rejected", message=unreadable)
    elif not entry["rows_read"]:  # admission refuses it too: it would be registered yet never reach a model
        entry.update(status="rejected", message=f"{entry['batch_id']}: {NO_ROWS}")
    elif entry["bad_share"] > conf.max_bad_share:
        entry.update(status="rejected", message=_rejection_message(entry, conf))
    else:
        entry["status"] = "accepted"
    if entry["status"] != "accepted":
        entry["rows_excluded_with_batch"] = entry["rows_normalized"]


def collect_batch(path: str | Path, conf: CollectSettings, *, earlier: SeenVotes | None = None,
                  seen_files: Mapping[str, str] | None = None, retracted: list[dict] | None = None,
                  votes_to: Path | None = None, hold_mb: float = 0, fast: bool = True,
                  chunk_rows: int = CHUNK_ROWS, sha_of: Callable[[Path], str] = sha256_file) -> BatchResult:
    """Check and normalize one batch file (or dataset folder).

    earlier     votes of batches already accepted (a repeat is a duplicate vote); default none
    seen_files  content sha256 -> batch of files already read (a repeat is a duplicate file)
    retracted   the retraction register (a retracted batch is refused unread)
    votes_to    write the votes to this parquet part as they come; default: keep them in memory
    hold_mb     with `votes_to`: keep up to this many MB of votes in memory first, so a batch that fits
                never goes to disk (BatchResult.table, no part)
    fast        the column-wise fast path (False: every row through the per-row path, same result)
    chunk_rows  rows per chunk (memory is that of a chunk; the result does not depend on it)
    sha_of      a regular file's content sha256 (the collect memo's remembers unchanged files')
    """
    path = Path(path)
    entry = _new_entry(path)
    if _screen(path, conf, entry, seen_files or {}, retracted or [], sha_of):
        return BatchResult(path.name, entry)
    batch = _Batch(path.name, earlier or SeenVotes(), votes_to, hold_mb * 2**20)
    norm = Normalizer(conf.max_field_chars, conf.margin_from_scores)
    unreadable = None
    reader = chunks(path, entry["format"], chunk_rows, conf.hf_split)
    while True:
        try:
            chunk = next(reader)
        except StopIteration:
            break
        except UNREADABLE as exc:  # the file itself is broken (not one row): reject the batch
            unreadable = f"{path.name}: cannot read the {entry['format']} file after {batch.rows_read} rows: {exc}"
            break
        batch.add(chunk, norm, fast)
        norm.trim()
    table, part = batch.close()
    _settle(entry, batch, unreadable, conf)
    return BatchResult(path.name, entry, batch.quarantine, table, part,
                       batch.first_here if entry["status"] == "accepted" else {})
