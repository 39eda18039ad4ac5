"""Votes -> canonical orientation, streaming the text columns once.

A pair may be shown as A/B to one annotator and B/A to another. Every vote becomes a
label in the pair's *canonical* order: "first" is the response whose normalized text
(schema.normalize_text) sorts first, the rule schema.pair_id uses.

Memory. `read_votes` reads the small columns whole (ids dictionary-encoded: a few bytes
per vote), streams the text columns in record batches to orient each vote, and hands the
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

from rmpipe.aggregate_settings import FIRST, IDENTICAL, MALFORMED, SECOND, TIE
from rmpipe.aggregate_texts import PairTexts
from rmpipe.errors import DataError
from rmpipe.schema import CHOICES, VOTE_COLUMNS, VOTE_DEFAULTS

log = logging.getLogger("rmpipe.aggregate")

SMALL_COLUMNS = ["batch_id", "line", "pair_id", "annotator_id", "choice", "strength", "margin", "prejudged", "n_votes",
                 "group_id"]
TEXT_COLUMNS = ["prompt", "prompt_hash", "response_a", "response_b"]
_CATEGORIES = ["pair_id", "annotator_id", "batch_id", "choice", "strength", "group_id"]  # read dictionary-encoded
# Vote tables written before collect carried prompt_hash lack it: aggregate computes it then. The
# pre-judged columns take their schema.VOTE_DEFAULTS (an A/B vote, one judgement) where absent.
OPTIONAL_COLUMNS = ("prompt_hash", *VOTE_DEFAULTS)
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

    table: one compact row per input vote, in input order: pair_id / annotator_id /
      batch_id / strength / group_id as categoricals (sorted categories), line, label (FIRST,
      SECOND, TIE, or MALFORMED / IDENTICAL), chose_a (position-A pick), margin, and
      the lengths of the normalized first/second texts (to spot a reused pair_id).
    texts: the raw texts (prompt, prompt_hash, first, second) of each pair's representative
      vote, keyed by pair code (prompt_hash null where the vote table did not carry it).
    """

    table: pd.DataFrame
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


def _sorted_categorical(column: pd.Series) -> pd.Categorical:
    """A column as a categorical with sorted categories (codes then sort like the names)."""
    if not isinstance(column.dtype, pd.CategoricalDtype):
        return pd.Categorical(column)
    cat = pd.Categorical(column).remove_unused_categories()
    if len(cat.categories) == 0:
        return cat
    # codes remapped by rank: reorder_categories would look every name up again (250k pair_ids: 0.5 s)
    order = cat.categories.argsort()
    rank = np.empty(len(order), cat.codes.dtype)
    rank[order] = np.arange(len(order))
    dtype = pd.CategoricalDtype(cat.categories[order], ordered=cat.ordered)
    return pd.Categorical.from_codes(np.where(cat.codes >= 0, rank[cat.codes], -1), dtype=dtype, validate=False)


def _representative_rows(small: pd.DataFrame) -> np.ndarray:
    """Sorted row positions of each pair's lowest (batch_id, line) vote with a known choice.

    Depends on neither row order nor A/B presentation, so the output texts do not either.
    """
    candidate = small["pair_id"].notna() & small["annotator_id"].notna() & small["choice"].isin(CHOICES)
    rows = np.flatnonzero(candidate.to_numpy())
    batch = small["batch_id"].cat.codes.to_numpy()[rows]  # sorted categories: codes sort like names
    pair = small["pair_id"].cat.codes.to_numpy()[rows]
    order = np.lexsort((small["line"].to_numpy()[rows], batch, pair))
    first_of_pair = np.ones(len(order), bool)
    first_of_pair[1:] = pair[order][1:] != pair[order][:-1]
    return np.sort(rows[order[first_of_pair]])


@dataclass
class _Orientation:
    """Per-vote facts from the text columns, filled batch by batch."""

    a_first: np.ndarray
    readable: np.ndarray
    identical: np.ndarray
    len_a: np.ndarray
    len_b: np.ndarray

    @classmethod
    def empty(cls, n: int) -> _Orientation:
        # int32 lengths: collect caps a text at collect.max_field_chars
        return cls(np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, np.int32), np.zeros(n, np.int32))

    def fill(self, start: int, batch: pa.RecordBatch) -> pa.Array:
        """Orient rows start.. of one batch; return first_is_a for them."""
        stop = start + batch.num_rows
        key_a, key_b = canonical_key(batch.column("response_a")), canonical_key(batch.column("response_b"))
        first_is_a = pc.fill_null(pc.less_equal(key_a, key_b), True)

        def put(target: np.ndarray, values: pa.Array) -> None:
            target[start:stop] = values.to_numpy(zero_copy_only=False)

        put(self.a_first, first_is_a)
        put(self.readable, pc.and_(pc.is_valid(key_a), pc.is_valid(key_b)))
        put(self.identical, pc.fill_null(pc.equal(key_a, key_b), False))
        put(self.len_a, pc.fill_null(pc.utf8_length(key_a), 0))
        put(self.len_b, pc.fill_null(pc.utf8_length(key_b), 0))
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


def _orient(small: pd.DataFrame, text_batches: Iterable[pa.RecordBatch], store: PairTexts) -> Votes:
    """Label every vote in canonical order; keep the texts of each pair's representative vote."""
    n = len(small)
    small = _with_defaults(small)
    reps = _representative_rows(small)
    pair_codes = small["pair_id"].cat.codes.to_numpy()
    facts = _Orientation.empty(n)
    start = 0
    for batch in text_batches:
        first_is_a = facts.fill(start, batch)
        here = reps[(reps >= start) & (reps < start + batch.num_rows)]
        if len(here):
            _keep_texts(store, batch, here - start, first_is_a, pair_codes[here])
        start += batch.num_rows
    if start != n:
        raise RuntimeError(f"text columns have {start} rows, small columns {n}")
    store.finish()
    return Votes(table=_vote_table(small, facts), texts=store)


def _vote_table(small: pd.DataFrame, facts: _Orientation) -> pd.DataFrame:
    choice = small["choice"].to_numpy(dtype=object, na_value=None)
    a_first = facts.a_first
    label = np.select(
        [choice == "tie", choice == "a", choice == "b"],
        [TIE, np.where(a_first, FIRST, SECOND), np.where(a_first, SECOND, FIRST)],
        MALFORMED,
    ).astype(np.int8)
    label[facts.identical & (label >= 0)] = IDENTICAL
    label[~facts.readable | small["pair_id"].isna().to_numpy() | small["annotator_id"].isna().to_numpy()] = MALFORMED
    return pd.DataFrame(
        {
            "pair_id": small["pair_id"],
            "annotator_id": small["annotator_id"],
            "batch_id": small["batch_id"],
            "line": small["line"].to_numpy(),
            "label": label,
            "chose_a": choice == "a",
            "strength": _sorted_categorical(small["strength"]),
            "margin": pd.to_numeric(small["margin"], errors="coerce").to_numpy(dtype=float, na_value=np.nan),
            "prejudged": small["prejudged"].to_numpy(dtype=bool),
            "group_id": small["group_id"],
            "weight": small["n_votes"].to_numpy(dtype=np.int64),
            "len_first": np.where(a_first, facts.len_a, facts.len_b),
            "len_second": np.where(a_first, facts.len_b, facts.len_a),
        }
    )


def _with_defaults(small: pd.DataFrame) -> pd.DataFrame:
    """Ids as sorted categoricals; prejudged / n_votes filled where a vote table lacks them (or holds nulls):
    an A/B vote, one judgement."""
    fills = {}
    for name in ("prejudged", "n_votes"):
        column = small[name] if name in small.columns else pd.Series(VOTE_DEFAULTS[name], index=small.index)
        fills[name] = column.fillna(VOTE_DEFAULTS[name]).astype(bool if name == "prejudged" else np.int64)
    if "group_id" not in small.columns:
        fills["group_id"] = pd.Series(None, index=small.index, dtype=object)
    small = small.assign(**fills)
    return small.assign(**{c: _sorted_categorical(small[c]) for c in ("pair_id", "annotator_id", "batch_id", "group_id")})


def orient_votes(votes: pd.DataFrame) -> Votes:
    """Orient an in-memory vote table (columns schema.VOTE_COLUMNS); its pair texts stay in memory."""
    require_columns(votes.columns, "the vote table")
    votes = votes.reset_index(drop=True)
    # from_pandas for prompt_hash only: a hand-built table may leave it NaN (computed later); a NaN text stays an error
    texts = pa.table({c: pa.array(votes[c].to_numpy(dtype=object), pa.string(), from_pandas=c == "prompt_hash")
                      for c in TEXT_COLUMNS if c in votes.columns})
    return _orient(votes[[c for c in SMALL_COLUMNS if c in votes.columns]], texts.to_batches(), PairTexts())


def _text_bytes_per_row(parquet: pq.ParquetFile, columns: list[str]) -> float:
    """Uncompressed bytes of the text columns per vote row, from the file's footer."""
    meta = parquet.metadata
    total = sum(
        rg.column(i).total_uncompressed_size
        for rg in (meta.row_group(k) for k in range(meta.num_row_groups))
        for i in range(rg.num_columns)
        if rg.column(i).path_in_schema in columns
    )
    return total / max(meta.num_rows, 1)


def read_votes(path: str | Path, spill_dir: Path | None = None, batch_rows: int = 32_768) -> Votes:
    """Orient the collect stage's votes.parquet, streaming its text columns; pair texts spill to `spill_dir`."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} not found: run the collect stage first (`dvc repro collect`)")
    try:
        # pre_buffer=False: decode one column chunk at a time instead of buffering the whole file (half the RSS and CPU)
        schema = pq.read_schema(path)
        parquet = pq.ParquetFile(path, pre_buffer=False, read_dictionary=[c for c in _CATEGORIES if c in schema.names])
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path} is not a readable parquet file ({exc}): re-run the collect stage") from None
    require_columns(parquet.schema_arrow.names, str(path))
    small = parquet.read(columns=[c for c in SMALL_COLUMNS if c in parquet.schema_arrow.names]).to_pandas()
    text_columns = [c for c in TEXT_COLUMNS if c in parquet.schema_arrow.names]
    if "prompt_hash" not in text_columns:
        log.warning("%s has no prompt_hash column (written by an older collect): computing it here; "
                    "re-run the collect stage to skip this", path)
    n_pairs = int(small["pair_id"].nunique())
    buckets = math.ceil(n_pairs * _text_bytes_per_row(parquet, text_columns) / BUCKET_BYTES) or 1
    store = PairTexts(folder=spill_dir, bucket_codes=math.ceil(max(n_pairs, 1) / buckets))
    batches = pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=batch_rows, columns=text_columns)
    votes = _orient(small, batches, store)
    pa.default_memory_pool().release_unused()  # hand the decoded batches' memory back to the OS
    return votes
