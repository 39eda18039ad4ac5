"""The audit trail's pieces on their own (no pipeline run): the history chain (real git repos and real writer
processes), the retraction check, decided pairs.

The whole trail under real DVC is tests/test_audit.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from rmpipe.audit import chain, history
from rmpipe.data import retractions
from rmpipe.data.aggregate.run import AggregateSettings, aggregate
from rmpipe.audit.trace import influence
from test_aggregate import for_response, frame

ROOT = Path(__file__).resolve().parents[1]
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-c", "commit.gpgsign=false"]


def git(root: Path, *args: str) -> None:
    subprocess.run([*GIT, *args], cwd=root, check=True, capture_output=True)


def git_out(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout


def cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)


def test_history_appends_numbered_chained_records_and_never_rewrites_earlier_bytes(tmp_path):
    seen = []
    for i in range(3):
        history.append(tmp_path, {"trigger": f"t{i}"})  # no git here: the file chain
        seen.append((tmp_path / chain.FILE).read_bytes())
    for before, after in zip(seen, seen[1:]):
        assert after.startswith(before)
    rows = history.read(tmp_path)
    assert [r["seq"] for r in rows] == [1, 2, 3] and rows[0]["prev"] is None
    assert rows[2]["prev"] == chain.digest(rows[1]) and history.verify(tmp_path)[:2] == (3, None)
    # threads of one process queue on the lock too
    threads = [threading.Thread(target=history.append, args=(tmp_path, {"trigger": "x"})) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r["seq"] for r in history.read(tmp_path)] == list(range(1, 12))
    assert history.verify(tmp_path)[1] is None


def git_repo(root: Path) -> Path:
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    (root / "notes.txt").write_text("v1\n")
    git(root, "add", "notes.txt")
    git(root, "commit", "-qm", "init")
    return root


WRITER = """
import sys
from pathlib import Path
from rmpipe.audit import history
for i in range(int(sys.argv[3])):
    history.append(Path(sys.argv[1]), {"trigger": f"{sys.argv[2]}-{i}"})
"""


@pytest.mark.parametrize("in_git", [True, False], ids=["git-ref", "plain-copy-file"])
def test_concurrent_writer_processes_lose_no_record_and_share_no_number(tmp_path, in_git):
    root = git_repo(tmp_path / "p") if in_git else tmp_path
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(root), name, "12"], env=env)
               for name in ("service", "manual")]
    assert [w.wait(timeout=300) for w in writers] == [0, 0]
    rows = history.read(root)
    assert history.location(root) == ("git ref refs/rmpipe/audit" if in_git else ".rmpipe/history.jsonl")
    assert [r["seq"] for r in rows] == list(range(1, 25))
    assert sorted(r["trigger"] for r in rows) == sorted(f"{n}-{i}" for n in ("service", "manual") for i in range(12))
    for name in ("service", "manual"):  # each writer's records in the order it wrote them
        mine = [r["trigger"] for r in rows if r["trigger"].startswith(name)]
        assert mine == [f"{name}-{i}" for i in range(12)]
    assert history.verify(root)[1] is None


def rewrite_git_chain(root: Path, rows: list[dict]) -> None:
    """What a tamperer does with plumbing: new commits holding `rows` (as given), the ref forced onto them."""
    parent = None
    for row in rows:
        blob = subprocess.run(["git", "hash-object", "-w", "--stdin"], cwd=root, input=chain.canonical(row),
                              capture_output=True, check=True).stdout.decode().strip()
        tree = subprocess.run(["git", "mktree"], cwd=root, input=f"100644 blob {blob}\trecord.json\n".encode(),
                              capture_output=True, check=True).stdout.decode().strip()
        parent = subprocess.run([*GIT, "commit-tree", tree, *(["-p", parent] if parent else []), "-m", "x"],
                                cwd=root, capture_output=True, check=True).stdout.decode().strip()
    git(root, "update-ref", chain.REF, parent)


def reseal(row: dict) -> dict:
    """An edit whose author also recomputed the record's own digest (not the next record's `prev`)."""
    body = {k: v for k, v in row.items() if k != "sha256"}
    return {**body, "sha256": chain.digest(body)}


TAMPERING = {
    "edited": (lambda rows: [*rows[:1], {**rows[1], "trigger": "forged"}, *rows[2:]],
               "record #2 was altered: its content no longer matches its sha256"),
    "edited-resealed": (lambda rows: [*rows[:1], reseal({**rows[1], "trigger": "forged"}), *rows[2:]],
                        "record #2 was altered: it is not the record #3 was chained to"),
    "removed": (lambda rows: [*rows[:1], *rows[2:]], "record #2 was removed: #3 follows #1"),
    "reordered": (lambda rows: [rows[0], rows[2], rows[1], *rows[3:]],
                  "record #3 is out of order: found where #2 belongs (records reordered)"),
}


@pytest.mark.parametrize("in_git", [True, False], ids=["git-ref", "plain-copy-file"])
@pytest.mark.parametrize("how", sorted(TAMPERING))
def test_history_verify_names_the_first_record_altered_removed_or_reordered(tmp_path, in_git, how):
    root = git_repo(tmp_path / "p") if in_git else tmp_path
    for i in range(4):
        history.append(root, {"trigger": f"t{i}", "metrics": {"accuracy": 0.9}})
    assert cli(root, "history", "--verify").returncode == 0
    tamper, expected = TAMPERING[how]
    rows = tamper(chain.open_chain(root).records())
    if in_git:
        rewrite_git_chain(root, rows)
    else:  # a hand edit of the file
        (root / chain.FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    bad = cli(root, "history", "--verify")
    assert bad.returncode != 0 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [f"error: history ({history.location(root)}): {expected}"]


def test_checkout_stash_branch_switch_and_dvc_checkout_leave_the_history_alone(tmp_path):
    root = git_repo(tmp_path / "p")
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=root, check=True)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "dvc init")
    history.append(root, {"trigger": "first"})
    (root / "notes.txt").write_text("v2\n")
    git(root, "stash")
    history.append(root, {"trigger": "while stashed"})
    git(root, "stash", "pop")
    git(root, "checkout", "-q", "-b", "experiment")
    history.append(root, {"trigger": "on a branch"})
    git(root, "checkout", "-q", "--", ".")
    git(root, "checkout", "-q", "main")
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "checkout", "-q"], cwd=root, check=True)
    git(root, "stash", "-q")
    assert [r["trigger"] for r in history.read(root)] == ["first", "while stashed", "on a branch"]
    assert history.verify(root)[1] is None
    assert git_out(root, "status", "--porcelain") == ""  # the history added nothing to the work tree


def test_an_old_history_file_is_imported_once_then_no_longer_written(tmp_path):
    root = git_repo(tmp_path / "p")
    legacy = root / history.LEGACY
    legacy.parent.mkdir()
    old = [{"format": "rmpipe-history/1", "seq": 1, "trigger": "dvc repro", "model": {"manifest_sha256": "a" * 64}},
           {"format": "rmpipe-history/1", "seq": 2, "trigger": "on-new-batch b", "model": {"manifest_sha256": "b" * 64}}]
    legacy.write_text("".join(json.dumps(r) + "\n" for r in old))
    before = legacy.read_bytes()
    history.append(root, {"trigger": "new"})
    history.append(root, {"trigger": "newer"})
    rows = history.read(root)
    assert [(r["seq"], r["trigger"]) for r in rows] == [(1, "dvc repro"), (2, "on-new-batch b"), (3, "new"), (4, "newer")]
    assert rows[0]["imported_from"] == "audit/history.jsonl" and rows[1]["imported_seq"] == 2
    assert legacy.read_bytes() == before and history.verify(root)[1] is None


def test_retractions_are_records_of_their_own_kind_in_the_same_chain(tmp_path):
    history.append(tmp_path, {"trigger": "dvc repro", "model": {"manifest_sha256": "c" * 64}})
    entry = {"id": "R1", "kind": "batch", "target": "v.jsonl", "reason": "poisoned", "by": "me"}
    history.append(tmp_path, {"time": "t", "retraction": entry}, kind=history.RETRACTION)
    history.append(tmp_path, {"trigger": "rmpipe retract batch v.jsonl (R1)", "model": {"manifest_sha256": "d" * 64}})
    assert [r["seq"] for r in history.read(tmp_path)] == [1, 3]  # models; numbers are the chain's
    kinds = [r["kind"] for r in history.records(tmp_path)]
    assert kinds == ["model", "retraction", "model"]
    assert history.records(tmp_path, (history.RETRACTION,))[0]["retraction"] == entry
    out = cli(tmp_path, "history").stdout
    assert "#2  t" in out and "retraction R1 of batch v.jsonl by me: poisoned" in out
    assert json.loads(cli(tmp_path, "history", "--json").stdout)[1]["retraction"]["id"] == "R1"


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
