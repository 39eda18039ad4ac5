"""The column twin of the per-value text check agrees with it on every value it claims (issue #13).

`rmpipe.data.collect.text_columns` picks the values it can handle as a column (normal ASCII text) and leaves the
rest to Python; here both are run on texts full of what could tell them apart: quotes and
backslashes, "[" (chat JSON), whitespace runs and ends, control characters, DEL,
non-ASCII and NUL.
"""

from __future__ import annotations

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from rmpipe.core import schema

from rmpipe.data.collect import text_columns
from rmpipe.data.collect.rows import Bad, Normalizer

TRICKY = st.text(alphabet=st.sampled_from(list('ab "\\[]{}:,\t\n\r\x0b\x0c\x1c\x1f\x01\x00\x7fé\u3000Z')), max_size=12)
PLAIN = st.sampled_from(["Plain text, normal.", 'Say "hi" \\ now', 'a [b] "c"', "back\\slash\\"])
TEXT = st.one_of(TRICKY, PLAIN, st.just(""))
TEXTS = st.lists(TEXT, min_size=1, max_size=40)
EXAMPLES = settings(max_examples=200, deadline=None, derandomize=True)
MAX_CHARS = 10


@EXAMPLES
@given(values=TEXTS)
def test_normal_ascii_values_are_exactly_those_the_row_check_passes_unchanged(values):
    array = pa.array(values, pa.string())
    mask = text_columns.normal_ascii(array, MAX_CHARS)
    digests = text_columns.sha256_hex(array)
    norm = Normalizer(MAX_CHARS)
    for value, picked, digest in zip(values, mask, digests):
        info = norm.text_info(value, "response")
        if picked:  # the column path's claim: passes, unchanged, and this digest
            assert not isinstance(info, Bad) and info[1] == value and info[2] == digest, repr(value)
        elif value.isascii() and not isinstance(info, Bad) and info[1] == value:
            raise AssertionError(f"{value!r} is normal ASCII but was left to Python")


def test_sha256_of_a_sliced_array_with_nulls():
    array = pa.array(["x", None, "yz", "q"]).slice(1)
    assert text_columns.sha256_hex(array) == [None, schema.text_sha256("yz"), schema.text_sha256("q")]
