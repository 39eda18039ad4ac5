"""Collect, column-wise fast path: whole columns of a chunk checked and normalized at once.

Plain vote rows (prompt, response_a, response_b, annotator_id, choice as text) are the bulk of
every delivery. Here each column is dictionary-encoded, each *distinct* value goes once through
the same checks as the per-row path (`Normalizer.text`, `.prompt_info`, `.annotator`, `label`),
and the results are mapped back to the rows with numpy. A row that fails any check, or has any
other shape (pairs, groups, a given pair_id, a null that may be a missing JSON key), is left to
the per-row path, which gives it its reason; so both paths produce the same votes and the same
quarantine, and `rows read = normalized + quarantined` stays exact.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rmpipe import schema
from rmpipe.collect_rows import CHOICE_LABELS, STRENGTH_LABELS, VOTE_FIELDS_OUT, VOTE_KNOWN, Bad, Normalizer, Vote, label, meta_json

_TYPES = {"line": pa.int64(), "margin": pa.float64(), "prejudged": pa.bool_(), "n_votes": pa.int64()}  # others: text
VOTES_SCHEMA = pa.schema([(name, _TYPES.get(name, pa.string())) for name in schema.VOTE_COLUMNS])
_REQUIRED = ("prompt", "response_a", "response_b", "annotator_id", "choice")
_OTHER_SHAPES = ("responses", "chosen", "rejected")  # rows filling these are groups or pairs: the row path
_JSON_EXTRA_TYPES = (pa.string(), pa.large_string(), pa.int64(), pa.bool_())  # read back from JSON exactly as orjson


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
    return not nulls_may_be_absent or all(table[name].type in _JSON_EXTRA_TYPES or pa.types.is_null(table[name].type)
                                          for name in names if name not in VOTE_KNOWN)


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


def fast_votes(table: pa.Table, norm: Normalizer, nulls_may_be_absent: bool) -> tuple[np.ndarray, pa.Table] | None:
    """(rows of `table` that pass every check, their votes as columns `VOTE_FIELDS_OUT`); None when no row can."""
    if not _usable(table, nulls_may_be_absent):
        return None
    n = table.num_rows
    ok = _shape_ok(table, nulls_may_be_absent)
    texts_ok, text_index, texts = _distinct(pa.concat_arrays([table["response_a"].combine_chunks(),
                                                              table["response_b"].combine_chunks()]),
                                            lambda v: norm.text(v, "response"))
    ok &= texts_ok[:n] & texts_ok[n:]
    prompt_ok, prompt_index, prompts = _distinct(table["prompt"], norm.prompt_info)
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
    pair_ids, rows, triple = _pair_ids(norm, rows, prompt_index, text_index[:n], text_index[n:], prompts, texts)
    columns = {
        "pair_id": pa.array(pair_ids, pa.string()).take(triple),
        "prompt": _take([p[0] if not isinstance(p, Bad) else None for p in prompts], prompt_index[rows]),
        "prompt_hash": _take([p[1] if not isinstance(p, Bad) else None for p in prompts], prompt_index[rows]),
        "response_a": table["response_a"].take(rows).cast(pa.string()),
        "response_b": table["response_b"].take(rows).cast(pa.string()),
        "annotator_id": _take([a if isinstance(a, str) else None for a in annotators], annotator_index[rows]),
        "choice": _take([c if isinstance(c, str) else None for c in choices], choice_index[rows]),
        "strength": _take([s if isinstance(s, str) else None for s in strengths], strength_index[rows]),
        "margin": pa.nulls(len(rows), pa.float64()),
        "meta": _meta_column(table, rows),
        "prejudged": pa.array(np.zeros(len(rows), dtype=bool)),
        "n_votes": pa.array(np.ones(len(rows), dtype=np.int64)),
        "group_id": pa.nulls(len(rows), pa.string()),
    }
    return rows, pa.table([columns[name] for name in VOTE_FIELDS_OUT], schema=_fields_schema())


def _take(values: list, index: np.ndarray) -> pa.Array:
    return pa.array(values, pa.string()).take(pa.array(index))


def _pair_ids(norm: Normalizer, rows: np.ndarray, prompt_index: np.ndarray, a_index: np.ndarray, b_index: np.ndarray,
              prompts: list, texts: list) -> tuple[list, np.ndarray, pa.Array]:
    """pair_id per distinct (prompt, a, b) of the passing rows; rows whose responses are identical after
    normalization are dropped (the row path reports them). Returns (ids, kept rows, row -> id index)."""
    size = len(texts) + 1
    codes = (prompt_index[rows] * size + a_index[rows]) * size + b_index[rows]
    distinct, inverse = np.unique(codes, return_inverse=True)
    ids: list[str | None] = []
    for code in distinct.tolist():
        p, rest = divmod(code, size * size)
        a, b = texts[rest // size], texts[rest % size]
        ids.append(None if a[1] == b[1] else norm.pair_id(prompts[p], a, b))
    same = np.array([i is None for i in ids], dtype=bool)
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
        try:
            meta = cache.get(values)
        except TypeError:  # unhashable values (lists): no cache
            meta = None
        if meta is None:
            meta = meta_json(dict(zip(extras, values)))
            try:
                cache[values] = meta
            except TypeError:
                pass
        out.append(meta)
    return pa.array(out, pa.string())


def _fields_schema() -> pa.Schema:
    return pa.schema([VOTES_SCHEMA.field(name) for name in VOTE_FIELDS_OUT])


def votes_table(batch_id: str, lines: Sequence[int], votes: Sequence[Vote]) -> pa.Table:
    """Votes from the per-row path (tuples of `VOTE_FIELDS_OUT`) as a table with batch_id and line."""
    values = list(zip(*votes)) if votes else [()] * len(VOTE_FIELDS_OUT)
    arrays = [pa.array([batch_id] * len(lines), pa.string()), pa.array(lines, pa.int64())]
    arrays += [pa.array(column, VOTES_SCHEMA.field(name).type) for name, column in zip(VOTE_FIELDS_OUT, values)]
    return pa.table(arrays, schema=VOTES_SCHEMA)
