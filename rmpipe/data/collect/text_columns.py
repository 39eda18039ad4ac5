"""Whole Arrow string columns checked and hashed at once.

These are the column twins of `Normalizer.text_info` (checks, `schema.normalize_text`,
`schema.text_sha256`) for the values where the column form is exactly the per-value one:
ASCII text that is already normal (no whitespace but single inner spaces, no NUL), which is
the bulk of every delivery. The mask picks those values; everything else goes through the
per-value Python code, so the results never depend on which path a value took.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# What makes normalize_text change an ASCII text, or a check fail: whitespace other than a single
# inner space (str.isspace() on ASCII is \t-\r, \x1c-\x1f and " "), or NUL.
_NOT_NORMAL = r"[\x00\t-\r\x1c-\x1f]|  |^ | $"


def normal_ascii(values: pa.Array, max_chars: int) -> np.ndarray:
    """Values that pass every text check (non-empty, at most `max_chars` characters, no NUL) and that
    normalize_text leaves as they are: ASCII with no whitespace but single inner spaces."""
    size = pc.binary_length(values)  # ASCII: bytes are characters
    ok = pc.and_(pc.and_(pc.string_is_ascii(values), pc.less_equal(size, max_chars)), pc.greater(size, 0))
    ok = pc.and_(ok, pc.invert(pc.match_substring_regex(values, _NOT_NORMAL)))
    return np.asarray(pc.fill_null(ok, False), dtype=bool)


def byte_slices(values: pa.Array) -> list[memoryview]:
    """Each string's UTF-8 bytes, as views into Arrow's buffers (a null is empty): hashed without copies."""
    values = values.cast(pa.large_string())
    if len(values) == 0:
        return []
    bounds = np.frombuffer(values.buffers()[1], dtype=np.int64)[values.offset:values.offset + len(values) + 1].tolist()
    data = memoryview(values.buffers()[2] or b"")
    return [data[start:end] for start, end in zip(bounds[:-1], bounds[1:])]


def sha256_hex(values: pa.Array) -> list[str | None]:
    """Hex SHA-256 of each string's UTF-8 bytes (schema.text_sha256); None for a null."""
    sha256 = hashlib.sha256
    digests: list[str | None] = [sha256(view).hexdigest() for view in byte_slices(values)]
    if values.null_count:
        for i in np.flatnonzero(np.asarray(values.is_null())).tolist():
            digests[i] = None
    return digests
