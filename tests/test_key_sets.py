"""rmpipe.data.collect.key_sets: the sorted-array digest sets collect keeps its vote and pair keys in."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa

from rmpipe.data.collect.key_sets import (
    DigestSet,
    KeyLines,
    Packed,
    SeenVotes,
    digests_of,
    joined_digests,
    vote_key,
)


def _keys(rng: random.Random, n: int, prefixes: list[bytes]) -> list[bytes]:
    """Random 16-byte keys, many sharing their first 8 bytes (the half the arrays are sorted by)."""
    return [rng.choice(prefixes) + rng.randbytes(8) if rng.random() < 0.5 else rng.randbytes(16) for _ in range(n)]


def test_a_digest_set_answers_as_a_dict_does_also_when_first_halves_are_equal():
    rng = random.Random(13)
    prefixes = [rng.randbytes(8) for _ in range(3)] + [b"\x00" * 8, b"\xff" * 8]
    reference: dict[bytes, int] = {}
    table = DigestSet()
    for round_ in range(6):  # several adds: each lands between members already held
        fresh = [k for k in dict.fromkeys(_keys(rng, 300, prefixes)) if k not in reference]
        values = [round_ * 1000 + i for i in range(len(fresh))]
        table.add(fresh, values)
        reference.update(zip(fresh, values))
        probes = list(reference)[::3] + _keys(rng, 200, prefixes)
        assert table.find(probes).tolist() == [reference.get(k, -1) for k in probes]
    assert len(table) == len(reference)
    assert list(table.high) == sorted(table.high)


def test_update_counts_each_distinct_key_once():
    table = DigestSet()
    table.update(digests_of(pa.array(["a", "b", "a"])))
    table.update(digests_of(pa.chunked_array([["b", "c"], ["c", "d"]])))
    assert len(table) == 4
    assert table.find(digests_of(pa.array(["d", "e"]))).tolist() == [0, -1]


def test_column_keys_are_the_keys_of_one_vote_at_a_time():
    annotators, pairs = ["ann-1", "ann-2", "ünï"], ["p1", "p1", "p\u20ac"]
    assert joined_digests(pa.array(annotators), pa.array(pairs)) == [vote_key(a, p) for a, p in zip(annotators, pairs)]


def test_seen_votes_say_where_each_earlier_vote_is():
    seen = SeenVotes()
    seen.add("b1.jsonl", {vote_key("a", "p1"): 3, vote_key("b", "p1"): 4})
    seen.add("b2.csv", {vote_key("a", "p2"): 7})
    asked = [vote_key("b", "p1"), vote_key("a", "p3"), vote_key("a", "p2")]
    assert seen.where_each(asked) == ["b1.jsonl line 4", None, "b2.csv line 7"]
    assert seen.any_of([vote_key("a", "p3"), vote_key("a", "p2")])
    assert not seen.any_of([vote_key("a", "p3")])


def test_packed_keys_answer_as_their_bytes_do():
    """Collect's memo hands keys back packed (no bytes object per vote): same members, same answers, and an
    update counts repeats within one packed set once."""
    rng = random.Random(29)
    prefixes = [rng.randbytes(8) for _ in range(2)]
    keys = list(dict.fromkeys(_keys(rng, 400, prefixes)))
    packed = Packed.from_bytes(b"".join(keys))
    assert Packed.from_bytes(packed.to_bytes()).to_bytes() == b"".join(keys) and len(packed) == len(keys)
    as_bytes, as_packed = DigestSet(), DigestSet()
    as_bytes.update(keys[:300] + keys[:50])
    as_packed.update(Packed.from_bytes(b"".join(keys[:300] + keys[:50])))
    assert len(as_packed) == len(as_bytes) == 300
    assert as_packed.digests() == as_bytes.digests() == sorted(keys[:300])
    probes = keys[250:] + _keys(rng, 50, prefixes)
    assert as_packed.find(Packed.from_bytes(b"".join(probes))).tolist() == as_bytes.find(probes).tolist()

    seen = SeenVotes()
    lines = KeyLines(Packed.from_bytes(b"".join(keys[:10])), np.arange(10) + 5)
    seen.add("memo.jsonl", lines)
    assert seen.where_each([keys[3], keys[11]]) == ["memo.jsonl line 8", None]
    assert seen.any_of(KeyLines(Packed.from_bytes(keys[9] + keys[12]), lines.lines[:2]))
    assert not seen.any_of(KeyLines(Packed.from_bytes(keys[12]), lines.lines[:1]))
