"""Collect on raw bytes from the wild (issue #29): every byte sequence ends as a kept row, a quarantined row
with a reason, or a rejected file; never a traceback, the same on the fast and the per-row path and at
any chunk size. Caches and keys never confuse two different inputs."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_collect_paths import agreeing_collects

from rmpipe.core.errors import DataError
from rmpipe.core.paths import CHUNK_ROWS
from rmpipe.core.settings import CollectSettings
from rmpipe.data.collect import fast
from rmpipe.data.collect import run as collect
from rmpipe.data.collect.batch import collect_batch
from rmpipe.data.collect.key_sets import joined_digests, vote_key
from rmpipe.data.collect.read import chunks
from rmpipe.data.collect.rows import Normalizer

BOM = b"\xef\xbb\xbf"
WAYS = [{"fast": f, "chunk_rows": n} for f in (True, False) for n in (1, 2, 7, CHUNK_ROWS)]


def _cfg(incoming: Path, **overrides) -> dict:
    return {"incoming_dir": str(incoming), "max_bad_share": 1.0, "max_field_chars": 100_000, "max_file_mb": 512,
            "on_rejected_batch": "skip", **overrides}


def _vote(i: int, annotator: str = "ann-1", **extra) -> dict:
    return {"prompt": f"Question {i % 3}?", "response_a": f"Answer {i}.", "response_b": f"Other {i}.",
            "annotator_id": annotator, "choice": "ab"[i % 2], **extra}


def _line(i: int, **extra) -> bytes:
    return orjson.dumps(_vote(i, **extra))


def every_way(incoming: Path, **cfg) -> tuple[dict[str, bytes], list[dict], dict]:
    """Collect `incoming` on both paths at chunk sizes 1, 2, 7 and the default; assert the votes (the bytes of
    every votes part), the quarantine and the report agree; return them."""
    result = agreeing_collects(incoming, _cfg(incoming, **cfg), WAYS)
    for entry in result[2]["batches"]:
        assert entry["rows_read"] == entry["rows_normalized"] + entry["rows_quarantined"]
    return result


def _codes(quarantine: list[dict]) -> dict[int, str]:
    return {q["line"]: q["code"] for q in quarantine}


def _table(votes: dict[str, bytes]) -> pa.Table:
    """The vote table of {part: bytes}, parts in order."""
    return pa.concat_tables([pq.read_table(pa.BufferReader(data)) for data in votes.values()])


def _voted_lines(votes: dict[str, bytes]) -> list[int]:
    return _table(votes)["line"].to_pylist()


# --------------------------------------------------------------------------------- one rule each


def test_invalid_utf8_anywhere_is_quarantined_on_both_paths_and_admission_says_so(tmp_path):
    incoming = tmp_path / "in"
    incoming.mkdir()
    lines = [_line(0),
             _line(1).replace(b"Answer 1.", b"Answer \xff1."),                           # in a response
             _line(2).replace(b'"annotator_id"', b'"annot\xffator_id"'),                 # in a key
             _line(3, note="x").replace(b'"x"', b'"x\xc0\xafy"'),                         # overlong, in an extra
             _line(4).replace(b"Question", b"Qu\xed\xa0\x80estion"),                      # an encoded surrogate
             _line(5)]                                                                     # no invalid JSON beside them
    path = incoming / "b.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    votes, quarantine, _ = every_way(incoming)
    assert _codes(quarantine) == {2: "invalid_utf8", 3: "invalid_utf8", 4: "invalid_utf8", 5: "invalid_utf8"}
    assert all("\\x" in q["raw"] for q in quarantine)  # the raw line, bad bytes shown escaped
    assert _voted_lines(votes) == [1, 6]
    checked = collect.check_batch(path, _cfg(incoming, max_bad_share=0.2))  # admission: a verdict, no raise
    assert checked.report["status"] == "rejected" and "not valid UTF-8" in checked.report["message"]


def test_invalid_utf8_in_a_parquet_column_is_quarantined_with_the_field_named(tmp_path):
    incoming = tmp_path / "in"
    incoming.mkdir()
    good = [_vote(i) for i in range(4)]
    table = pa.Table.from_pylist(good)
    answers = pa.array([b"Answer 0.", b"Answer \xff1.", b"Answer 2.", b"\xc0\xaf"], pa.binary()).view(pa.string())
    table = table.set_column(table.schema.get_field_index("response_a"), "response_a", answers)
    pq.write_table(table, incoming / "b.parquet")
    votes, quarantine, _ = every_way(incoming)
    assert _codes(quarantine) == {2: "invalid_utf8", 4: "invalid_utf8"}
    assert "field 'response_a' is not valid UTF-8 (byte 0xff)" in quarantine[0]["reason"]
    assert "\\xff" in quarantine[0]["raw"]
    assert _voted_lines(votes) == [1, 3]


def test_a_number_of_5000_digits_is_quarantined_with_a_reason(tmp_path):
    incoming = tmp_path / "in"
    incoming.mkdir()
    giant = b"9" * 5000
    (incoming / "b.jsonl").write_bytes(b"\n".join([_line(0), _line(1)[:-1] + b',"n":' + giant + b"}",
                                                   _line(2).replace(b'"Answer 2."', giant)]) + b"\n")
    _, quarantine, _ = every_way(incoming)
    assert _codes(quarantine) == {2: "invalid_json", 3: "invalid_json"}
    assert "a number out of range" in quarantine[0]["reason"]


def test_a_bom_is_taken_at_the_start_of_a_file_only_whatever_the_chunking(tmp_path):
    incoming = tmp_path / "in"
    incoming.mkdir()
    one = b"\n".join([_line(0), _line(1)]) + b"\n"
    two = b"\n".join([_line(2), _line(3)]) + b"\n"
    (incoming / "a.jsonl").write_bytes(BOM + one + BOM + two)  # two BOM'd files joined with `cat`
    (incoming / "b.jsonl").write_bytes(_line(4)[:-1] + b',"x":"' + BOM + b'"}\n' + BOM + b"\n")
    votes, quarantine, _ = every_way(incoming)
    assert [(q["batch_id"], q["line"], q["code"]) for q in quarantine] == [
        ("a.jsonl", 3, "stray_bom"), ("b.jsonl", 1, "stray_bom"), ("b.jsonl", 2, "stray_bom")]
    assert "byte order mark" in quarantine[0]["reason"] and "at byte 0" in quarantine[0]["reason"]
    assert _table(votes)["line"].to_pylist() == [1, 2, 4]


def test_a_bom_in_a_csv_is_taken_at_its_start_only_on_either_csv_reader(tmp_path):
    header = "prompt,response_a,response_b,annotator_id,choice\n"
    for ragged in ("", "Q?,A,B,ann,a,extra\n"):  # a ragged record sends the file through the csv module
        incoming = tmp_path / f"in{len(ragged)}"
        incoming.mkdir()
        body = f"{ragged}Q1?,A1,B1,ann,a\nQ2?,A\ufeff2,B2,ann,b\n"
        (incoming / "b.csv").write_bytes(BOM + (header + body).encode())
        votes, quarantine, _ = every_way(incoming)
        bom = [q for q in quarantine if q["code"] == "stray_bom"]
        assert len(bom) == 1 and "field 'response_a'" in bom[0]["reason"]
        assert _table(votes).num_rows == 1


def test_line_endings_nuls_control_characters_and_lines_pyarrow_reads_otherwise(tmp_path):
    incoming = tmp_path / "in"
    incoming.mkdir()
    lines = [_line(0) + b"\r\n", _line(1) + b"\r", b"\n", _line(2).replace(b"Answer", b"Ans\x00wer") + b"\n",
             _line(3).replace(b"Answer", b"Ans\x01wer") + b"\n", _line(4) + b"\x0b\n",
             _line(5) + _line(6) + b"\n",                                  # two objects on one line
             _line(7)[:-1] + b',"x":NaN}\n', b"null\n", b"[1]\n",           # NaN; not objects
             _line(8).replace(b"Answer", b"Ans\\u0001wer") + b"\n",         # an escaped control character: text
             _line(10) + b"\r" + _line(11) + b"\n",                         # "\r" alone does not end a line
             b"\r\n", _line(9)]                                            # no newline at the end
    (incoming / "b.jsonl").write_bytes(b"".join(lines))
    votes, quarantine, _ = every_way(incoming)
    assert _codes(quarantine) == {3: "nul_character", 4: "invalid_json", 5: "invalid_json", 6: "invalid_json",
                                  7: "invalid_json", 8: "not_an_object", 9: "not_an_object", 11: "invalid_json"}
    assert _voted_lines(votes) == [1, 2, 10, 13]


def test_deep_nesting_is_quarantined_and_a_block_of_nulls_does_not_crash(tmp_path):
    incoming = tmp_path / "in"
    incoming.mkdir()
    deep = [_line(i)[:-1] + b',"x":' + b"[" * d + b"]" * d + b"}" for i, d in enumerate((100, 300, 3000, 200_000))]
    (incoming / "b.jsonl").write_bytes(b"\n".join([*deep, b"null", b"null"]) + b"\n")
    votes, quarantine, _ = every_way(incoming)
    assert _codes(quarantine) == {2: "nested_too_deeply", 3: "nested_too_deeply", 4: "nested_too_deeply",
                                  5: "not_an_object", 6: "not_an_object"}
    assert _voted_lines(votes) == [1]


def test_negative_zero_and_equal_looking_extras_keep_their_own_json_on_both_paths(tmp_path):
    incoming = tmp_path / "in"
    incoming.mkdir()
    table = pa.Table.from_pylist([_vote(i, score=s) for i, s in enumerate([0.0, -0.0, 0.0, -0.0])])
    pq.write_table(table, incoming / "b.parquet")
    votes, _, _ = every_way(incoming)
    assert _table(votes)["meta"].to_pylist() == [
        '{"score":0.0}', '{"score":-0.0}', '{"score":0.0}', '{"score":-0.0}']


def test_ids_holding_the_old_separator_are_two_votes_not_a_duplicate(tmp_path):
    incoming = tmp_path / "in"
    incoming.mkdir()
    rows = [_vote(0, annotator="a\x1fb", pair_id="c"), _vote(1, annotator="a", pair_id="b\x1fc"),
            _vote(2, annotator="x\x1fy"), _vote(3, annotator="x\x1fy")]  # the fast path's columns too
    (incoming / "b.jsonl").write_bytes(b"\n".join(map(orjson.dumps, rows)) + b"\n")
    votes, quarantine, _ = every_way(incoming)
    assert quarantine == [] and _voted_lines(votes) == [1, 2, 3, 4]
    ids = ["a\x1fb", "a", "é\x1f", ""]
    pairs = ["c", "b\x1fc", "\x1f", "a\x1fb"]
    assert joined_digests(pa.array(ids), pa.array(pairs)) == [vote_key(a, p) for a, p in zip(ids, pairs)]
    assert len({vote_key(a, p) for a, p in zip(ids, pairs)}) == 4


def test_a_batch_without_rows_is_rejected_in_collect_as_in_admission(tmp_path):
    incoming = tmp_path / "in"
    incoming.mkdir()
    (incoming / "a.jsonl").write_bytes(b"")
    (incoming / "b.jsonl").write_bytes(b"\n \r\n")
    (incoming / "c.csv").write_text("prompt,response_a,response_b,annotator_id,choice\n")
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), incoming / "d.parquet")
    (incoming / "e.jsonl").write_bytes(_line(0) + b"\n")
    _, quarantine, report = every_way(incoming)
    entries = {e["batch_id"]: e for e in report["batches"]}
    for name in ("a.jsonl", "b.jsonl", "c.csv", "d.parquet"):
        assert entries[name]["status"] == "rejected" and "no usable vote rows" in entries[name]["message"], name
    assert entries["e.jsonl"]["status"] == "accepted" and report["totals"]["rejected"] == 4 and quarantine == []
    checked = collect.check_batch(incoming / "a.jsonl", _cfg(incoming))
    assert checked.report["status"] == "rejected" and checked.report["message"] == entries["a.jsonl"]["message"]
    with pytest.raises(DataError, match=r"a\.jsonl: has no usable vote rows .*Remove a\.jsonl from"):
        collect.raise_for_rejected(report, _cfg(incoming, on_rejected_batch="fail"))


# --------------------------------------------------------------------------------- the text cache


def _fast_and_row_votes(path: Path, conf: CollectSettings) -> tuple:
    got = [collect_batch(path, conf, fast=f) for f in (True, False)]
    cols = ["line", "pair_id", "prompt_hash", "response_a", "response_b"]
    return ([r.votes[cols].to_dict("records") for r in got], [[(q["line"], q["code"]) for q in r.quarantine] for r in got])


def test_a_forced_fingerprint_collision_still_gives_each_text_its_own_pair_id_and_check(tmp_path, monkeypatch):
    conf = CollectSettings.from_section(_cfg(tmp_path, max_field_chars=40))
    rows = [_vote(i) for i in range(6)] + [_vote(6) | {"response_a": "long " * 10}]  # over max_field_chars
    rows += [_vote(7) | {"prompt": "p " * 30}]
    path = tmp_path / "b.jsonl"
    path.write_bytes(b"\n".join(map(orjson.dumps, rows)) + b"\n")
    expected = _fast_and_row_votes(path, conf)
    assert expected[0][0] == expected[0][1] and expected[1][0] == expected[1][1]
    # every text now has one fingerprint: each lookup finds an entry made for another text
    monkeypatch.setattr(fast._Seen, "fingerprints", lambda self, values: [7] * len(values))
    fast._SEEN.clear()
    for _ in range(2):  # a second time: every text is "seen", under the shared fingerprint
        assert _fast_and_row_votes(path, conf) == expected
    seen = fast.seen_for(40)
    assert list(seen.texts) == [7] and list(seen.prompts) == [7]  # the collision was real
    assert expected[1][0] == [(7, "field_too_long"), (8, "field_too_long")]
    assert len({v["pair_id"] for v in expected[0][0]}) == 6


def test_threads_with_different_max_field_chars_never_share_results(tmp_path):
    rows = [_vote(i) | {"response_a": f"answer {i} " + "x" * (i % 3) * 20} for i in range(30)]
    path = tmp_path / "b.jsonl"
    path.write_bytes(b"\n".join(map(orjson.dumps, rows)) + b"\n")
    expected, got, errors = {}, {}, []
    for limit in (30, 100_000):
        conf = CollectSettings.from_section(_cfg(tmp_path, max_field_chars=limit))
        expected[limit] = [(q["line"], q["code"]) for q in collect_batch(path, conf, fast=False).quarantine]
    assert expected[30] and not expected[100_000]

    def run(limit: int) -> None:
        conf = CollectSettings.from_section(_cfg(tmp_path, max_field_chars=limit))
        norm = Normalizer(limit)
        try:
            for _ in range(15):
                for chunk in chunks(path, "jsonl", 7, "train"):
                    fast.fast_votes(chunk.table, norm, True, "b.jsonl")
                result = collect_batch(path, conf, chunk_rows=5)
                got.setdefault(limit, set()).add(tuple((q["line"], q["code"]) for q in result.quarantine))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(limit,)) for limit in (30, 100_000)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert got == {limit: {tuple(expected[limit])} for limit in (30, 100_000)}


# --------------------------------------------------------------------------------- bytes from the wild

_INVALID = [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\x80"]
_mutation = st.one_of(
    st.tuples(st.just("insert"), st.sampled_from(_INVALID + [BOM, b"\x00", b"\r", b"\t", b"\x01", b"\x1f", b"\x7f",
                                                             b"\r\n", b"\n", b"\\u0000", b"\\ud800"]),
              st.integers(0, 10_000)),
    st.tuples(st.just("extra"), st.sampled_from([b"9" * 5000, b"-0.0", b"1e999", b"NaN", b"18446744073709551616",
                                                 b"[" * 300 + b"]" * 300, b"[" * 1100 + b"]" * 1100, b'"a\x1fb"',
                                                 b"{}", b"[]", b"null"]),
              st.integers(0, 0)),
    st.tuples(st.just("bom_first"), st.just(b""), st.integers(0, 0)),
    st.tuples(st.just("repeat"), st.just(b""), st.integers(0, 10_000)),
)
_ENDINGS = st.sampled_from([b"\n", b"\r\n", b"\r", b"\n\n"])


def _mutate(lines: list[bytes], mutation: tuple[str, bytes, int]) -> list[bytes]:
    kind, data, at = mutation
    i = at % len(lines)
    if kind == "insert":
        offset = at % (len(lines[i]) + 1)
        lines[i] = lines[i][:offset] + data + lines[i][offset:]
    elif kind == "extra":
        lines[i] = lines[i][:-1] + b',"extra":' + data + b"}"
    elif kind == "bom_first":
        lines[0] = BOM + lines[0]
    else:
        lines.append(lines[i])
    return lines


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(n=st.integers(1, 6), mutations=st.lists(_mutation, max_size=5), endings=st.lists(_ENDINGS, min_size=8, max_size=8))
def test_mutated_bytes_end_the_same_on_both_paths_at_any_chunk_size(tmp_path, n, mutations, endings):
    incoming = tmp_path / f"in-{time.monotonic_ns()}"
    incoming.mkdir()
    lines = [_line(i, annotator=f"ann-{i % 2}", tag=i) for i in range(n)]
    for mutation in mutations:
        lines = _mutate(lines, mutation)
    data = b"".join(line + endings[i % len(endings)] for i, line in enumerate(lines))
    path = incoming / "wild.jsonl"
    path.write_bytes(data)
    _, quarantine, _ = every_way(incoming)  # no exception, every way the same, rows accounted for
    for row in quarantine:
        json.dumps(row, ensure_ascii=False).encode("utf-8")  # the quarantine file can always be written
    checked = collect.check_batch(path, _cfg(incoming, max_bad_share=0.3))  # admission: a verdict, never a raise
    assert checked.report["status"] in ("accepted", "rejected")
    assert checked.report["status"] == "accepted" or checked.report["message"]
    assert [q["code"] for q in checked.quarantine] == [q["code"] for q in quarantine]
