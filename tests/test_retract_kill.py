"""A retraction killed with SIGKILL at each of its steps, then run again, records the right models (issue #29, 11).

One real project (real DVC, Prefect, DeepSpeed on CPU, git) is built once: a first model from the sample
batches, then `nb2.jsonl` delivered through on-new-batch (the model trained on it). `rmpipe retract --batch
nb2.jsonl` is killed at a step (RMPIPE_TEST_KILL_AT: the process sends itself a real SIGKILL there) and run
again; its record must name as `before` the model trained on nb2 and as `after` a model built without it,
say what the first run demoted and deprecated, and nb2's delivery records must say it was retracted.

Coverage trade (the suite's time): the two scenarios issue #29 names run on their own copy (killed at
`registered`, and at `rebuild` with another batch delivered meanwhile); every other step is covered by one
chain on one copy, each re-run killed at the next step, so a step's re-run starts from the state the previous
kill left rather than from a clean kill at that step alone (three rebuilds instead of seven).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from test_audit import PARAMS
from test_dvc_pipeline import BIN, ROOT, copy_project, run

pytestmark = [pytest.mark.slow, pytest.mark.prefect_server, pytest.mark.timeout(3600)]
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
ALONE = ("registered", "rebuild")  # the two scenarios, each on its own copy
CHAIN = ("recorded", "moved", "taken-out", "rebuilt", "outcome")  # one copy, each re-run killed at the next


def _batch(path: Path, tag: str) -> Path:
    rows = [{"prompt": f"{tag} question {i}: what is a good way to store {tag} item {i}?",
             "response_a": f"Keep {tag} item {i} dry and cool, in a closed box.", "response_b": "No idea.",
             "annotator_id": f"{tag}-{k}", "choice": "a"} for i in range(12) for k in range(3)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _models(proj: Path) -> list[dict]:
    from rmpipe.audit import history

    return history.read(proj)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("retract-kill")
    proj = copy_project(tmp / "base", PARAMS)
    shutil.rmtree(proj / "audit", ignore_errors=True)
    (proj / "audit").mkdir()
    shutil.copy(ROOT / "audit/retractions.jsonl", proj / "audit/retractions.jsonl")  # the header alone
    run(["git", "init", "-q"], proj)
    run(["git", "add", "-A"], proj)
    run([*GIT, "commit", "-qm", "init"], proj)
    run([str(BIN / "rmpipe"), "sample-data"], proj)
    run([str(BIN / "dvc"), "repro"], proj)
    run([str(BIN / "rmpipe"), "on-new-batch", str(_batch(tmp / "delivery/nb2.jsonl", "nb2"))], proj)
    assert "nb2.jsonl" in _models(proj)[-1]["batches"]
    return proj


def _retract(proj: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(proj)}
    env.pop("RMPIPE_TEST_KILL_AT", None)
    if kill_at:
        env["RMPIPE_TEST_KILL_AT"] = kill_at
    return subprocess.run([str(BIN / "rmpipe"), "retract", "--batch", "nb2.jsonl", "--reason", "mislabeled",
                           "--json"], cwd=proj, env=env, capture_output=True, text=True, timeout=1200, check=False)


def _taken_out_of_service(proj: Path) -> dict:
    """What the first run must take out: the promoted model if it was built with nb2, and nb2's registered
    versions (read before the retraction)."""
    from pipeline import tainted
    from rmpipe.audit import registry

    def used(record: dict) -> bool:
        return "nb2.jsonl" in (record.get("batches") or {})
    promoted = tainted.promoted_record(proj, Path("models/promoted"))
    by_digest = {(r.get("model") or {}).get("manifest_sha256"): r for r in _models(proj)}
    versions = [registry.tag_of_deprecated(v["version"]) for v in registry.versions(proj) if not v["deprecated"]
                and used(by_digest.get(v["body"].get("manifest_sha256")) or {})]
    return {"demoted": promoted["seq"] if promoted and used(promoted) else None, "deprecated": versions}


def _once(proj: Path, kind: str) -> list[dict]:
    from rmpipe.audit import history

    key = "retraction_id" if kind == history.RETRACTION_OUTCOME else "retraction"
    found = [r for r in history.records(proj, (kind,))
             if r.get(key) == "R1" or (isinstance(r.get(key), dict) and r[key].get("id") == "R1")]
    assert len(found) <= 1, f"{len(found)} {kind} history records for R1"
    return found


def _batch_kept_once(proj: Path, where: str) -> None:
    from rmpipe.data import retractions

    assert [e["id"] for e in retractions.load(proj)] == ["R1"], "the register holds R1 once"
    places = [p for p in ("data/incoming/nb2.jsonl", "data/retracted/nb2.jsonl") if (proj / p).exists()]
    assert places == [where], f"nb2.jsonl is in {places}, not in {where} alone"


def _finished(proj: Path, trained_on_nb2: dict, taken: dict) -> dict:
    from rmpipe.audit import history

    record = json.loads((proj / "audit/retractions/R1.json").read_text())
    assert record["resumed"] is True
    assert record["before"]["seq"] == trained_on_nb2["seq"] and "nb2.jsonl" in record["before"]["batches"]
    assert record["after"] is not None, "after: null after a successful re-run"
    assert "nb2.jsonl" not in record["after"]["batches"] and record["after"]["seq"] > trained_on_nb2["seq"]
    assert record["after"]["seq"] == _models(proj)[-1]["seq"]  # the model in the workspace now
    assert (record["demoted"] or {}).get("seq") == taken["demoted"], "the re-run reports what the first demoted"
    assert record["deprecated"] == taken["deprecated"], "the re-run reports what the first deprecated"
    assert len(_once(proj, history.RETRACTION)) == len(_once(proj, history.RETRACTION_OUTCOME)) == 1
    _batch_kept_once(proj, "data/retracted/nb2.jsonl")
    deliveries = [json.loads(p.read_text()) for p in (proj / "reports/runs").glob("*.json")]
    nb2 = [r for r in deliveries if r["batch_id"] == "nb2.jsonl"]
    assert nb2 and all(r["outcome"] == "retracted" and r["retracted"]["id"] == "R1" for r in nb2)
    return record


@pytest.mark.parametrize("step", ALONE)
def test_a_retraction_killed_at_its_first_step_or_its_rebuild_then_run_again_names_the_right_models(
        built, tmp_path, step):
    proj = tmp_path / "proj"
    shutil.copytree(built, proj, symlinks=True)
    trained_on_nb2, taken = _models(proj)[-1], _taken_out_of_service(proj)

    killed = _retract(proj, step)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    if step == "rebuild":  # another batch arrives while the retraction lies killed: its rebuild goes first
        run([str(BIN / "rmpipe"), "on-new-batch", str(_batch(tmp_path / "delivery/nb3.jsonl", "nb3"))], proj)
    done = _retract(proj)
    assert done.returncode == 0, done.stderr[-3000:]

    record = _finished(proj, trained_on_nb2, taken)
    if step == "rebuild":
        assert "nb3.jsonl" in record["after"]["batches"]


def test_a_retraction_killed_at_every_later_step_in_turn_then_run_again_names_the_right_models(built, tmp_path):
    """Kill at `recorded`, re-run killed at `moved`, ... `outcome`, then a clean re-run; after each kill, what
    the steps done so far promise already holds, and nothing is recorded twice or lost."""
    from rmpipe.audit import history

    proj = tmp_path / "proj"
    shutil.copytree(built, proj, symlinks=True)
    trained_on_nb2, taken = _models(proj)[-1], _taken_out_of_service(proj)
    assert taken["demoted"] == trained_on_nb2["seq"] and taken["deprecated"], \
        "the nb2 model is promoted and registered (else the re-run's report of them is not tested)"
    for step in CHAIN:
        killed = _retract(proj, step)
        assert killed.returncode == -signal.SIGKILL, f"{step}: {killed.stderr[-3000:]}"
        assert len(_once(proj, history.RETRACTION)) == 1, f"killed at {step}: R1 is in the history once"
        assert not (proj / "audit/retractions/R1.json").exists(), f"killed at {step}: no outcome record yet"
        _batch_kept_once(proj, "data/incoming/nb2.jsonl" if step == "recorded" else "data/retracted/nb2.jsonl")
        if step in ("taken-out", "rebuilt", "outcome"):
            note = json.loads((proj / ".rmpipe/retractions/R1.taken-out.json").read_text()) \
                if taken["demoted"] or taken["deprecated"] else {"demoted": None, "deprecated": []}
            assert ((note["demoted"] or {}).get("seq"), note["deprecated"]) == (taken["demoted"], taken["deprecated"])
            records = [json.loads(p.read_text()) for p in (proj / "reports/runs").glob("*.json")]
            assert all(r["outcome"] == "retracted" for r in records if r["batch_id"] == "nb2.jsonl")
        if step in ("rebuilt", "outcome"):
            assert "nb2.jsonl" not in _models(proj)[-1]["batches"], f"killed at {step}: the rebuild was done"
        assert len(_once(proj, history.RETRACTION_OUTCOME)) == (step == "outcome"), step

    done = _retract(proj)
    assert done.returncode == 0, done.stderr[-3000:]
    _finished(proj, trained_on_nb2, taken)
