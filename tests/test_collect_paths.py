"""Collect's column-wise fast path and its chunking change nothing (issue #13).

Every case collects the same folder several ways: the per-row path (`fast=False`) in one big
chunk, and the fast path in chunks of 1, 2 and 3 rows; the vote table, the quarantine and the
report must be identical, and so must the bytes of votes.parquet.
"""

from __future__ import annotations

import csv
import io as stdio
import json
import random
import shutil
import time
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_reliability import (
    _csv_text,
    _hostile_record,
    _jsonl_bytes,
    _line_damage,
    _parquet_table,
    assert_every_row_accounted_for,
)
from test_text_columns import TEXT

from rmpipe.core.paths import parts_in
from rmpipe.data.collect import run as collect
from rmpipe.data.collect.batch import collect_batch

PATHS = settings(max_examples=25, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                        HealthCheck.data_too_large])
WAYS = [dict(fast=False, chunk_rows=100_000), dict(fast=True, chunk_rows=100_000), dict(fast=True, chunk_rows=1),
        dict(fast=True, chunk_rows=2), dict(fast=True, chunk_rows=3), dict(fast=False, chunk_rows=3),
        dict(fast=True, chunk_rows=2, hold_mb=0)]  # every batch's votes through a part on disk


def _cfg(incoming: Path, **overrides) -> dict:
    return {"incoming_dir": str(incoming), "max_bad_share": 0.5, "max_field_chars": 100_000, "max_file_mb": 512,
            "on_rejected_batch": "skip", **overrides}


def _vote(i: int, annotator: str = "ann-1", **extra) -> dict:
    return {"prompt": f"Question {i % 4}?", "response_a": f"Answer {i}.", "response_b": f"Other {i}.",
            "annotator_id": annotator, "choice": "ab"[i % 2], "strength": ["slight", "", "Strong"][i % 3], **extra}


def part_bytes(folder: Path) -> dict[str, bytes]:
    """A votes folder as {part name: bytes}, in batch order."""
    return {part.name: part.read_bytes() for part in parts_in(folder)}


def agreeing_collects(incoming: Path, cfg: dict, ways: list[dict]) -> tuple[dict[str, bytes], list[dict], dict]:
    """Collect `incoming` with `cfg` each way; assert all agree (report, quarantine, the bytes of every votes
    part); return the first way's ({part: bytes}, quarantine, report)."""
    results = []
    for way in ways:
        out = incoming.parent / f"votes-{time.monotonic_ns()}"
        quarantine, report = collect.collect_to(incoming, cfg, out, **way)
        results.append((part_bytes(out), quarantine, report))
        shutil.rmtree(out)
    first = results[0]
    for way, result in zip(ways[1:], results[1:]):
        assert result[2] == first[2], way
        assert result[1] == first[1], way
        assert result[0] == first[0], way
    return first


def collect_every_way(incoming: Path, ways: list[dict] = WAYS, **cfg) -> tuple:
    """Collect `incoming` each way; assert all agree (votes, quarantine, report, parquet bytes); return one."""
    agreeing_collects(incoming, _cfg(incoming, **cfg), ways)
    votes, quarantine, report = collect.collect_dir(incoming, _cfg(incoming, **cfg), fast=True, chunk_rows=2)
    assert_every_row_accounted_for(votes, quarantine, report)
    return votes, quarantine, report


def _fresh(tmp_path: Path) -> Path:
    folder = tmp_path / f"in-{time.monotonic_ns()}-{random.getrandbits(32):08x}"
    folder.mkdir()
    return folder


def _interleave(records: list[dict]) -> list[dict]:
    """Hostile rows between good ones, so every chunk holds both and the fast path has work to do."""
    out = []
    for i, rec in enumerate(records):
        out += [_vote(100 + i, annotator=f"ann-{i % 3}", note=i), rec]
    return out


@PATHS
@given(records=st.lists(_hostile_record, max_size=10), damage=st.lists(_line_damage, min_size=20, max_size=20),
       cut=st.integers(1, 60))
def test_fast_path_equals_the_row_path_on_hostile_files_in_every_format(tmp_path, records, damage, cut):
    incoming = _fresh(tmp_path)
    rows = _interleave(records)
    (incoming / "hostile.jsonl").write_bytes(_jsonl_bytes(rows, damage + ["none"] * len(rows), cut))
    (incoming / "hostile.csv").write_text(_csv_text(rows), encoding="utf-8")
    pq.write_table(_parquet_table(rows), incoming / "hostile.parquet")
    collect_every_way(incoming, max_field_chars=500_000)


@PATHS
@given(rows=st.lists(st.one_of(
    st.builds(lambda i, a, c, s: _vote(i, annotator=a, choice=c, strength=s), st.integers(0, 6),
              st.sampled_from(["ann-1", " ann-1 ", "ann-2", "", 7]), st.sampled_from(["a", "B", " Tie ", "x", None]),
              st.sampled_from(["", "very strong", "Very-Strong", "huge", None])),
    st.builds(lambda i: {**_vote(i), "response_b": f"  Answer {i}. "}, st.integers(0, 3)),  # identical after normalizing
    st.builds(lambda i, p: {**_vote(i), "prompt": p}, st.integers(0, 3),
              st.sampled_from(["", " ", "a\x00b", '[{"role": "user", "content": "hi"}]', "\n\nHuman: hi\n\nAssistant:"])),
    st.builds(lambda i, pid: {**_vote(i), "pair_id": pid}, st.integers(0, 3), st.sampled_from(["", "p-1", 5])),
    st.builds(lambda i, p, a, b: {**_vote(i), "prompt": p, "response_a": a, "response_b": b},  # column vs Python texts
              st.integers(0, 3), TEXT, TEXT, TEXT),
), max_size=30))
def test_generated_vote_batches_give_the_same_table_either_path(tmp_path, rows):
    """Near-valid vote rows (the fast path's own territory): every label spelling, duplicates, identical texts."""
    incoming = _fresh(tmp_path)
    (incoming / "a.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    names = ["prompt", "response_a", "response_b", "annotator_id", "choice", "strength", "pair_id"]
    out = stdio.StringIO()
    writer = csv.writer(out)
    writer.writerow(names)
    writer.writerows(["" if r.get(n) is None else str(r[n]) for n in names] for r in rows)
    (incoming / "b.csv").write_text(out.getvalue(), encoding="utf-8")
    collect_every_way(incoming, max_bad_share=1.0)


def test_chunk_boundaries_a_straddling_bad_line_a_duplicate_in_another_chunk_and_a_one_row_batch(tmp_path):
    incoming = tmp_path / "in"
    incoming.mkdir()
    good = [orjson.dumps(_vote(i)) for i in range(7)]
    lines = [good[0], good[1], b'{"prompt": "cut', good[2], good[0], b"", good[3], good[4]]  # 3: bad, 5: repeat of 1
    (incoming / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    # CSV: a quoted record with newlines across a block, a ragged record after the first chunk, a repeat
    csv_text = ("prompt,response_a,response_b,annotator_id,choice\n"
                + "".join(f'"Q {i}?","multi\nline {i}","B {i}",ann-9,a\n' for i in range(4))
                + 'ragged,"x"\n' + '"Q 0?","multi\nline 0","B 0",ann-9,a\n' + '"Q 5?","x","y",ann-9,b\n')
    (incoming / "b.csv").write_text(csv_text, encoding="utf-8")
    (incoming / "c.jsonl").write_bytes(orjson.dumps(_vote(5, annotator="solo")) + b"\n")  # a batch of one row
    (incoming / "d.jsonl").write_bytes(orjson.dumps(_vote(4)) + b"\n" + orjson.dumps(_vote(6)) + b"\n")  # 1st repeats a.jsonl
    votes, quarantine, report = collect_every_way(incoming)

    got = {(q["batch_id"], q["line"]): (q["code"], q["reason"]) for q in quarantine}
    assert got[("a.jsonl", 3)][0] == "invalid_json"
    assert got[("a.jsonl", 5)] == ("duplicate_vote", "duplicate vote: annotator ann-1 already judged this pair "
                                                     "(line 1); the first vote is kept")
    assert got[("b.csv", 5)][0] == "malformed_csv"
    assert got[("b.csv", 6)][0] == "duplicate_vote" and "(line 1)" in got[("b.csv", 6)][1]
    assert got[("d.jsonl", 1)] == ("duplicate_vote", "duplicate vote: annotator ann-1 already judged this pair "
                                                     "(a.jsonl line 8); the first vote is kept")
    assert len(got) == 5
    lines = {b: votes.loc[votes["batch_id"] == b, "line"].tolist() for b in ("a.jsonl", "b.csv", "c.jsonl", "d.jsonl")}
    assert lines == {"a.jsonl": [1, 2, 4, 7, 8], "b.csv": [1, 2, 3, 4, 7], "c.jsonl": [1], "d.jsonl": [2]}
    assert votes.loc[votes["batch_id"] == "b.csv", "response_a"].tolist()[0] == "multi\nline 0"


def test_parquet_row_groups_and_chat_prompts_take_either_path_alike(tmp_path):
    incoming = tmp_path / "in"
    incoming.mkdir()
    rows = [_vote(i, annotator=f"ann-{i % 2}", extra=i) for i in range(10)]
    rows[3]["prompt"] = [{"role": "user", "content": "Question 3?"}]  # a chat prompt: the same prompt as text
    rows[6]["choice"] = "maybe"
    rows.append(_vote(3, annotator="ann-1", extra=10))  # row 4 again, its prompt as text: a duplicate
    with (incoming / "chat.jsonl").open("wb") as fh:
        fh.writelines(orjson.dumps(r) + b"\n" for r in rows)
    table = pa.Table.from_pylist([{**r, "annotator_id": "p" + r["annotator_id"],  # other annotators: no repeats of chat.jsonl
                                   "prompt": json.dumps(r["prompt"]) if isinstance(r["prompt"], list) else r["prompt"]}
                                  for r in rows])
    pq.write_table(table, incoming / "groups.parquet", row_group_size=4)
    votes, quarantine, _ = collect_every_way(incoming, max_bad_share=1.0)
    assert {(q["batch_id"], q["line"], q["code"]) for q in quarantine} == {
        ("chat.jsonl", 7, "bad_choice"), ("groups.parquet", 7, "bad_choice"),
        ("chat.jsonl", 11, "duplicate_vote"), ("groups.parquet", 11, "duplicate_vote")}
    assert len(votes) == 18


@pytest.mark.parametrize("fast", [True, False])
def test_collect_batch_is_a_function_of_one_file(tmp_path, fast):
    """What the engine switch runs per batch: no shared state, the same answer however often it runs."""
    path = tmp_path / "one.jsonl"
    path.write_bytes(b"".join(orjson.dumps(_vote(i % 5)) + b"\n" for i in range(8)))
    conf = collect.as_settings(_cfg(tmp_path))
    first, second = (collect_batch(path, conf, fast=fast, chunk_rows=3) for _ in range(2))
    assert first.report == second.report and first.quarantine == second.quarantine
    assert first.table.equals(second.table) and first.table.num_rows == 5
    assert [q["line"] for q in first.quarantine] == [6, 7, 8]
    assert len(first.keys) == 5


def test_texts_checked_under_one_max_field_chars_are_checked_again_under_another(tmp_path):
    """The fast path remembers what it found per text; a different limit must not reuse it."""
    incoming = tmp_path / "in"
    incoming.mkdir()
    (incoming / "a.jsonl").write_bytes(orjson.dumps(_vote(1, response_a="An answer of forty characters, or so...")) + b"\n")
    _, _, roomy = collect.collect_dir(incoming, _cfg(incoming, max_field_chars=1000))
    assert roomy["totals"]["votes"] == 1
    _, quarantine, tight = collect.collect_dir(incoming, _cfg(incoming, max_field_chars=30))
    assert tight["totals"]["votes"] == 0 and [q["code"] for q in quarantine] == ["field_too_long"]


def test_texts_that_could_tell_the_column_path_from_the_row_path_do_not(tmp_path):
    """Quotes and backslashes (JSON escapes), "[" (chat JSON), whitespace runs and ends, control
    characters, DEL and non-ASCII, as prompts and responses in JSONL and CSV: each way agrees."""
    texts = ['Say "hi" \\ now', 'a [b] "c"', "[not json", " lead", "trail ", "two  spaces", "tab\there", "new\nline",
             "bell\x07", "del\x7f", "caf\u00e9", "wide\u3000space", "\\", '"', "plain",
             "Human: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant:", '[{"role": "user", "content": "hi"}]', "[]", "[1]"]
    rows = [{"prompt": p, "response_a": texts[(i + 1) % len(texts)], "response_b": texts[(i + 5) % len(texts)],
             "annotator_id": f"ann-{i % 2}", "choice": "ab"[i % 2]} for i, p in enumerate(texts)]
    incoming = _fresh(tmp_path)
    (incoming / "a.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    out = stdio.StringIO()
    csv.DictWriter(out, fieldnames=list(rows[0])).writeheader()
    csv.DictWriter(out, fieldnames=list(rows[0])).writerows({**r, "annotator_id": "c" + r["annotator_id"]} for r in rows)
    (incoming / "b.csv").write_text(out.getvalue(), encoding="utf-8")
    votes, quarantine, _ = collect_every_way(incoming, max_bad_share=1.0)
    assert len(votes) == 2 * len(texts) and not quarantine
    assert votes["prompt"].str.count('"role"').max() == 3  # the transcript became its three turns


def test_chat_prompts_read_as_json_text_are_judged_as_the_messages_they_are(tmp_path):
    """JSONL chat prompts reach the fast path as their JSON text; where the text would be judged
    otherwise than the messages (longer than max_field_chars when the messages are not; an empty
    list or non-objects, which as text would pass as a plain question) the row path decides."""
    chat = [{"role": "user", "content": "x" * 30}]  # 30 chars of content, ~60 of JSON text
    rows = [{**_vote(1), "prompt": chat}, {**_vote(2), "prompt": []}, {**_vote(3), "prompt": ["hi"]},
            {**_vote(0), "prompt": [{"role": " User ", "content": "Question 0?"}]}]
    incoming = _fresh(tmp_path)
    (incoming / "a.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    votes, quarantine, _ = collect_every_way(incoming, max_bad_share=1.0, max_field_chars=40)
    assert [(q["line"], q["code"]) for q in quarantine] == [(2, "empty_text"), (3, "bad_prompt")]
    assert votes["line"].tolist() == [1, 4]
    assert votes["prompt"].tolist()[1] == '[{"content":"Question 0?","role":"user"}]'  # as the text prompt


_PAIR = st.fixed_dictionaries({"prompt": st.one_of(TEXT, st.sampled_from(["Q?", "\n\nHuman: Hi\n\nAssistant:", ""])),
                               "chosen": st.one_of(TEXT, st.sampled_from(["Yes.", " Yes. ", ""])),
                               "rejected": st.one_of(TEXT, st.sampled_from(["No.", "Yes."]))},
                              optional={"strength": st.sampled_from(["", "Strong", "huge"]),
                                        "source": st.sampled_from(["hh", "shp"]), "pair_id": st.just("p-1")})


@PATHS
@given(rows=st.lists(_PAIR, max_size=25))
def test_generated_plain_pair_rows_give_the_same_table_either_path(tmp_path, rows):
    """prompt / chosen / rejected as text, the shape of most public pairwise sets: the fast path takes them
    as votes for chosen (prejudged, anonymous annotator); texts that fail a check, identical responses, a
    given pair_id, a repeated pair go to the row path; both agree, in JSONL, CSV and Parquet."""
    incoming = _fresh(tmp_path)
    (incoming / "a.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    names = ["prompt", "chosen", "rejected", "strength", "source"]
    out = stdio.StringIO()
    writer = csv.writer(out)
    writer.writerow(names)
    writer.writerows(["" if r.get(n) is None else r[n] for n in names] for r in rows)
    (incoming / "b.csv").write_text(out.getvalue(), encoding="utf-8")
    if rows:
        pq.write_table(pa.Table.from_pylist([{n: r.get(n) for n in names} for r in rows]), incoming / "c.parquet",
                       row_group_size=7)
    collect_every_way(incoming, max_bad_share=1.0)


def test_public_pair_sets_are_taken_by_the_fast_path_as_the_row_path_takes_them(tmp_path):
    """An HH-style prompt, extra fields, a named annotator column with a blank, a repeated pair and JSON
    arrays as response text; and a file with scores (the row path's): either way the same, and the plain
    rows really are prejudged votes for chosen by `anonymous:<batch>` unless an annotator is named."""
    rows = [{"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad answer {i}.", "source": "hh"}
            for i in range(6)]
    rows[1]["prompt"] = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant:"
    rows[2]["chosen"], rows[2]["rejected"] = "[1, 2, 3]", "[3, 2, 1]"
    rows.append(dict(rows[0]))  # the same pair again, by the same (anonymous) annotator: a duplicate vote
    incoming = _fresh(tmp_path)
    (incoming / "hh.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    named = [{**r, "annotator_id": "" if i == 3 else f"rater-{i % 2}"} for i, r in enumerate(rows)]
    pq.write_table(pa.Table.from_pylist(named), incoming / "named.parquet", row_group_size=3)
    scored = [{**r, "score_chosen": 8.0, "score_rejected": 2.0} for r in rows[:3]]
    pq.write_table(pa.Table.from_pylist(scored), incoming / "scored.parquet")  # floats: JSONL would go by row anyway
    votes, quarantine, report = collect_every_way(incoming, max_bad_share=1.0)
    assert [(q["batch_id"], q["line"], q["code"]) for q in quarantine] == [("hh.jsonl", 7, "duplicate_vote"),
                                                                        ("named.parquet", 7, "duplicate_vote")]
    hh = votes[votes["batch_id"] == "hh.jsonl"]
    assert hh["prejudged"].all() and (hh["choice"] == "a").all() and (hh["annotator_id"] == "anonymous:hh.jsonl").all()
    assert hh["response_a"].tolist()[2] == "[1, 2, 3]" and '"Name a colour."' in hh["prompt"].tolist()[1]
    assert votes.loc[votes["batch_id"] == "named.parquet", "annotator_id"].tolist() == [
        "rater-0", "rater-1", "rater-0", "anonymous:named.parquet", "rater-0", "rater-1"]
    assert [b["shapes"]["pair_rows"] for b in report["batches"]] == [6, 6, 3]
    plain = votes[votes["batch_id"] != "scored.parquet"]
    assert (plain["meta"] == '{"source":"hh"}').all()
    _, _, _ = collect_every_way(incoming, [WAYS[0], WAYS[2]], max_bad_share=1.0, margin_from_scores=True)
    scored_votes, _, _ = collect.collect_dir(incoming, _cfg(incoming, max_bad_share=1.0, margin_from_scores=True))
    assert scored_votes.loc[scored_votes["batch_id"] == "scored.parquet", "margin"].tolist() == [6.0] * 3
