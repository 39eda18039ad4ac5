"""Votes -> canonical orientation, streaming the text columns once.

A pair may be shown as A/B to one annotator and B/A to another. Every vote becomes a
label in the pair's *canonical* order: "first" is the response whose normalized text
(schema.normalize_text) sorts first, the rule schema.pair_id uses.

Memory. `read_votes` reads the small columns one at a time as integer codes (aggregate_codes:
a few bytes per vote), streams the text columns in record batches to orient each vote, and hands the
texts of one representative vote per pair (lowest batch_id, line) to a `PairTexts`
store, which spills them to disk in buckets of pair codes. Nothing but one record batch
of texts and one bucket is ever held, whatever the number of votes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rmpipe.core.errors import DataError
from rmpipe.core.paths import parts_in
from rmpipe.core.schema import CHOICES, VOTE_COLUMNS, VOTE_DEFAULTS
from rmpipe.data.aggregate.codes import (
    ID_COLUMNS,
    VoteCodes,
    read_codes,
    release_memory,
)
from rmpipe.data.aggregate.texts import PairTexts
from rmpipe.data.aggregate.vocab import FIRST, IDENTICAL, MALFORMED, SECOND, TIE

log = logging.getLogger("rmpipe.aggregate")

TEXT_COLUMNS = ["prompt", "prompt_hash", "response_a", "response_b"]
# Vote tables written before collect carried prompt_hash lack it: aggregate computes it then. The
# pre-judged columns take their schema.VOTE_DEFAULTS (an A/B vote, one judgement) where absent.
OPTIONAL_COLUMNS = ("prompt_hash", *VOTE_DEFAULTS)
A_CHOICE, B_CHOICE, TIE_CHOICE = (CHOICES.index(c) for c in ("a", "b", "tie"))
BUCKET_BYTES = 64 * 2**20  # texts per spilled bucket of pairs

# Every character Python's str.isspace() accepts (what `\s` means in schema.normalize_text),
# spelled for RE2 so pyarrow can normalize millions of texts without a Python loop.
PY_WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
    "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_WS = "".join(f"\\x{{{ord(c):x}}}" for c in PY_WHITESPACE)
_WS_NOT_SPACE = "".join(f"\\x{{{ord(c):x}}}" for c in PY_WHITESPACE if c != " ")
# Rewrite only runs of 2+ whitespace and lone non-space whitespace: the same result as
# `\s+` -> " ", with far fewer matches (every space matches `\s+`), ~10x faster.
_WS_PATTERN = f"[{_WS}]{{2,}}|[{_WS_NOT_SPACE}]"


@dataclass
class Votes:
    """Votes in canonical orientation.

    codes: one entry per input vote, in input order (aggregate_codes.VoteCodes), with each vote's
      label (FIRST, SECOND, TIE, or MALFORMED / IDENTICAL) and the lengths of its normalized
      first/second texts (to spot a reused pair_id) filled in from the text columns.
    texts: the raw texts (prompt, prompt_hash, first, second) of each pair's representative
      vote, keyed by pair code (prompt_hash null where the vote table did not carry it).
    """

    codes: VoteCodes
    texts: PairTexts


def _already_normal(texts: pa.Array) -> pa.Array:
    """True where normalize_text keeps the text as is: printable ASCII (NFKC keeps it; no whitespace
    but the space), no double space, no space at either end. Null -> False."""
    ends = pc.or_(pc.starts_with(texts, " "), pc.ends_with(texts, " "))
    clean = pc.and_(pc.ascii_is_printable(texts), pc.invert(ends))
    return pc.fill_null(pc.and_(clean, pc.invert(_double_spaced(texts))), False)


def _double_spaced(texts: pa.Array) -> pa.Array:
    """True where a text holds two spaces in a row (null slots: any value, the caller masks them)."""
    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)) or texts.buffers()[2] is None:
        return pc.match_substring_regex(texts, "  ")  # (RE2 finds the literal ~3x faster than match_substring)
    # One numpy pass over the string bytes: twice as fast as RE2, on the hottest loop of aggregate.
    offsets = np.frombuffer(texts.buffers()[1], np.int64 if pa.types.is_large_string(texts.type) else np.int32)
    offsets = offsets[texts.offset:texts.offset + len(texts) + 1].astype(np.int64)
    space = np.frombuffer(texts.buffers()[2], np.uint8)[offsets[0]:offsets[-1]] == ord(" ")
    at = np.flatnonzero(space[:-1] & space[1:]) + offsets[0]  # the first byte of each "  "
    rows = np.searchsorted(offsets, at, side="right") - 1
    found = np.zeros(len(texts), bool)
    found[rows[at + 1 < offsets[rows + 1]]] = True  # both spaces in one text, not the end of one and the next
    return pa.array(found)


def canonical_key(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """schema.normalize_text over a whole column (NFKC, whitespace runs -> one space, ends stripped).

    Most real texts are already normal: only the others go through NFKC and the regex (about half
    the time of normalizing every text)."""
    if isinstance(texts, pa.ChunkedArray):
        return pa.chunked_array([canonical_key(chunk) for chunk in texts.chunks], texts.type)
    clean = _already_normal(texts)
    if pc.all(clean).as_py() is not False:  # all clean, or empty
        return texts
    dirty = pc.invert(clean)
    return pc.replace_with_mask(texts, dirty, _normalize(pc.filter(texts, dirty)))


def _normalize(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    normalized = pc.utf8_normalize(texts, form="NFKC")
    collapsed = pc.replace_substring_regex(normalized, pattern=_WS_PATTERN, replacement=" ")
    return pc.utf8_trim(collapsed, characters=" ")


def require_columns(columns: Iterable[str], where: str) -> None:
    missing = [c for c in VOTE_COLUMNS if c not in set(columns) and c not in OPTIONAL_COLUMNS]
    if missing:
        raise DataError(f"{where} lacks the vote columns {missing}: is it the output of the collect stage?")


def _representative_rows(codes: VoteCodes) -> np.ndarray:
    """Sorted row positions of each pair's lowest (batch_id, line) vote with a known choice.

    Depends on neither row order nor A/B presentation, so the output texts do not either.
    """
    rows = codes.in_order((codes.pair >= 0) & (codes.annotator >= 0) & (codes.choice >= 0))
    first = np.unique(codes.pair[rows], return_index=True)[1]  # the first of each pair in that order
    return np.sort(rows[first])


class _Orientation:
    """Fills the per-vote facts that need the text columns, batch by batch: the canonical label and the
    normalized text lengths (int32: collect caps a text at collect.max_field_chars)."""

    def __init__(self, codes: VoteCodes):
        n = len(codes)
        self.codes = codes
        codes.label, codes.len_first, codes.len_second = np.zeros(n, np.int8), np.zeros(n, np.int32), np.zeros(n, np.int32)

    def fill(self, start: int, batch: pa.RecordBatch) -> pa.Array:
        """Orient rows start.. of one batch; return first_is_a for them."""
        stop, codes = start + batch.num_rows, self.codes
        key_a, key_b = canonical_key(batch.column("response_a")), canonical_key(batch.column("response_b"))
        first_is_a = pc.fill_null(pc.less_equal(key_a, key_b), True)

        def numpy(values: pa.Array) -> np.ndarray:
            return values.to_numpy(zero_copy_only=False)

        a_first = numpy(first_is_a)
        choice = codes.choice[start:stop]
        label = np.select([choice == TIE_CHOICE, choice == A_CHOICE, choice == B_CHOICE],
                          [TIE, np.where(a_first, FIRST, SECOND), np.where(a_first, SECOND, FIRST)], MALFORMED)
        label[numpy(pc.fill_null(pc.equal(key_a, key_b), False)) & (label >= 0)] = IDENTICAL
        readable = numpy(pc.and_(pc.is_valid(key_a), pc.is_valid(key_b)))
        label[~readable | (codes.pair[start:stop] < 0) | (codes.annotator[start:stop] < 0)] = MALFORMED
        codes.label[start:stop] = label
        len_a, len_b = numpy(pc.fill_null(pc.utf8_length(key_a), 0)), numpy(pc.fill_null(pc.utf8_length(key_b), 0))
        codes.len_first[start:stop] = np.where(a_first, len_a, len_b)
        codes.len_second[start:stop] = np.where(a_first, len_b, len_a)
        return first_is_a


def _keep_texts(store: PairTexts, batch: pa.RecordBatch, here: np.ndarray, first_is_a: pa.Array,
                codes: np.ndarray) -> None:
    """Hand the representative rows `here` (positions in `batch`) to the text store, keyed by pair code."""
    rows, flag = batch.take(pa.array(here)), first_is_a.take(pa.array(here))
    a_rep, b_rep = rows.column("response_a"), rows.column("response_b")
    names = rows.schema.names
    given = rows.column("prompt_hash").cast(pa.string()) if "prompt_hash" in names else pa.nulls(len(here), pa.string())
    store.add(pa.table({
        "code": pa.array(codes, pa.int64()),
        "prompt": rows.column("prompt").cast(pa.string()),
        "prompt_hash": given,
        "first": pc.if_else(flag, a_rep, b_rep).cast(pa.string()),
        "second": pc.if_else(flag, b_rep, a_rep).cast(pa.string()),
    }))


def _orient(codes: VoteCodes, text_batches: Iterable[pa.RecordBatch], store: PairTexts) -> Votes:
    """Label every vote in canonical order; keep the texts of each pair's representative vote."""
    reps = _representative_rows(codes)
    facts = _Orientation(codes)
    start = 0
    for k, batch in enumerate(text_batches):
        first_is_a = facts.fill(start, batch)
        lo, hi = np.searchsorted(reps, [start, start + batch.num_rows])
        if hi > lo:
            here = reps[lo:hi]
            _keep_texts(store, batch, here - start, first_is_a, codes.pair[here])
        start += batch.num_rows
        del batch, first_is_a
        if k % 2 == 1:  # decoded texts pile up in Arrow's pool; every other batch: half the page faults of each
            pa.default_memory_pool().release_unused()
    if start != len(codes):
        raise RuntimeError(f"text columns have {start} rows, small columns {len(codes)}")
    store.finish()
    return Votes(codes=codes, texts=store)


def orient_votes(votes: pd.DataFrame) -> Votes:
    """Orient an in-memory vote table (columns schema.VOTE_COLUMNS); its pair texts stay in memory."""
    require_columns(votes.columns, "the vote table")
    votes = votes.reset_index(drop=True)
    # from_pandas for prompt_hash only: a hand-built table may leave it NaN (computed later); a NaN text stays an error
    texts = pa.table({c: pa.array(votes[c].to_numpy(dtype=object), pa.string(), from_pandas=c == "prompt_hash")
                      for c in TEXT_COLUMNS if c in votes.columns})

    def read(name: str) -> pa.ChunkedArray | None:
        return pa.chunked_array([pa.array(votes[name], from_pandas=True)]) if name in votes.columns else None

    return _orient(read_codes(read, len(votes)), texts.to_batches(), PairTexts())


class VoteParts:
    """The collect stage's votes folder (or one parquet file) read as one table, part after part in batch order
    (`rmpipe.core.paths.parts_in`): a column across all parts, or the text columns a record batch at a time."""

    def __init__(self, location: str | Path):
        self.parts = parts_in(Path(location))
        if not self.parts:
            raise DataError(f"{location} not found: run the collect stage first (`dvc repro collect`)")
        try:
            names = pq.read_schema(self.parts[0]).names
            self.files = [pq.ParquetFile(part, pre_buffer=False, read_dictionary=[c for c in ID_COLUMNS if c in names])
                          for part in self.parts]  # pre_buffer=False: one column chunk at a time, not the whole file
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{location} holds a part that is not a readable parquet file ({exc}): re-run the "
                            "collect stage") from None
        self.names = names
        for part, file in zip(self.parts, self.files):
            require_columns(file.schema_arrow.names, str(part))
            if file.schema_arrow.names != names:
                raise DataError(f"{part} has other columns than {self.parts[0]}: re-run the collect stage")
        rows = [file.metadata.num_rows for file in self.files]
        self.starts = np.cumsum([0, *rows])  # part i holds rows starts[i] .. starts[i + 1]

    @property
    def num_rows(self) -> int:
        return int(self.starts[-1])

    def column(self, name: str) -> pa.ChunkedArray | None:
        if name not in self.names:
            return None
        chunks = [chunk for file in self.files for chunk in file.read(columns=[name]).column(0).chunks]
        return pa.chunked_array(chunks, None if chunks else self.files[0].schema_arrow.field(name).type)

    def batches(self, part: int, columns: list[str], batch_rows: int) -> Iterable[pa.RecordBatch]:
        """The named columns of one part, a record batch at a time (texts decoded from the file as they come)."""
        return pq.ParquetFile(self.parts[part], pre_buffer=False).iter_batches(batch_size=batch_rows, columns=columns)

    def text_bytes_per_row(self, parts: Iterable[int], columns: list[str]) -> float:
        """Uncompressed bytes of the text columns per vote row in the given parts, from their footers."""
        total = rows = 0
        for k in parts:
            meta = self.files[k].metadata
            rows += meta.num_rows
            total += sum(rg.column(i).total_uncompressed_size
                         for rg in (meta.row_group(g) for g in range(meta.num_row_groups))
                         for i in range(rg.num_columns) if rg.column(i).path_in_schema in columns)
        return total / max(rows, 1)

    def codes(self) -> VoteCodes:
        """The small columns of every part as one coded vote table (aggregate_codes)."""
        return read_codes(self.column, self.num_rows)


def read_votes(path: str | Path, spill_dir: Path | None = None, batch_rows: int = 32_768) -> Votes:
    """Orient the collect stage's votes (a folder of parts, or one parquet file), streaming their text columns;
    pair texts spill to `spill_dir`."""
    source = VoteParts(path)
    codes = source.codes()
    release_memory()
    text_columns = [c for c in TEXT_COLUMNS if c in source.names]
    if "prompt_hash" not in text_columns:
        log.warning("%s has no prompt_hash column (written by an older collect): computing it here; "
                    "re-run the collect stage to skip this", path)
    n_pairs = len(codes.pair_names)
    every = range(len(source.parts))
    buckets = math.ceil(n_pairs * source.text_bytes_per_row(every, text_columns) / BUCKET_BYTES) or 1
    store = PairTexts(folder=spill_dir, bucket_codes=math.ceil(max(n_pairs, 1) / buckets))
    batches = (batch for k in every for batch in source.batches(k, text_columns, batch_rows))
    votes = _orient(codes, batches, store)
    release_memory()  # the decoded batches' memory
    return votes
