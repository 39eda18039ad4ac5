"""The collect stage: every row normalized or quarantined with a reason, batches accepted or rejected loudly."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rmpipe.data.collect import run as collect
from rmpipe.data.collect.batch import collect_batch

from rmpipe.core import schema
from rmpipe.core.errors import DataError
from rmpipe.data.sample.batches import generate_votes, write_sample_batches


def _cfg(incoming: Path, **overrides) -> dict:
    return {"incoming_dir": str(incoming), "max_bad_share": 0.2, "max_field_chars": 100_000, "max_file_mb": 512,
            "on_rejected_batch": "fail", **overrides}


def _vote(prompt="What is 2+2?", a="It is 4.", b="It is 5.", annotator="ann-1", choice="a", **extra) -> dict:
    return {"prompt": prompt, "response_a": a, "response_b": b, "annotator_id": annotator, "choice": choice, **extra}


def _jsonl(path: Path, rows: list) -> Path:
    """Rows are dicts (written as JSON) or raw bytes (written as they are)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join((r if isinstance(r, bytes) else orjson.dumps(r)) + b"\n" for r in rows))
    return path


def _good_rows(n: int, tag: str = "") -> list[dict]:
    return [_vote(prompt=f"Question {tag}{i}?", a=f"Answer {i}.", b=f"Wrong {i}.") for i in range(n)]


def _by_line(quarantine: list[dict]) -> dict[int, dict]:
    return {row["line"]: row for row in quarantine}


def _entry(report: dict, batch_id: str) -> dict:
    return next(e for e in report["batches"] if e["batch_id"] == batch_id)


def _invariant_holds(report: dict) -> bool:
    return all(e["rows_read"] == e["rows_normalized"] + e["rows_quarantined"] for e in report["batches"])


# --------------------------------------------------------------------------------- good data


def test_sample_batches_collect_into_one_vote_table(tmp_path):
    cfg = {"seed": 3, "n_pairs": 300, "n_batches": 2, "pair_rows": 20}
    write_sample_batches(tmp_path, cfg)
    votes, quarantine, report = collect.collect_dir(tmp_path, _cfg(tmp_path))

    assert quarantine == [] and _invariant_holds(report)
    assert [e["status"] for e in report["batches"]] == ["accepted"] * 3
    assert list(votes.columns) == schema.VOTE_COLUMNS
    truth = generate_votes(cfg)
    assert len(votes) == len(truth) + 2 * 20
    # A/B swaps of one comparison share a pair_id: one id per comparison, no accidental merges
    assert votes["pair_id"].nunique() == 300 + 20
    assert set(votes["choice"]) == {"a", "b", "tie"}
    assert all(json.loads(p)[-1]["role"] == "user" for p in votes["prompt"].unique())
    assert (votes["prompt_hash"] == votes["prompt"].map(schema.prompt_hash)).all()
    assert votes["meta"].str.contains("time_spent_s").mean() > 0.9

    pair_rows = votes[votes["batch_id"] == "batch-0003-pairs.parquet"]
    assert (pair_rows["choice"] == "a").all()  # a pair row is a vote for `chosen`, stored as response_a
    assert pair_rows["margin"].notna().any() and pair_rows["margin"].isna().any()
    assert votes.loc[votes["batch_id"] != "batch-0003-pairs.parquet", "margin"].isna().all()


def test_each_format_and_shape_normalizes_the_same_way(tmp_path):
    chat = [{"role": "System", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    _jsonl(tmp_path / "a.jsonl", [
        _vote(),  # string prompt
        _vote(prompt=chat, annotator="ann-2", choice="B", strength="Very Strong", pair_id="given-1", source="tool-x"),
    ])
    csv_text = (
        "prompt,response_a,response_b,annotator_id,choice,strength\n"
        '"What is 2+2?","It is 5.","It is 4.",ann-3,Tie,\n'  # the same pair shown B/A
        '"' + json.dumps(chat).replace('"', '""') + '","Line one\nline ""two""",It is 4.,ann-4,a,slight\n'
    )
    (tmp_path / "b.csv").write_text(csv_text, encoding="utf-8")
    pq.write_table(pa.table({"prompt": [chat], "chosen": ["It is 4."], "rejected": ["It is 5."]}),
                   tmp_path / "c.parquet")
    votes, quarantine, report = collect.collect_dir(tmp_path, _cfg(tmp_path))

    assert quarantine == [], quarantine
    assert [e["format"] for e in report["batches"]] == ["jsonl", "csv", "parquet"]
    rows = votes.set_index(["batch_id", "line"])
    string_prompt = schema.canonical_prompt("What is 2+2?")
    assert rows.loc[("a.jsonl", 1), "prompt"] == string_prompt
    assert rows.loc[("a.jsonl", 2), "prompt"] == schema.canonical_prompt(chat)
    assert json.loads(rows.loc[("a.jsonl", 2), "prompt"])[0]["role"] == "system"  # roles lower-cased
    assert rows.loc[("a.jsonl", 2), ["choice", "strength", "pair_id"]].tolist() == ["b", "very_strong", "given-1"]
    assert json.loads(rows.loc[("a.jsonl", 2), "meta"]) == {"source": "tool-x"}
    # a swapped presentation of the same comparison gets the same (derived) pair_id
    assert rows.loc[("a.jsonl", 1), "pair_id"] == rows.loc[("b.csv", 1), "pair_id"]
    assert rows.loc[("a.jsonl", 1), "pair_id"] == schema.pair_id("What is 2+2?", "It is 4.", "It is 5.")
    assert rows.loc[("b.csv", 1), ["choice", "strength"]].tolist() == ["tie", None]
    assert rows.loc[("b.csv", 2), "response_a"] == 'Line one\nline "two"'
    assert rows.loc[("b.csv", 2), "prompt"] == schema.canonical_prompt(chat)  # chat JSON in a CSV cell
    pair = rows.loc[("c.parquet", 1)]
    assert (pair["response_a"], pair["response_b"], pair["choice"]) == ("It is 4.", "It is 5.", "a")
    assert pair["annotator_id"] == "anonymous:c.parquet"


def _reference_normalize(text: str) -> str:
    """The definition schema.normalize_text implements (its fast paths must agree with it)."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip()


def test_normalize_text_equals_its_definition_on_every_whitespace_character():
    every_char = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    assert [c for c in every_char if c.isspace()] == [c for c in every_char if re.fullmatch(r"\s", c)]
    for c in every_char:
        if c.isspace() or not c.isprintable():
            text = f" a{c}{c}b {c}"
            assert schema.normalize_text(text) == _reference_normalize(text), hex(ord(c))


_texts = st.text(alphabet=st.sampled_from(list("ab Z\t\n\r\x0b\x0c\x1c\u00a0\u2003\u3000\ufb01\u00e9e\u0301\"\\"))
                 | st.characters(blacklist_categories=("Cs",)), max_size=30)  # Cs: surrogates, no UTF-8 for them


@settings(max_examples=300, deadline=None)
@given(prompt=st.one_of(_texts, st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "System ", "assistant"]),
                                                                "content": _texts}), min_size=1, max_size=3)),
       a=_texts, b=_texts)
def test_schema_text_functions_equal_their_definitions_and_collect_caches(prompt, a, b):
    for text in (a, b):
        assert schema.normalize_text(text) == _reference_normalize(text)
    try:
        messages = schema.to_messages(prompt)
    except schema.PromptError:
        return
    assert schema.canonical_prompt(prompt) == json.dumps(messages, ensure_ascii=False, sort_keys=True,
                                                         separators=(",", ":"))
    normalized = [{"role": m["role"], "content": _reference_normalize(m["content"])} for m in messages]
    reference_hash = hashlib.sha256(json.dumps(normalized, ensure_ascii=False, sort_keys=True,
                                               separators=(",", ":")).encode()).hexdigest()
    assert schema.prompt_hash(prompt) == reference_hash
    normalizer = collect._Normalizer(10_000)
    info_a, info_b = normalizer.text_info(a, "a"), normalizer.text_info(b, "b")
    if isinstance(info_a, collect._Bad) or isinstance(info_b, collect._Bad) or info_a[1] == info_b[1]:
        return
    prompt_info = (schema.canonical_prompt(prompt), schema.prompt_hash(prompt))
    assert normalizer.pair_id(prompt_info, info_a, info_b) == schema.pair_id(prompt, a, b)
    assert normalizer.pair_id(prompt_info, info_b, info_a) == schema.pair_id(prompt, a, b)


# --------------------------------------------------------------------------------- bad rows


def test_every_kind_of_bad_row_is_quarantined_with_reason_and_line(tmp_path):
    rows = [
        _vote(),                                                                      # 1 ok
        b'{"prompt": "x" "response_a": "y"}',                                         # 2 invalid JSON
        orjson.dumps(_vote(a="caf\u00e9 ok")).replace(b"\xc3\xa9", b"\xff"),        # 3 bad UTF-8
        orjson.dumps(_vote(a="zero")).replace(b"zero", b"ze\x00ro"),                 # 4 raw NUL byte
        _vote(a="has \u0000 NUL"),                                                    # 5 escaped NUL
        b"[1, 2, 3]",                                                                 # 6 not an object
        {k: v for k, v in _vote().items() if k != "response_b"},                      # 7 missing field
        _vote(a=5),                                                                   # 8 wrong type
        _vote(a="   \n "),                                                            # 9 whitespace only
        _vote(a="Same answer.", b="Same   answer. "),                                 # 10 identical
        _vote(choice="x"),                                                            # 11 unknown choice
        _vote(prompt="Another?", choice=" A "),                                       # 12 ok: case-insensitive
        _vote(prompt="Third?", strength="huge"),                                      # 13 unknown strength
        _vote(prompt="p" * 300),                                                      # 14 oversized field
        _vote(a="It is 5.", b="It is 4.", choice="b"),                                # 15 duplicate of 1 (B/A)
        _vote(prompt=""),                                                             # 16 empty prompt
        _vote(prompt=[{"content": "no role"}]),                                       # 17 bad chat prompt
        {"prompt": "Fourth?", "chosen": "A.", "rejected": "B.", "margin": "lots"},    # 18 bad margin
        {**_vote(prompt="Fifth?"), "chosen": "It is 4."},                             # 19 mixed shapes
        _vote(prompt="Sixth?", annotator=""),                                         # 20 empty annotator
        _vote(prompt="Seventh?", margin=0.5),                                         # 21 ok
    ]
    path = _jsonl(tmp_path / "in" / "mixed.jsonl", rows)
    result = collect.check_batch(path, _cfg(tmp_path / "in", max_field_chars=200, max_bad_share=1.0))
    # Each line alone in its chunk too, on both paths: the invalid JSON of line 2 must not be what keeps the
    # bad bytes of lines 3 and 4 from the column reader (it once made pyarrow drop the whole block).
    conf = collect.as_settings(_cfg(tmp_path / "in", max_field_chars=200, max_bad_share=1.0))
    for fast in (True, False):
        alone = collect_batch(path, conf, fast=fast, chunk_rows=1)
        assert alone.quarantine == result.quarantine and alone.votes.equals(result.votes), fast

    expected = {
        2: ("invalid_json", "line is not valid JSON: Expecting ',' delimiter at column 16"),
        3: ("invalid_utf8", "not valid UTF-8 at byte"),
        4: ("nul_character", "NUL byte"),
        5: ("nul_character", "response_a contains a NUL character"),
        6: ("not_an_object", "not an object"),
        7: ("missing_field", "missing required field 'response_b'"),
        8: ("wrong_type", "field 'response_a' must be a string, got int"),
        9: ("empty_text", "response_a is empty"),
        10: ("identical_responses", "response_a and response_b are identical after whitespace"),
        11: ("bad_choice", "choice 'x' is not one of a, b, tie"),
        13: ("bad_strength", "strength 'huge' is not one of slight, moderate, strong, very_strong"),
        14: ("field_too_long", "field 'prompt' is 300 chars, over collect.max_field_chars=200"),
        15: ("duplicate_vote", "duplicate vote: annotator ann-1 already judged this pair (line 1)"),
        16: ("empty_text", "prompt is empty"),
        17: ("bad_prompt", "prompt message 0 is not a {role, content} object"),
        18: ("bad_margin", "margin 'lots' is not a number"),
        19: ("mixed_shape", "both vote fields"),
        20: ("empty_text", "annotator_id is empty"),
    }
    got = _by_line(result.quarantine)
    assert set(got) == set(expected)
    for line, (code, reason) in expected.items():
        assert got[line]["code"] == code, (line, got[line])
        assert reason in got[line]["reason"], (line, got[line]["reason"])
        assert got[line]["batch_id"] == "mixed.jsonl" and got[line]["raw"]
    assert result.votes["line"].tolist() == [1, 12, 21]
    assert result.votes.loc[1, "choice"] == "a"
    assert json.loads(result.votes.loc[2, "meta"]) == {"margin": 0.5}  # on a vote row a margin is metadata
    assert pd.isna(result.votes.loc[2, "margin"])
    report = result.report
    assert (report["rows_read"], report["rows_normalized"], report["rows_quarantined"]) == (21, 3, 18)
    assert report["status"] == "accepted"  # max_bad_share=1.0 here
    assert {r["code"] for r in report["top_reasons"]} <= set(collect.REASONS)


def test_csv_bad_bytes_and_ragged_records_are_quarantined_and_the_rest_read(tmp_path):
    header = b"prompt,response_a,response_b,annotator_id,choice\n"
    body = [
        b'"Q1?","multi\nline","B",ann,a\n',       # record 1 spans two lines
        b'"Q2?","caf\xff","B",ann,a\n',            # record 2: not UTF-8
        b'"Q3?","A","B",ann,a,extra\n',           # record 3: too many fields
        b'"Q4?","A","B",ann,b\n',                 # record 4: fine
    ]
    (tmp_path / "x.csv").write_bytes(header + b"".join(body))
    result = collect.check_batch(tmp_path / "x.csv", _cfg(tmp_path, max_bad_share=1.0))
    got = _by_line(result.quarantine)
    assert got[2]["code"] == "invalid_utf8" and "field 'response_a' is not valid UTF-8 (byte 0xff" in got[2]["reason"]
    assert "\\xff" in got[2]["raw"]
    assert got[3]["code"] == "malformed_csv" and "6 fields but the header has 5" in got[3]["reason"]
    assert result.votes["line"].tolist() == [1, 4]
    assert result.votes.loc[0, "response_a"] == "multi\nline"


def test_oversized_raw_rows_are_truncated_in_quarantine(tmp_path):
    path = _jsonl(tmp_path / "big.jsonl", [_vote(a="x" * 20_000, choice="maybe")])
    result = collect.check_batch(path, _cfg(tmp_path, max_bad_share=1.0))
    raw = result.quarantine[0]["raw"]
    assert len(raw) < collect.RAW_MAX_CHARS + 100 and raw.endswith("more chars]")


def test_empty_file_header_only_csv_and_zero_row_parquet_are_rejected_as_admission_rejects_them(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b"")
    (tmp_path / "b.csv").write_text("prompt,response_a,response_b,annotator_id,choice\n")
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "c.parquet")
    _jsonl(tmp_path / "d.jsonl", _good_rows(3))
    votes, quarantine, report = collect.collect_dir(tmp_path, _cfg(tmp_path, on_rejected_batch="skip"))
    assert [(e["status"], e["rows_read"]) for e in report["batches"]] == [
        ("rejected", 0), ("rejected", 0), ("rejected", 0), ("accepted", 3)]
    assert all("no usable vote rows" in e["message"] for e in report["batches"][:3])
    assert len(votes) == 3 and quarantine == []


# --------------------------------------------------------------------------------- batches


def test_batch_over_bad_share_fails_the_run_with_file_share_and_reasons(tmp_path):
    _jsonl(tmp_path / "good.jsonl", _good_rows(10))
    _jsonl(tmp_path / "noisy.jsonl", _good_rows(5, "n") + [_vote(prompt=f"B{i}?", choice="x") for i in range(4)]
           + [b"not json"])
    cfg = _cfg(tmp_path)
    votes, quarantine, report = collect.collect_dir(tmp_path, cfg)
    noisy = _entry(report, "noisy.jsonl")
    assert noisy["status"] == "rejected" and noisy["bad_share"] == 0.5
    assert noisy["rows_excluded_with_batch"] == 5
    assert set(votes["batch_id"]) == {"good.jsonl"}  # the rejected batch contributes nothing
    assert len(quarantine) == 5  # its bad rows are still there to fix
    with pytest.raises(DataError) as err:
        collect.raise_for_rejected(report, cfg)
    message = str(err.value)
    assert "noisy.jsonl" in message and "50.0%" in message and "\n" not in message
    assert "choice is not a, b or tie x4" in message and "line is not valid JSON x1" in message


def test_batch_over_bad_share_is_skipped_loudly_under_skip_policy(tmp_path, caplog):
    _jsonl(tmp_path / "good.jsonl", _good_rows(10))
    _jsonl(tmp_path / "noisy.jsonl", _good_rows(2, "n") + [_vote(a="") for _ in range(3)])
    cfg = _cfg(tmp_path, on_rejected_batch="skip")
    votes, quarantine, report = collect.collect_dir(tmp_path, cfg)
    with caplog.at_level(logging.WARNING, logger="rmpipe"):
        collect.raise_for_rejected(report, cfg)  # no exception
    assert "noisy.jsonl REJECTED and SKIPPED" in caplog.text
    assert len(votes) == 10 and report["totals"]["rows_excluded_with_batch"] == 2
    assert [q["code"] for q in quarantine] == ["empty_text"] * 3
    assert _invariant_holds(report)


def test_identical_batch_under_another_name_is_counted_once(tmp_path):
    _jsonl(tmp_path / "batch-1.jsonl", _good_rows(4))
    (tmp_path / "batch-1-again.jsonl").write_bytes((tmp_path / "batch-1.jsonl").read_bytes())
    votes, _, report = collect.collect_dir(tmp_path, _cfg(tmp_path))
    assert len(votes) == 4
    # files are read in name order: "batch-1-again.jsonl" sorts first, so it is the original
    assert _entry(report, "batch-1-again.jsonl")["status"] == "accepted"
    assert _entry(report, "batch-1.jsonl")["status"] == "duplicate_of:batch-1-again.jsonl"
    assert _entry(report, "batch-1.jsonl")["rows_read"] == 0
    assert report["totals"]["duplicate_files"] == 1


def test_the_same_vote_in_a_later_batch_is_a_duplicate(tmp_path):
    _jsonl(tmp_path / "batch-1.jsonl", _good_rows(3))
    _jsonl(tmp_path / "batch-2.jsonl", _good_rows(1) + [_vote(prompt="New?")])  # re-delivers row 1's vote
    votes, quarantine, report = collect.collect_dir(tmp_path, _cfg(tmp_path, max_bad_share=0.5))
    assert len(votes) == 4
    assert quarantine[0]["batch_id"] == "batch-2.jsonl" and quarantine[0]["line"] == 1
    assert "already judged this pair (batch-1.jsonl line 1)" in quarantine[0]["reason"]


def test_unsafe_unknown_and_oversized_files_are_reported_not_read(tmp_path):
    _jsonl(tmp_path / "ok.jsonl", _good_rows(2))
    _jsonl(tmp_path / "elsewhere" / "real.txt", _good_rows(2, "e"))  # a folder without data files: no dataset
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "elsewhere" / "real.txt")
    _jsonl(tmp_path / "odd..name.jsonl", _good_rows(2, "o"))
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / ".hidden.jsonl").write_text("garbage")
    _jsonl(tmp_path / "zz-big.csv", [b"x" * 3_000_000])
    votes, _, report = collect.collect_dir(tmp_path, _cfg(tmp_path, max_file_mb=2, on_rejected_batch="skip"))
    status = {e["batch_id"]: e["status"] for e in report["batches"]}
    assert status == {"link.jsonl": "refused", "odd..name.jsonl": "refused", "ok.jsonl": "accepted",
                      "zz-big.csv": "refused"}
    assert "symbolic link" in _entry(report, "link.jsonl")["message"]
    assert "over collect.max_file_mb=2" in _entry(report, "zz-big.csv")["message"]
    skipped = {s["file"]: s["reason"] for s in report["skipped_files"]}
    assert set(skipped) == {"elsewhere", "notes.txt"} and ".txt" in skipped["notes.txt"]
    assert len(votes) == 2


def test_unreadable_parquet_is_rejected_with_the_reason(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    _, _, report = collect.collect_dir(tmp_path, _cfg(tmp_path, on_rejected_batch="skip"))
    entry = _entry(report, "broken.parquet")
    assert entry["status"] == "rejected" and "cannot read the parquet file" in entry["message"]


def test_missing_folder_and_bad_params_are_user_errors(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        collect.collect_dir(tmp_path / "nope", _cfg(tmp_path / "nope"))
    with pytest.raises(Exception, match="on_rejected_batch"):
        collect.as_settings(_cfg(tmp_path, on_rejected_batch="ignore"))
    _, _, report = collect.collect_dir(tmp_path, _cfg(tmp_path))
    with pytest.raises(DataError, match="no batch files"):
        collect.raise_for_rejected(report, _cfg(tmp_path))


def test_written_votes_read_back_as_the_vote_table(tmp_path):
    _jsonl(tmp_path / "in" / "a.jsonl", _good_rows(5) + [_vote(prompt="Q?", strength="slight")])
    votes, _, _ = collect.collect_dir(tmp_path / "in", _cfg(tmp_path / "in"))
    collect.write_votes(tmp_path / "votes", votes, rows_per_group=4)
    back = collect.read_votes_table(tmp_path / "votes").to_pandas()
    assert list(back.columns) == schema.VOTE_COLUMNS
    assert back.astype(object).where(back.notna(), None).values.tolist() == \
        votes.astype(object).where(votes.notna(), None).values.tolist()


# --------------------------------------------------------------------------------- the stage


def _stage(cwd: Path, project_root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(project_root)}
    return subprocess.run([sys.executable, "-m", "stages.collect"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_stage_runs_on_good_data_and_fails_cleanly_on_a_rejected_batch(tmp_path, project_root):
    params = yaml.safe_load((project_root / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    write_sample_batches(tmp_path / params["collect"]["incoming_dir"], {**params["sample_data"], "n_pairs": 200})

    done = _stage(tmp_path, project_root)
    assert done.returncode == 0, done.stderr
    parts = sorted((tmp_path / "data/collected/votes").iterdir())
    assert [p.name for p in parts] == ["batch-0001.jsonl.parquet", "batch-0002.csv.parquet", "batch-0003-pairs.parquet.parquet"]
    assert sum(pq.read_metadata(part).num_rows for part in parts) > 600
    report = json.loads((tmp_path / "reports/collect.json").read_text())
    assert report["totals"]["rows_quarantined"] == 0 and _invariant_holds(report)
    assert "batch-0001.jsonl" in done.stderr and "rows read" in done.stderr  # a progress line per file

    _jsonl(tmp_path / "data/incoming/batch-0009.jsonl", [_vote(choice="maybe")] * 3 + [b"{oops"])
    failed = _stage(tmp_path, project_root)
    assert failed.returncode != 0
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("error: batch rejected: batch-0009.jsonl: 100.0% of its 4 rows are bad")
    assert "Traceback" not in failed.stderr
    quarantined = [json.loads(line) for line in (tmp_path / "data/collected/quarantine.jsonl").read_text().splitlines()]
    assert {q["batch_id"] for q in quarantined} == {"batch-0009.jsonl"}  # written before failing
    report = json.loads((tmp_path / "reports/collect.json").read_text())
    assert _entry(report, "batch-0009.jsonl")["status"] == "rejected"


# --------------------------------------------------------------------------------- hostile input

_int64 = st.integers(-(2**63), 2**63 - 1)  # what JSON tools write (bigger ints are in the raw-bytes rows)
_hostile_values = st.one_of(
    st.none(), st.booleans(), _int64, st.floats(allow_nan=True), st.text(max_size=20),
    st.sampled_from(["a", "B", "tie", "", "   ", "\x00", "strong", "very strong"]),
    st.lists(st.dictionaries(st.sampled_from(["role", "content", "x"]), st.text(max_size=5) | _int64),
             max_size=2),
    st.dictionaries(st.text(max_size=3), _int64, max_size=2),
)
_fields = st.sampled_from(["prompt", "response_a", "response_b", "annotator_id", "choice", "strength", "margin",
                           "pair_id", "chosen", "rejected", "extra"])
_hostile_row = st.one_of(
    st.dictionaries(_fields, _hostile_values, max_size=8).map(orjson.dumps),
    st.builds(lambda d: orjson.dumps({**_vote(), **d}), st.dictionaries(_fields, _hostile_values, max_size=2)),
    st.binary(max_size=40).filter(lambda b: b"\n" not in b),
    st.just(orjson.dumps(_vote())),
    st.just(b'{"prompt": 123456789012345678901234567890, "choice": "\\ud800"}'),  # orjson refuses both
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(_hostile_row, max_size=25))
def test_hostile_mixes_never_escape_and_every_row_is_accounted_for(tmp_path, rows):
    incoming = tmp_path / f"in-{abs(hash(tuple(rows)))}"
    _jsonl(incoming / "hostile.jsonl", rows)
    csv_rows = [r.decode("utf-8", "replace").replace(",", ";") for r in rows]
    (incoming / "hostile.csv").write_text("prompt,response_a,response_b,annotator_id,choice\n"
                                          + "".join(f'"{r}",a,b,x,a\n' for r in csv_rows), encoding="utf-8")
    votes, quarantine, report = collect.collect_dir(incoming, _cfg(incoming, on_rejected_batch="skip"))
    assert _invariant_holds(report)
    assert report["totals"]["rows_quarantined"] == len(quarantine)
    for q in quarantine:
        assert q["reason"] and q["code"] in collect.REASONS and q["line"] >= 1
    for row in quarantine:  # the quarantine file can always be written as UTF-8 JSON
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    assert list(votes.columns) == schema.VOTE_COLUMNS
    assert votes["choice"].isin(["a", "b", "tie"]).all()
