"""Reliability (issue #7): hostile batches, processes killed mid-stage, a stage failing mid-write.

Everything here runs the real components: the collect/aggregate code on generated hostile files,
real `python -m stages.<x>` subprocesses killed with SIGKILL, real DVC in a temporary copy. Arrivals
under load run through a real Prefect server and the real pipeline in tests/test_service.py.
"""

from __future__ import annotations

import csv
import io as stdio
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rmpipe.data.collect import run as collect
from rmpipe.data.aggregate.run import VOTE_BUCKETS, AggregateSettings, aggregate
from rmpipe.core.errors import DataError
from rmpipe.core.schema import CHOICES, VOTE_COLUMNS, canonical_prompt, normalize_text, pair_id

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
HOSTILE = settings(max_examples=40, deadline=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                          HealthCheck.data_too_large])


def _cfg(incoming: Path, **overrides) -> dict:
    return {"incoming_dir": str(incoming), "max_bad_share": 0.2, "max_field_chars": 100_000, "max_file_mb": 512,
            "on_rejected_batch": "skip", **overrides}


def _fresh_dir(tmp_path: Path, tag: str) -> Path:
    """Hypothesis re-runs a test body many times under one tmp_path: each example gets its own folder."""
    folder = tmp_path / f"{tag}-{time.monotonic_ns()}-{random.getrandbits(32):08x}"
    folder.mkdir(parents=True)
    return folder


def assert_every_row_accounted_for(votes: pd.DataFrame, quarantine: list[dict], report: dict) -> None:
    """The collect contract: rows read = rows normalized + rows quarantined, each with an actionable reason."""
    for entry in report["batches"]:
        assert entry["rows_read"] == entry["rows_normalized"] + entry["rows_quarantined"], entry
        status = entry["status"]
        assert status in ("accepted", "rejected", "refused") or status.startswith("duplicate_of:"), entry
        if status != "accepted":
            assert entry["message"] and entry["batch_id"] in entry["message"], entry
    totals = report["totals"]
    assert totals["rows_quarantined"] == len(quarantine)
    assert totals["rows_read"] == totals["rows_normalized"] + totals["rows_quarantined"]
    accepted = {e["batch_id"] for e in report["batches"] if e["status"] == "accepted"}
    assert len(votes) == sum(e["rows_normalized"] for e in report["batches"] if e["batch_id"] in accepted)
    for row in quarantine:
        assert row["code"] in collect.REASONS and row["line"] >= 1 and row["batch_id"]
        assert len(row["reason"]) > 10  # a sentence, not a code
        json.dumps(row, ensure_ascii=False).encode("utf-8")  # the quarantine file can always be written
    assert list(votes.columns) == VOTE_COLUMNS
    assert votes["choice"].isin(CHOICES).all()
    for a, b, prompt in zip(votes["response_a"], votes["response_b"], votes["prompt"]):
        assert normalize_text(a) and normalize_text(b) and normalize_text(a) != normalize_text(b)
        assert "\x00" not in a + b + prompt


def collect_and_aggregate(incoming: Path, **cfg) -> tuple[pd.DataFrame, list[dict], dict]:
    """Collect a folder, check the contract, then feed whatever was collected on to aggregate."""
    votes, quarantine, report = collect.collect_dir(incoming, _cfg(incoming, **cfg))
    assert_every_row_accounted_for(votes, quarantine, report)
    if len(votes):
        result = aggregate(votes, AggregateSettings(min_votes=1))
        assert sum(result.report["votes"].values()) == len(votes)
        # and independently of the per-vote bucket array: the votes reported used are the ones the pairs hold
        assert result.report["votes"]["used"] == int(result.pairs["n_votes"].sum())
    return votes, quarantine, report


# ------------------------------------------------------------------------------- hostile files

MB_TEXT = "x" * (1 << 20)  # a 1 MB field
_good = {"prompt": "What is 2+2?", "response_a": "It is 4.", "response_b": "It is 5.", "annotator_id": "ann-1",
         "choice": "a"}
_hostile_text = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", "   ", "\t\n", "\x00", "a\x00b", "It is 4.", "It is 4. ", "IT IS 4.", "caf\u00e9",
                     "line\nbreak", 'quote " and , comma', "\u00a0", "\ufeffbom", MB_TEXT]),
)
_hostile_value = st.one_of(
    _hostile_text, st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(),
    st.sampled_from(["a", "B", " tie ", "maybe", "strong", "very strong", "huge"]),
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "", 3]), "content": _hostile_text}),
             max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
_field = st.sampled_from(["prompt", "response_a", "response_b", "annotator_id", "choice", "strength", "margin",
                          "pair_id", "chosen", "rejected", "extra", "note"])
# Rows: a good row with a few fields replaced, removed or added, or a free mix of fields.
_hostile_record = st.one_of(
    st.builds(lambda over, drop: {k: v for k, v in {**_good, **over}.items() if k not in drop},
              st.dictionaries(_field, _hostile_value, max_size=3), st.sets(_field, max_size=2)),
    st.dictionaries(_field, _hostile_value, max_size=7),
    st.just(_good),  # the same vote again: a duplicate by the same annotator on the same pair
)
# Byte-level damage applied to one serialized line.
_line_damage = st.sampled_from(["none", "truncate", "bad_utf8", "nul", "not_object", "garbage"])


def _jsonl_bytes(records: list[dict], damage: list[str], cut: int) -> bytes:
    lines = []
    for rec, how in zip(records, damage):
        # stdlib json: it writes what vendors' tools write, huge integers and NaN included
        raw = json.dumps(rec, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass")
        if how == "truncate":
            raw = raw[: max(1, min(cut, len(raw) - 1))]
        elif how == "bad_utf8":
            raw = raw[:1] + b"\xff\xfe" + raw[1:]
        elif how == "nul":
            raw = raw[:-1] + b"\x00" + raw[-1:]
        elif how == "not_object":
            raw = b"[" + raw + b"]"
        elif how == "garbage":
            raw = b"{'prompt': 'single quotes'}"
        lines.append(raw)
    return b"\n".join(lines) + (b"\n" if lines else b"")


def _csv_text(records: list[dict]) -> str:
    """CSV as a spreadsheet would write it: the union of fields as header, values as text, quoted as needed."""
    names = sorted({k for rec in records for k in rec}) or ["prompt"]
    out = stdio.StringIO()
    writer = csv.writer(out)
    writer.writerow(names)
    for rec in records:
        writer.writerow(["" if rec.get(n) is None else
                         (json.dumps(rec[n]) if isinstance(rec[n], (list, dict)) else str(rec[n])) for n in names])
    return out.getvalue()


def _parquet_table(records: list[dict]) -> pa.Table:
    """Parquet has typed columns: a column whose values share one type keeps it, a mixed one becomes text."""
    names = sorted({k for rec in records for k in rec})
    columns = {}
    for name in names:
        values = [rec.get(name) for rec in records]
        kinds = {type(v) for v in values if v is not None}
        if kinds <= {str} or kinds <= {bool} or kinds <= {float}:
            columns[name] = pa.array(values)
        else:
            columns[name] = pa.array([None if v is None else json.dumps(v, default=str) if not isinstance(v, str)
                                      else v for v in values], pa.string())
    return pa.table(columns) if columns else pa.table({"prompt": pa.nulls(len(records), pa.string())})


@HOSTILE
@given(records=st.lists(_hostile_record, max_size=12), damage=st.lists(_line_damage, min_size=12, max_size=12),
       cut=st.integers(1, 60))
def test_hostile_files_in_every_format_never_escape_and_every_row_is_accounted_for(tmp_path, records, damage, cut):
    incoming = _fresh_dir(tmp_path, "in")
    jsonl = _jsonl_bytes(records, damage, cut)
    (incoming / "hostile.jsonl").write_bytes(jsonl)
    (incoming / "hostile.csv").write_text(_csv_text(records), encoding="utf-8")
    pq.write_table(_parquet_table(records), incoming / "hostile.parquet")
    (incoming / "empty.jsonl").write_bytes(b"")
    (incoming / "blank.csv").write_bytes(b"   \n\n")
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "choice": pa.array([], pa.string())}),
                   incoming / "zero-rows.parquet")

    votes, quarantine, report = collect_and_aggregate(incoming, max_field_chars=500_000)

    by_name = {e["batch_id"]: e for e in report["batches"]}
    # nothing silently lost: every non-blank JSONL line and every Parquet row was read
    assert by_name["hostile.jsonl"]["rows_read"] == sum(1 for line in jsonl.split(b"\n") if line.strip(b" \t\r\n\x0b\x0c"))
    assert by_name["hostile.parquet"]["rows_read"] == len(records)
    for name in ("empty.jsonl", "blank.csv", "zero-rows.parquet"):  # no rows: rejected, as admission does
        assert by_name[name]["rows_read"] == 0 and by_name[name]["status"] == "rejected"
    over = [q for q in quarantine if q["code"] == "field_too_long"]
    assert all("max_field_chars=500000" in q["reason"] for q in over)
    assert all(len(q["raw"] or "") < collect.RAW_MAX_CHARS + 100 for q in quarantine)  # a 1 MB row is cut


@HOSTILE
@given(content=st.binary(max_size=400), suffix=st.sampled_from([".jsonl", ".csv"]))
def test_random_bytes_as_a_batch_file_are_quarantined_or_rejected_never_a_crash(tmp_path, content, suffix):
    incoming = _fresh_dir(tmp_path, "bytes")
    (incoming / f"fuzz{suffix}").write_bytes(content)
    collect_and_aggregate(incoming)


def _valid_batch_bytes(suffix: str) -> bytes:
    rows = [{**_good, "prompt": f"Question {i}, with \"quotes\"\nand a newline?", "annotator_id": f"ann-{i % 3}",
             "choice": "ab"[i % 2]} for i in range(6)]
    return _jsonl_bytes(rows, ["none"] * 6, 0) if suffix == ".jsonl" else _csv_text(rows).encode()


@HOSTILE
@given(suffix=st.sampled_from([".jsonl", ".csv"]),
       edits=st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate"]), st.integers(0, 10_000),
                                st.binary(min_size=1, max_size=4)), min_size=1, max_size=6))
def test_byte_level_damage_to_a_valid_batch_never_crashes_collect(tmp_path, suffix, edits):
    data = bytearray(_valid_batch_bytes(suffix))
    for op, pos, blob in edits:
        pos = pos % (len(data) + 1)
        if op == "flip" and pos < len(data):
            data[pos] ^= blob[0] or 0x80
        elif op == "insert":
            data[pos:pos] = blob
        elif op == "delete":
            del data[pos:pos + len(blob)]
        else:
            del data[pos:]
    incoming = _fresh_dir(tmp_path, "damaged")
    (incoming / f"damaged{suffix}").write_bytes(bytes(data))
    collect_and_aggregate(incoming)


def test_parquet_with_wrong_column_types_and_a_truncated_parquet_file(tmp_path):
    table = pa.table({"prompt": [1, 2], "response_a": [b"\xff\xfe", b"ok"], "response_b": [3.5, float("nan")],
                      "annotator_id": [True, False], "choice": [["a"], ["b"]]})
    pq.write_table(table, tmp_path / "typed.parquet")
    good = pa.table({k: [v] * 3 for k, v in _good.items()})
    pq.write_table(good, tmp_path / "whole.parquet")
    (tmp_path / "cut.parquet").write_bytes((tmp_path / "whole.parquet").read_bytes()[:-20])
    votes, quarantine, report = collect_and_aggregate(tmp_path)
    by_name = {e["batch_id"]: e for e in report["batches"]}
    assert by_name["typed.parquet"]["rows_quarantined"] == 2
    assert {q["code"] for q in quarantine if q["batch_id"] == "typed.parquet"} <= {"wrong_type", "bad_prompt"}
    assert by_name["cut.parquet"]["status"] == "rejected"
    assert "cannot read the parquet file" in by_name["cut.parquet"]["message"]


def test_unsafe_file_names_and_symlinks_in_the_inbox_are_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jsonl").write_bytes(orjson.dumps(_good) + b"\n")
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "ok.jsonl").write_bytes(orjson.dumps(_good) + b"\n")
    (incoming / "back\\slash.jsonl").write_bytes(orjson.dumps({**_good, "prompt": "b?"}) + b"\n")
    (incoming / "up..sneaky.jsonl").write_bytes(orjson.dumps({**_good, "prompt": "c?"}) + b"\n")
    (incoming / "link.jsonl").symlink_to(outside / "secret.jsonl")
    (incoming / "dir-link.jsonl").symlink_to(outside)
    (incoming / "dangling.csv").symlink_to(outside / "missing.csv")
    votes, _, report = collect_and_aggregate(incoming)
    status = {e["batch_id"]: e["status"] for e in report["batches"]}
    assert status == {"ok.jsonl": "accepted", "back\\slash.jsonl": "refused", "up..sneaky.jsonl": "refused",
                      "link.jsonl": "refused", "dir-link.jsonl": "refused", "dangling.csv": "refused"}
    assert set(votes["batch_id"]) == {"ok.jsonl"}
    # the size limits are params: a field over max_field_chars is quarantined, a file over max_file_mb refused
    (incoming / "big.jsonl").write_bytes(orjson.dumps({**_good, "response_a": "y" * 3000}) + b"\n")
    _, quarantine, report = collect.collect_dir(incoming, _cfg(incoming, max_field_chars=2000, max_file_mb=0.002))
    big = next(e for e in report["batches"] if e["batch_id"] == "big.jsonl")
    assert big["status"] == "refused" and "collect.max_file_mb" in big["message"]
    _, quarantine, _ = collect.collect_dir(incoming, _cfg(incoming, max_field_chars=2000))
    assert [q["code"] for q in quarantine if q["batch_id"] == "big.jsonl"] == ["field_too_long"]


def test_collect_stage_on_a_hostile_inbox_exits_cleanly_without_a_traceback(tmp_path):
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    incoming = tmp_path / params["collect"]["incoming_dir"]
    incoming.mkdir(parents=True)
    rows = [orjson.dumps({**_good, "prompt": f"Q{i}?"}) for i in range(20)]
    (incoming / "mostly-good.jsonl").write_bytes(b"\n".join(rows + [b"\xff\x00{", orjson.dumps(_good)]) + b"\n")
    (incoming / "huge-field.jsonl").write_bytes(orjson.dumps({**_good, "response_a": "z" * 200_001}) + b"\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([PY, "-m", "stages.collect"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: batch rejected: huge-field.jsonl: 100.0%")
    report = json.loads((tmp_path / "reports/collect.json").read_text())
    assert report["totals"]["rows_read"] == 23 and report["totals"]["rows_quarantined"] == 2
    assert not (tmp_path / "data/collected/votes").exists()  # a failed collect publishes no votes


# ------------------------------------------------------------------------------- hostile vote tables


@st.composite
def hostile_vote_tables(draw):
    """Votes that passed collect but are awkward: one vote per pair, all ties, reused pair ids, repeat votes,
    responses equal after normalization, one annotator doing everything, odd ids, NaN/huge margins."""
    prompts = draw(st.lists(st.sampled_from(["q", "Q ", "q\u00a0", "\ufb01", "long " * 50, "|pipe|", "ünï"]),
                            min_size=1, max_size=3))
    responses = ["yes", "no", " yes ", "YES", "\ufb01ne", "fine", "x" * 300, "tie?"]
    annotators = draw(st.lists(st.sampled_from(["a1", "a2", "a|3", "", "\u00e9", "0", "anonymous:b.parquet"]),
                               min_size=1, max_size=4))
    rows = []
    for i in range(draw(st.integers(1, 30))):
        prompt = draw(st.sampled_from(prompts))
        a, b = draw(st.sampled_from(responses)), draw(st.sampled_from(responses))
        given_id = draw(st.sampled_from([None, None, None, "reused-id"]))
        rows.append({
            "batch_id": draw(st.sampled_from(["b1.jsonl", "b2.csv", "b3.parquet"])), "line": i + 1,
            "pair_id": given_id or pair_id(prompt, a, b), "prompt": canonical_prompt(prompt),
            "response_a": a, "response_b": b, "annotator_id": draw(st.sampled_from(annotators)) or "anon",
            "choice": draw(st.sampled_from(["a", "b", "tie", "tie"])),
            "strength": draw(st.sampled_from([None, "slight", "very_strong"])),
            "margin": draw(st.sampled_from([np.nan, 0.0, 1e300, -2.5])), "meta": "{}",
        })
    cfg = AggregateSettings(method=draw(st.sampled_from(["majority", "dawid_skene"])),
                            tie_policy=draw(st.sampled_from(["drop", "soft"])), min_votes=draw(st.integers(1, 3)),
                            exclude_flagged=draw(st.booleans()), agreement_floor=draw(st.sampled_from([0.0, 0.6, 1.0])),
                            share_ceiling=draw(st.sampled_from([0.3, 1.0])))
    return pd.DataFrame(rows, columns=VOTE_COLUMNS), cfg


@HOSTILE
@given(hostile_vote_tables())
def test_aggregate_on_hostile_but_valid_vote_tables_accounts_for_every_vote(case):
    votes, cfg = case
    try:
        result = aggregate(votes, cfg)
    except DataError as exc:  # allowed only where the params leave nothing to aggregate
        assert cfg.exclude_flagged and "exclude_flagged" in str(exc)
        return
    report, pairs = result.report, result.pairs
    assert set(report["votes"]) == set(VOTE_BUCKETS) and sum(report["votes"].values()) == len(votes)
    assert sum(report["pairs"].values()) == report["n_pairs_in"] == votes["pair_id"].nunique()
    assert len(pairs) == report["n_pairs_out"] == pairs["pair_id"].nunique()
    assert (pairs["n_votes"] == pairs["n_chosen"] + pairs["n_rejected"] + pairs["n_tie"]).all()
    assert (pairs["n_votes"] >= cfg.min_votes).all()
    assert pairs["agreement"].between(0, 1).all() and pairs["soft_label"].between(0, 1).all()
    assert all(math.isfinite(m) for m in pairs["margin"])
    assert all(normalize_text(c) != normalize_text(r) for c, r in zip(pairs["chosen"], pairs["rejected"]))
    assert all(len(h) == 64 for h in pairs["prompt_hash"]) and all(len(b) >= 1 for b in pairs["batch_ids"])
    if cfg.tie_policy == "drop" and cfg.method == "majority":  # a level pair is a tie, and ties are dropped
        assert (pairs["n_chosen"] != pairs["n_rejected"]).all()
    json.dumps(report, allow_nan=False)  # reports/annotators.json is strict JSON


# ------------------------------------------------------------------------------- processes killed mid-stage


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{Path(PY).parent}{os.pathsep}{os.environ['PATH']}"}


def _stage(name: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", f"stages.{name}"], cwd=cwd, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen) -> float:
    started = time.monotonic()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return time.monotonic() - started


def _snapshot(path: Path) -> dict[str, bytes] | None:
    if not path.exists():
        return None
    if path.is_file():
        return {"": path.read_bytes()}
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _set_param(project: Path, dotted: str, value) -> None:
    import yaml

    params = yaml.safe_load((project / "params.yaml").read_text())
    node = params
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_train_killed_with_sigkill_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    import torch
    from test_train import TINY, make_pairs, make_project

    from rmpipe.model.backbones import build_tiny_backbone
    from rmpipe.core.settings import ModelSettings
    from rmpipe.model.reward_model import RewardModel

    texts = pd.concat([make_pairs(64, 0).chosen, make_pairs(64, 0).rejected]).tolist()
    backbone = build_tiny_backbone(texts, ModelSettings.from_section({"max_length": 64, "tiny": TINY}), tmp_path / "backbone")
    train = {"epochs": 3, "checkpoint_every": 3}
    straight = make_project(tmp_path / "straight", backbone, n_train=96, **train)
    killed = make_project(tmp_path / "killed", backbone, n_train=96, **train)

    proc = _stage("train", killed)
    deadline = time.monotonic() + 240
    while not (killed / "checkpoints/train/latest").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "training ended before its first checkpoint"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "models/reward_model").exists()  # killed before the end: no model published
    _finish(_stage("train", killed))
    _finish(_stage("train", straight))

    record = json.loads((killed / "models/reward_model/training.json").read_text())
    assert record["resumed_from_step"] and record["resumed_from_step"] < record["steps"]
    a = RewardModel.from_pretrained(straight / "models/reward_model").state_dict()
    b = RewardModel.from_pretrained(killed / "models/reward_model").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _kill_inside_write(stage: str, cwd: Path, output: Path, tmp: Path) -> dict | None:
    """Run `stage` until it is inside the write of `output` (new bytes written, not yet published: the
    RMPIPE_TEST_WRITE_HOOK in rmpipe.core.io), SIGKILL its process group there; returns the output as it was at
    that moment. A writer that skips the atomic path never reaches the hook and fails this helper."""
    from rmpipe.core.io import WRITE_HOOK_ENV

    signal_file = tmp / f"{stage}-{time.monotonic_ns()}.inside-write"
    env = {**_env(), WRITE_HOOK_ENV: f"pause:{output.name}:{signal_file}"}
    proc = subprocess.Popen([PY, "-m", f"stages.{stage}"], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not signal_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
            raise AssertionError(f"{stage} never paused inside the write of {output}: "
                                 f"{proc.communicate()[1][-2000:]}")
        time.sleep(0.02)
    during = _snapshot(output)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return during


@pytest.mark.slow
def test_aggregate_and_split_killed_inside_the_write_never_publish_a_partial_output(tmp_path):
    """SIGKILL lands while the stage is writing its output (new bytes on disk, not yet in place).
    Mutations tried: `write_parquet` doing `df.to_parquet(path)` straight into place, and split writing
    `frame.to_parquet(OUT_DIR / ...)` inside its atomic_dir; each turns this red."""
    import yaml

    from rmpipe.data.sample.batches import write_sample_batches

    project = tmp_path / "project"
    (project / "data/collected").mkdir(parents=True)
    (project / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    params = yaml.safe_load((project / "params.yaml").read_text())
    write_sample_batches(project / "incoming", {**params["sample_data"], "n_pairs": 200, "pair_rows": 0})
    votes, _, _ = collect.collect_dir(project / "incoming", _cfg(project / "incoming"))
    collect.write_votes(project / "data/collected/votes", votes)
    for stage, output, param, new_value in (
        ("aggregate", "data/aggregated/pairs", "aggregate.tie_policy", "soft"),  # keeps the tied pairs
        ("split", "data/split", "split.salt", "another-salt"),
    ):
        _finish(_stage(stage, project))
        before = _snapshot(project / output)
        _set_param(project, param, new_value)  # the next complete run writes something else
        during = _kill_inside_write(stage, project, project / output, tmp_path)
        assert during == before, f"{stage}: {output} changed before the write was complete"
        assert _snapshot(project / output) == before, f"{stage}: the kill left a partial {output}"
        pd.read_parquet(project / output)  # what is there reads whole
        _finish(_stage(stage, project))
        assert _snapshot(project / output) != before  # and the next run publishes the new output


@pytest.mark.slow
def test_export_killed_inside_the_write_leaves_an_export_that_still_verifies(tmp_path):
    """Mutation tried: atomic_dir renaming the temp folder into place before the hook point (publish, then
    finish writing) turns this red."""
    from test_evaluate import save_reward_model
    from test_export import make_project

    from rmpipe.audit.lineage import verify_export

    project = make_project(tmp_path / "project", save_reward_model(tmp_path / "src"))
    _finish(_stage("evaluate", project))
    _finish(_stage("export", project))
    before = _snapshot(project / "models/export")
    during = _kill_inside_write("export", project, project / "models/export", tmp_path)
    assert during == before and _snapshot(project / "models/export") == before
    assert verify_export(project / "models/export") == []
    done = subprocess.run([PY, "-m", "pipeline.cli", "verify", "--export-only", "models/export"], cwd=project,
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


# ------------------------------------------------------------------------------- a failed stage and dvc.lock


@pytest.mark.slow
def test_a_stage_failing_after_part_of_its_output_reruns_with_downstream_only(tmp_path):
    """Aggregate fails after publishing the pairs and annotators.json but before annotators.md (an
    injected I/O failure, not a config error: nothing the user changes). dvc.lock keeps the last good run,
    and the next `dvc repro` re-runs aggregate and what is downstream of it, never collect.
    Mutation tried: `exits_cleanly` turning any exception into exit 0 turns this red on the stage's reason,
    which is lost; dvc.lock stayed consistent even then, because DVC refuses a run whose declared output is
    missing (annotators.md here): the lock half of this promise is DVC's, checked here end to end."""
    import re

    from test_dvc_pipeline import copy_project

    from rmpipe.core.io import WRITE_HOOK_ENV
    from rmpipe.data.sample.batches import write_sample_batches

    project = copy_project(tmp_path / "project")
    subprocess.run([PY, "-m", "dvc", "config", "--local", "core.no_scm", "true"], cwd=project, check=True)
    write_sample_batches(project / "data/incoming", {"seed": 5, "n_pairs": 200, "n_batches": 1, "pair_rows": 0})

    def repro(**env) -> tuple[int, list[str], str]:
        done = subprocess.run([PY, "-m", "dvc", "repro", "validate"], cwd=project, env={**_env(), **env},
                              capture_output=True, text=True, timeout=400)
        return done.returncode, re.findall(r"Running stage '([^']+)'", done.stdout), done.stdout + done.stderr

    code, ran, out = repro()
    assert code == 0 and ran == ["collect", "aggregate", "split", "validate"], out
    lock = (project / "dvc.lock").read_bytes()
    report_md = (project / "reports/annotators.md").read_bytes()

    _set_param(project, "aggregate.tie_policy", "soft")  # tied pairs kept: aggregate and split run again
    code, ran, out = repro(**{WRITE_HOOK_ENV: "fail:annotators.md"})
    assert code != 0 and ran == ["aggregate"] and "injected failure" in out, out
    # part of the output is there (DVC removed the old outputs, the stage wrote the pairs), part is not
    assert any((project / "data/aggregated/pairs").iterdir())
    assert not (project / "reports/annotators.md").exists() or \
        (project / "reports/annotators.md").read_bytes() == report_md
    assert (project / "dvc.lock").read_bytes() == lock  # nothing recorded for the failed run
    status = subprocess.run([PY, "-m", "dvc", "status", "--json"], cwd=project, env=_env(), capture_output=True,
                            text=True, timeout=120)
    stale = json.loads(status.stdout)
    assert "aggregate" in stale and "collect" not in stale, stale

    code, ran, out = repro()  # the same params, the fault gone
    assert code == 0 and ran == ["aggregate", "split", "validate"], out
    status = subprocess.run([PY, "-m", "dvc", "status", "validate", "--json"], cwd=project, env=_env(), capture_output=True,
                            text=True, timeout=120)
    assert json.loads(status.stdout) == {}


def test_a_non_finite_batch_is_skipped_with_a_warning_and_too_many_abort(tmp_path, caplog):
    """Extends test_train's skip/abort test with the warning a person sees, naming the step and the limit."""
    import logging

    from test_train import TINY, make_pairs, make_project, paths_in

    from rmpipe.model.backbones import build_tiny_backbone
    from rmpipe.core.settings import ModelSettings
    from stages.train import run

    texts = pd.concat([make_pairs(64, 0).chosen, make_pairs(64, 0).rejected]).tolist()
    backbone = build_tiny_backbone(texts, ModelSettings.from_section({"max_length": 64, "tiny": TINY}), tmp_path / "backbone")
    project = make_project(tmp_path / "p", backbone, use_margin=True, max_nonfinite_steps=1, epochs=1)
    frame = pd.read_parquet(project / "data/split/train.parquet")
    frame.loc[0, "margin"] = float("inf")  # an injected bad batch
    frame.to_parquet(project / "data/split/train.parquet")
    with caplog.at_level(logging.WARNING, logger="rmpipe"):
        run(str(project / "params.yaml"), paths_in(project))
    warnings = [r.getMessage() for r in caplog.records if "non-finite loss" in r.getMessage()]
    assert len(warnings) == 1 and "step skipped (1 of at most 1)" in warnings[0]
    assert json.loads((project / "metrics/train.json").read_text())["skipped_steps"] == 1

    frame["margin"] = float("nan")  # every batch bad: more than train.max_nonfinite_steps allows
    frame.to_parquet(project / "data/split/train.parquet")
    with pytest.raises(DataError, match="train.max_nonfinite_steps = 1"):
        run(str(project / "params.yaml"), paths_in(project))
