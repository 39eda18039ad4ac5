"""Collect, column-wise fast path: whole columns of a chunk checked and normalized at once.

Plain vote rows (prompt, response_a, response_b, annotator_id, choice as text) are the bulk of
every delivery. Here each column is dictionary-encoded, each *distinct* value is checked once and
the results are mapped back to the rows with numpy. Texts met before are known by fingerprint;
new normal-ASCII responses are checked and hashed as a column (`text_columns`), one-turn text
prompts by a short exact twin of `Normalizer.prompt_info`, and every other value by the per-row
path's own checks (`Normalizer.text`, `.prompt_info`, `.annotator`, `label`); pair ids are hashed
from Arrow's buffers. A row that fails any check, or has any
other shape (pairs, groups, a given pair_id, a null that may be a missing JSON key), is left to
the per-row path, which gives it its reason; so both paths produce the same votes and the same
quarantine, and `rows read = normalized + quarantined` stays exact.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, Sequence

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from rmpipe.core import schema
from rmpipe.data.collect import text_columns
from rmpipe.data.collect.fields import (
    CHOICE_LABELS,
    META_MAX_DEPTH,
    STRENGTH_LABELS,
    Bad,
    label,
    meta_json,
    prompt_messages,
)
from rmpipe.data.collect.rows import VOTE_FIELDS_OUT, VOTE_KNOWN, Normalizer, Vote

_TYPES = {"line": pa.int64(), "margin": pa.float64(), "prejudged": pa.bool_(), "n_votes": pa.int64()}  # others: text
VOTES_SCHEMA = pa.schema([(name, _TYPES.get(name, pa.string())) for name in schema.VOTE_COLUMNS])
_REQUIRED = ("prompt", "response_a", "response_b", "annotator_id", "choice")
_OTHER_SHAPES = ("responses", "chosen", "rejected")  # rows filling these are groups or pairs: the row path
# A pair row with any of these is not plain: its labels, margin or count are its own (the per-row path).
_NOT_PLAIN_PAIRS = {"response_a", "response_b", "choice", "responses", "margin", "n_votes", "score_chosen",
                    "score_rejected", "ranking", "scores"}
_JSON_EXTRA_TYPES = (pa.string(), pa.large_string(), pa.int64(), pa.bool_())  # read back from JSON exactly as orjson


class _Seen:
    """What the checks found for texts met before (a vote's texts come back in later chunks and batches),
    found by a seeded 128-bit xxh3 fingerprint and checked against the text's sha256: a hit counts only
    when the sha256 matches, so texts whose fingerprints collide are never confused (responses need the
    sha256 anyway: for a clean text it is the digest votes carry). ~250 bytes an entry; emptied at `limit`
    entries; results never depend on it. One per collect.max_field_chars (`seen_for`): threads with
    different settings (a threaded Dask worker) never see each other's results."""

    def __init__(self, limit: int = 1_500_000):
        self.seed = int.from_bytes(os.urandom(8), "little")
        self.limit = limit
        # fingerprint -> (sha256 of the text, what was found: for a response (sha256 of its normalized form,
        # whether normalizing changes it), for a prompt its hash; None: fails a check). One entry per text.
        self.texts: dict[int, tuple[bytes, tuple[str, bool] | None]] = {}
        self.prompts: dict[int, tuple[bytes, str | None]] = {}

    def fingerprints(self, values: pa.Array) -> list[int]:
        """Fingerprint of each string of `values`, hashed straight from Arrow's buffers."""
        digest, seed = xxhash.xxh3_128_intdigest, self.seed
        return [digest(view, seed) for view in text_columns.byte_slices(values)]

    @staticmethod
    def lookup(entries: dict, fingerprints: list[int], sha256s: list[bytes]) -> list:
        """What was found for each text, or `False` where it is new (or only its fingerprint was seen)."""
        found = []
        for fp, sha in zip(fingerprints, sha256s):
            entry = entries.get(fp)
            found.append(entry[1] if entry is not None and entry[0] == sha else False)
        return found

    def trim(self) -> None:
        if len(self.texts) + len(self.prompts) > self.limit:
            self.texts.clear(), self.prompts.clear()


_SEEN: dict[int, _Seen] = {}  # collect.max_field_chars -> its cache


def seen_for(max_chars: int) -> _Seen:
    """The cache of one max_field_chars setting (a new setting starts afresh and lets older ones go)."""
    seen = _SEEN.get(max_chars)
    if seen is None:
        seen = _Seen()
        if len(_SEEN) >= 2:  # settings rarely change within a process: keep the last two, not every one
            _SEEN.clear()
        _SEEN[max_chars] = seen
    return seen


def _sha256s(values: pa.Array) -> list[bytes]:
    sha256 = hashlib.sha256
    return [sha256(view).digest() for view in text_columns.byte_slices(values)]


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _absent(column: pa.ChunkedArray) -> np.ndarray:
    """Rows where an optional field is left out or blank (None or "")."""
    absent = pc.is_null(column)
    if _is_text(column.type):
        absent = pc.or_(absent, pc.fill_null(pc.equal(column, ""), False))
    return np.asarray(absent)


def _distinct(column: pa.ChunkedArray | pa.Array, check: Callable[[Any], Any]) -> tuple[np.ndarray, np.ndarray, list]:
    """(row passes, row -> distinct index, check result per distinct value): `check` runs once per value."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    encoded = pc.dictionary_encode(column)
    infos = [check(value) for value in encoded.dictionary.to_pylist()]
    good = np.array([not isinstance(info, Bad) for info in infos] + [False], dtype=bool)
    index = np.asarray(pc.fill_null(encoded.indices, len(infos)), dtype=np.int64)  # a null -> the False slot
    return good[index], index, infos


def _usable(table: pa.Table, nulls_may_be_absent: bool) -> bool:
    """Whether any row of the chunk can take the fast path (its columns have the types it handles)."""
    names = table.column_names
    if any(name not in names or not _is_text(table[name].type) for name in _REQUIRED):
        return False
    for name in ("strength", "pair_id"):
        if name in names and not (_is_text(table[name].type) or pa.types.is_null(table[name].type)):
            return False
    extras = [table[name].type for name in names if name not in VOTE_KNOWN]
    if any(_depth(kind) > META_MAX_DEPTH for kind in extras):  # too deep to write as meta JSON: the row path says so
        return False
    return not nulls_may_be_absent or all(kind in _JSON_EXTRA_TYPES or pa.types.is_null(kind) for kind in extras)


def _depth(kind: pa.DataType) -> int:
    """How deeply a column's values nest lists and structs (0 for a scalar)."""
    return 1 + max((_depth(kind.field(i).type) for i in range(kind.num_fields)), default=0) if kind.num_fields else 0


def _shape_ok(table: pa.Table, nulls_may_be_absent: bool) -> np.ndarray:
    """Rows that are plain vote rows (no pair, group or given pair_id; no null standing for a missing key)."""
    ok = np.ones(table.num_rows, dtype=bool)
    for name in (*_OTHER_SHAPES, "pair_id"):
        if name in table.column_names:
            ok &= _absent(table[name])
    if nulls_may_be_absent:
        for name in table.column_names:
            if name not in VOTE_KNOWN:
                ok &= ~np.asarray(pc.is_null(table[name]))
    return ok


def plain_pairs_as_votes(table: pa.Table, batch_id: str) -> pa.Table | None:
    """A chunk of plain pair rows (prompt, chosen and rejected as text, no labels of their own: the shape of
    most public pairwise sets) as the vote rows the per-row path makes of them: chosen is response_a and
    the one judgement chooses it; no annotator_id column means `anonymous:<batch>`. None for any other
    chunk (conversations, scores, margins and vote columns are the per-row path's)."""
    names = set(table.column_names)
    if not {"chosen", "rejected"} <= names or names & _NOT_PLAIN_PAIRS:
        return None
    if not (_is_text(table["chosen"].type) and _is_text(table["rejected"].type)):
        return None
    n = table.num_rows
    columns = {name: table[name] for name in table.column_names}
    columns["response_a"], columns["response_b"] = columns.pop("chosen"), columns.pop("rejected")
    columns["choice"] = pa.array(np.full(n, "a", dtype=object), pa.string())
    columns.setdefault("annotator_id", pa.array(np.full(n, schema.anonymous_annotator(batch_id), dtype=object), pa.string()))
    return pa.table(columns)


def fast_votes(table: pa.Table, norm: Normalizer, nulls_may_be_absent: bool,
               batch_id: str) -> tuple[np.ndarray, pa.Table] | None:
    """(rows of `table` that pass every check, their votes as columns `VOTE_FIELDS_OUT`); None when no row can.
    Plain pair rows come as votes (prejudged: True)."""
    pairs = plain_pairs_as_votes(table, batch_id)
    table = table if pairs is None else pairs
    if not _usable(table, nulls_may_be_absent):
        return None
    n = table.num_rows
    seen = seen_for(norm.max_chars)
    seen.trim()
    ok = _shape_ok(table, nulls_may_be_absent)
    responses = pa.concat_arrays([table["response_a"].combine_chunks(), table["response_b"].combine_chunks()])
    texts_ok, text_index, digests, unclean = _responses(responses.dictionary_encode(), norm, seen)
    ok &= texts_ok[:n] & texts_ok[n:]
    prompt_ok, prompt_index, canonical, prompt_hashes = _prompts(table["prompt"].combine_chunks().dictionary_encode(),
                                                                 norm, seen)
    annotator_ok, annotator_index, annotators = _distinct(table["annotator_id"], norm.annotator)
    choice_ok, choice_index, choices = _distinct(table["choice"], lambda v: label(v, CHOICE_LABELS) or Bad("", ""))
    ok &= prompt_ok & annotator_ok & choice_ok
    strengths: list = [None]
    strength_index = np.zeros(n, dtype=np.int64)
    if "strength" in table.column_names and not pa.types.is_null(table["strength"].type):
        strength_ok, strength_index, strengths = _distinct(
            table["strength"], lambda v: None if v == "" else (label(v, STRENGTH_LABELS) or Bad("", "")))
        ok &= strength_ok | _absent(table["strength"])
        strengths.append(None)  # the null slot of _distinct: an absent strength
    rows = np.flatnonzero(ok)
    pair_ids, rows, triple = _pair_ids(responses, rows, prompt_index, text_index[:n], text_index[n:], prompt_hashes,
                                       digests, unclean)
    columns = {
        "pair_id": pair_ids.take(triple),
        "prompt": canonical.take(pa.array(prompt_index[rows])),
        "prompt_hash": prompt_hashes.take(pa.array(prompt_index[rows])),
        "response_a": _rows_of(table["response_a"], rows),
        "response_b": _rows_of(table["response_b"], rows),
        "annotator_id": _take([a if isinstance(a, str) else None for a in annotators], annotator_index[rows]),
        "choice": _take([c if isinstance(c, str) else None for c in choices], choice_index[rows]),
        "strength": _take([s if isinstance(s, str) else None for s in strengths], strength_index[rows]),
        "margin": pa.nulls(len(rows), pa.float64()),
        "meta": _meta_column(table, rows),
        "prejudged": pa.array(np.full(len(rows), pairs is not None)),
        "n_votes": pa.array(np.ones(len(rows), dtype=np.int64)),
        "group_id": pa.nulls(len(rows), pa.string()),
    }
    return rows, pa.table([columns[name] for name in VOTE_FIELDS_OUT], schema=_fields_schema())


def _indices(encoded: pa.DictionaryArray) -> tuple[np.ndarray, int]:
    """Row -> distinct index, a null row pointing one past the last value (a slot that fails)."""
    size = len(encoded.dictionary)
    return np.asarray(pc.fill_null(encoded.indices, size), dtype=np.int64), size


def _responses(encoded: pa.DictionaryArray, norm: Normalizer,
               seen: _Seen) -> tuple[np.ndarray, np.ndarray, pa.Array, np.ndarray]:
    """Per distinct response: (row passes, row -> distinct index, sha256 of its normalized form (null: fails
    a check), whether normalizing changes it). A text met before is known by its fingerprint and sha256; a
    new one passes as it is when it is normal ASCII (its sha256 is then its digest), else it is checked
    once by `Normalizer.text` (the per-row path's own check)."""
    index, _ = _indices(encoded)
    values = encoded.dictionary
    fingerprints, sha256s = seen.fingerprints(values), _sha256s(values)
    infos = seen.lookup(seen.texts, fingerprints, sha256s)
    new = np.array([info is False for info in infos], dtype=bool)
    if new.any():
        at = np.flatnonzero(new)
        fresh = values.take(pa.array(at))
        clean = text_columns.normal_ascii(fresh, norm.max_chars)
        for i in at[clean].tolist():
            infos[i] = (sha256s[i].hex(), False)
            seen.texts[fingerprints[i]] = (sha256s[i], infos[i])
        for i, value in zip(at[~clean].tolist(), fresh.filter(~clean).to_pylist()):
            info = norm.text(value, "response")
            infos[i] = None if isinstance(info, Bad) else (info[2], info[1] != value)
            seen.texts[fingerprints[i]] = (sha256s[i], infos[i])
    good = np.array([info is not None for info in infos] + [False], dtype=bool)
    digests = pa.array([info and info[0] for info in infos], pa.string())
    unclean = np.array([info is not None and info[1] for info in infos], dtype=bool)
    return good[index], index, digests, unclean


def _prompts(encoded: pa.DictionaryArray, norm: Normalizer, seen: _Seen) -> tuple[np.ndarray, np.ndarray, pa.Array, pa.Array]:
    """Per distinct prompt: (row passes, row -> distinct index, canonical JSON, prompt_hash; null: fails a
    check). The hash is computed at a prompt's first sight and remembered (found again by fingerprint and
    sha256); the canonical form is rebuilt each time (it is what the votes store)."""
    index, size = _indices(encoded)
    values = encoded.dictionary
    canonical: list = [None] * size
    hashes: list = [None] * size
    fingerprints, sha256s = seen.fingerprints(values), _sha256s(values)
    found, max_chars = seen.lookup(seen.prompts, fingerprints, sha256s), norm.max_chars
    for i, (digest, value) in enumerate(zip(found, values.to_pylist())):
        if _one_turn(value):
            if digest is False:  # first sight: the checks prompt_info makes of a one-turn text prompt
                digest = _one_turn_hash(value) if _one_turn_passes(value, max_chars) else None
                seen.prompts[fingerprints[i]] = (sha256s[i], digest)
            if digest is not None:
                canonical[i], hashes[i] = _one_turn_json(value), digest
            continue
        if digest is False:  # chat JSON, a transcript, or whitespace at an end: the per-row path's own check
            info = norm.prompt_info(value)
            digest = None if isinstance(info, Bad) else info[1]
            seen.prompts[fingerprints[i]] = (sha256s[i], digest)
        if digest is not None:
            canonical[i], hashes[i] = _chat_json(value) or schema.canonical_messages(prompt_messages(value)), digest
    good = np.array([h is not None for h in hashes] + [False], dtype=bool)
    return good[index], index, pa.array(canonical, pa.string()), pa.array(hashes, pa.string())


def _one_turn(prompt: str) -> bool:
    """A prompt that `schema.to_messages` takes as one user turn whatever its content: not a JSON list
    (which may start after whitespace) and not a Human:/Assistant: transcript."""
    return not ("[" in prompt[:1] or prompt[:1].isspace() or prompt[-1:].isspace() or "\n\nAssistant:" in prompt)


def _chat_json(prompt: str) -> str | None:
    """schema.canonical_prompt of a chat-JSON prompt that passed the checks, without re-validating it
    (roles stripped and lower-cased, contents verbatim); None when it is not one (a transcript, ...)."""
    if not prompt.lstrip()[:1] == "[":
        return None
    try:
        messages = orjson.loads(prompt)
        if not (isinstance(messages, list) and messages):  # "[]" is a plain question to schema.to_messages
            return None
        return orjson.dumps([{"content": m["content"], "role": m["role"].strip().lower()} for m in messages]).decode()
    except (orjson.JSONDecodeError, TypeError, KeyError, AttributeError):
        return None


def _one_turn_passes(prompt: str, max_chars: int) -> bool:
    """Normalizer.prompt_info's checks for a one-turn prompt (no lone surrogate can come out of Arrow)."""
    return 0 < len(prompt) <= max_chars and "\x00" not in prompt and not prompt.isspace()


def _one_turn_json(prompt: str) -> str:
    """schema.canonical_prompt of a one-turn prompt."""
    return orjson.dumps([{"content": prompt, "role": "user"}]).decode()


def _one_turn_hash(prompt: str) -> str:
    """schema.prompt_hash of a one-turn prompt."""
    return hashlib.sha256(orjson.dumps([{"content": schema.normalize_text(prompt), "role": "user"}])).hexdigest()


def _rows_of(column: pa.ChunkedArray, rows: np.ndarray) -> pa.ChunkedArray:
    """The column at `rows` (no copy when that is every row)."""
    if len(rows) != len(column):
        column = column.take(pa.array(rows))
    return column.cast(pa.string())


def _take(values: list, index: np.ndarray) -> pa.Array:
    return pa.array(values, pa.string()).take(pa.array(index))


def _pair_ids(responses: pa.Array, rows: np.ndarray, prompt_index: np.ndarray, a_index: np.ndarray,
              b_index: np.ndarray, prompt_hashes: pa.Array, digests: pa.Array,
              unclean: np.ndarray) -> tuple[pa.Array, np.ndarray, pa.Array]:
    """pair_id per distinct (prompt, {a, b}) of the passing rows; rows whose responses are identical after
    normalization are dropped (the row path reports them). Returns (ids, kept rows, row -> id index)."""
    size = len(digests) + 1
    a, b = a_index[rows], b_index[rows]
    codes = (prompt_index[rows] * size + np.minimum(a, b)) * size + np.maximum(a, b)  # A/B and B/A: one pair
    _, first_at, inverse = np.unique(codes, return_index=True, return_inverse=True)
    first_rows = rows[first_at]
    n = len(responses) // 2
    da, db = digests.take(pa.array(a_index[first_rows])), digests.take(pa.array(b_index[first_rows]))
    # schema.pair_id orders the two responses by their normalized text; for clean texts that is the text itself
    a_first = np.asarray(pc.less_equal(responses.take(pa.array(first_rows)), responses.take(pa.array(n + first_rows))))
    for k in np.flatnonzero(unclean[a_index[first_rows]] | unclean[b_index[first_rows]]).tolist():
        row = int(first_rows[k])
        a_first[k] = schema.normalize_text(responses[row].as_py()) <= schema.normalize_text(responses[n + row].as_py())
    first, second = pc.if_else(a_first, da, db), pc.if_else(a_first, db, da)
    joined = pc.binary_join_element_wise(prompt_hashes.take(pa.array(prompt_index[first_rows])), first, second, "\x1f")
    ids = pa.array([digest[:24] for digest in text_columns.sha256_hex(joined)], pa.string())
    same = np.asarray(pc.equal(da, db))  # identical after normalization: the row path says so
    keep = ~same[inverse] if len(rows) else np.zeros(0, dtype=bool)
    return ids, rows[keep], pa.array(inverse[keep])


def _meta_column(table: pa.Table, rows: np.ndarray) -> pa.Array:
    """Fields without a column of their own, as sorted JSON; computed once per distinct combination."""
    extras = [name for name in table.column_names if name not in VOTE_KNOWN]
    if not extras:
        return pa.array(["{}"] * len(rows), pa.string())
    cache: dict[tuple, str] = {}
    out = []
    for values in zip(*(table[name].take(rows).to_pylist() for name in extras)):
        key = _exact(values)
        meta = cache.get(key) if key is not None else None
        if meta is None:
            meta = meta_json(dict(zip(extras, values)))
            if key is not None:
                cache[key] = meta
        out.append(meta)
    return pa.array(out, pa.string())


_EQUAL_MEANS_SAME = (str, int, bool, type(None))  # within one column, == on these is identity of the JSON


def _exact(values: tuple) -> tuple | None:
    """A cache key shared only by extras written the same: -0.0 == 0.0 (and Decimal("1.0") == Decimal("1")),
    so such values are keyed by repr. None for unhashable values (lists)."""
    if all(type(value) in _EQUAL_MEANS_SAME for value in values):
        return values
    if any(isinstance(value, (list, dict)) for value in values):
        return None
    return tuple(value if type(value) in _EQUAL_MEANS_SAME else (type(value), repr(value)) for value in values)


def _fields_schema() -> pa.Schema:
    return pa.schema([VOTES_SCHEMA.field(name) for name in VOTE_FIELDS_OUT])


def votes_table(batch_id: str, lines: Sequence[int], votes: Sequence[Vote]) -> pa.Table:
    """Votes from the per-row path (tuples of `VOTE_FIELDS_OUT`) as a table with batch_id and line."""
    values = list(zip(*votes)) if votes else [()] * len(VOTE_FIELDS_OUT)
    arrays = [pa.array([batch_id] * len(lines), pa.string()), pa.array(lines, pa.int64())]
    arrays += [pa.array(column, VOTES_SCHEMA.field(name).type) for name, column in zip(VOTE_FIELDS_OUT, values)]
    return pa.table(arrays, schema=VOTES_SCHEMA)
