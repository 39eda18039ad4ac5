"""The audit trail's pieces on their own (no pipeline run): history file, retraction check, decided pairs.

The whole trail under real DVC is tests/test_audit.py.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path


from rmpipe.audit import history


from rmpipe.data import retractions
from rmpipe.data.aggregate.run import AggregateSettings, aggregate
from rmpipe.audit.trace import influence
from test_aggregate import for_response, frame


def test_history_appends_numbered_records_and_never_rewrites_earlier_bytes(tmp_path):
    seen = []
    for i in range(3):
        history.append(tmp_path, {"trigger": f"t{i}"})
        seen.append((tmp_path / history.HISTORY).read_bytes())
    for before, after in zip(seen, seen[1:]):
        assert after.startswith(before)
    assert [r["seq"] for r in history.read(tmp_path)] == [1, 2, 3]
    # concurrent writers (two rebuilds of one project cannot overlap, but a backfill and an append could):
    threads = [threading.Thread(target=history.append, args=(tmp_path, {"trigger": "x"})) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["seq"] for r in history.read(tmp_path)) == list(range(1, 12))


def test_backfill_records_existing_run_summaries_once(tmp_path):
    runs = tmp_path / history.RUNS_DIR
    runs.mkdir(parents=True)
    summary = {"outcome": "accepted", "batch_id": "b.jsonl", "finished": "2026-11-30T10:00:00+00:00",
               "promotion": {"manifest_sha256": "ab" * 32, "batch_ids": ["b.jsonl"], "promoted": True, "reason": "ok"},
               "metrics": {"metrics/eval.json": {"accuracy": 0.9}}}
    (runs / "1.json").write_text(json.dumps(summary))
    (runs / "2.json").write_text(json.dumps(summary))  # the same model twice: one record
    (runs / "3.json").write_text(json.dumps({**summary, "outcome": "rejected"}))
    added = history.backfill(tmp_path, Path("models/export"), Path("models/promoted"))
    assert [r["trigger"] for r in added] == ["on-new-batch b.jsonl"]
    assert added[0]["promotion"]["promoted"] is True and added[0]["metrics"]["accuracy"] == 0.9
    assert history.backfill(tmp_path, Path("models/export"), Path("models/promoted")) == []  # not new any more


def test_a_retracted_batch_is_refused_by_content_under_any_name_and_by_its_id(tmp_path):
    entry = retractions.register(tmp_path, {"time": "t", "kind": "batch", "target": "v.jsonl", "sha256": "f" * 64,
                                            "reason": "poisoned", "by": "me"})
    register_ = retractions.load(tmp_path)
    assert entry["id"] == "R1" and len(register_) == 1  # the header line is not a retraction
    assert "poisoned" in retractions.refusal(register_, "renamed.jsonl", "f" * 64)
    assert "new file name" in retractions.refusal(register_, "v.jsonl", "0" * 64)
    assert retractions.refusal(register_, "other.jsonl", "0" * 64) is None


def test_decided_pairs_are_those_that_flip_or_drop_out_without_the_votes():
    rows = []
    # p_flip: 2 votes for "good", 3 from batch x for "bad": x decides it (without x: good wins)
    rows += [for_response("p_flip", "good", "bad", a, batch="base.jsonl") for a in ("a1", "a2")]
    rows += [for_response("p_flip", "bad", "good", a, batch="x.jsonl") for a in ("x1", "x2", "x3")]
    # p_only: only batch x votes on it: it drops out without x
    rows += [for_response("p_only", "yes", "no", a, batch="x.jsonl") for a in ("x1", "x2")]
    # p_same: x agrees with a clear majority: contributed, not decided
    rows += [for_response("p_same", "fine", "poor", a, batch="base.jsonl") for a in ("a1", "a2", "a3")]
    rows += [for_response("p_same", "fine", "poor", "x1", batch="x.jsonl")]
    # p_base: x never voted on it
    rows += [for_response("p_base", "up", "down", a, batch="base.jsonl") for a in ("a1", "a2")]
    votes = frame(rows)
    settings = AggregateSettings()
    train = aggregate(votes, settings).pairs[["pair_id", "prompt", "chosen"]]
    params = {"method": "majority", "min_votes": 2, "tie_policy": "drop", "agreement_floor": 0.0,
              "share_ceiling": 1.0, "exclude_flagged": False, "dawid_skene": {"n_iter": 5, "tol": 1e-4},
              "strength_margin": {"slight": 0.0, "moderate": 0.33, "strong": 0.67, "very_strong": 1.0}}
    result = influence(votes, train, votes["batch_id"] == "x.jsonl", params)
    by_prompt = dict(zip(train["pair_id"], train["prompt"]))
    decided = {json.loads(by_prompt[p])[0]["content"] for p in result["decided_pair_ids"]}
    assert decided == {"p_flip", "p_only"}
    assert result["contributed"] == 3 and result["flipped"] == 1 and result["dropped_out"] == 1
    # an annotator: without x1, p_flip is 2-2 (a tie, dropped) and p_only has one vote left
    by_x1 = influence(votes, train, votes["annotator_id"] == "x1", params)
    assert {json.loads(by_prompt[p])[0]["content"] for p in by_x1["decided_pair_ids"]} == {"p_flip", "p_only"}
