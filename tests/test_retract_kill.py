"""A retraction killed with SIGKILL at each of its steps, then run again, records the right models (issue #29, 11).

One real project (real DVC, Prefect, DeepSpeed on CPU, git) is built once: a first model from the sample
batches, then `nb2.jsonl` delivered through on-new-batch (the model trained on it). Each test works on a
copy: `rmpipe retract --batch nb2.jsonl` is killed at one step (RMPIPE_TEST_KILL_AT: the process sends
itself a real SIGKILL there), for one step another batch is delivered meanwhile, then the same retract is
run again. Its record must name as `before` the model trained on nb2 and as `after` a model built without
it (never null after a successful re-run), and nb2's delivery record must say it was retracted.
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

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
STEPS = ("registered", "recorded", "moved", "taken-out", "rebuild", "rebuilt", "outcome")


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


@pytest.mark.parametrize("step", STEPS)
def test_a_retraction_killed_at_any_step_then_run_again_names_the_right_models(built, tmp_path, step):
    proj = tmp_path / "proj"
    shutil.copytree(built, proj, symlinks=True)
    trained_on_nb2 = _models(proj)[-1]

    killed = _retract(proj, step)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    if step == "rebuild":  # another batch arrives while the retraction lies killed: its rebuild goes first
        run([str(BIN / "rmpipe"), "on-new-batch", str(_batch(tmp_path / "delivery/nb3.jsonl", "nb3"))], proj)
    done = _retract(proj)
    assert done.returncode == 0, done.stderr[-3000:]

    record = json.loads((proj / "audit/retractions/R1.json").read_text())
    assert record["resumed"] is True
    assert record["before"]["seq"] == trained_on_nb2["seq"] and "nb2.jsonl" in record["before"]["batches"]
    assert record["after"] is not None, "after: null after a successful re-run"
    assert "nb2.jsonl" not in record["after"]["batches"] and record["after"]["seq"] > trained_on_nb2["seq"]
    assert record["after"]["seq"] == _models(proj)[-1]["seq"]  # the model in the workspace now
    if step == "rebuild":
        assert "nb3.jsonl" in record["after"]["batches"]
    assert not (proj / "data/incoming/nb2.jsonl").exists() and (proj / "data/retracted/nb2.jsonl").exists()
    deliveries = [json.loads(p.read_text()) for p in (proj / "reports/runs").glob("*.json")]
    nb2 = [r for r in deliveries if r["batch_id"] == "nb2.jsonl"]
    assert nb2 and all(r["outcome"] == "retracted" and r["retracted"]["id"] == "R1" for r in nb2)
    assert not [r for r in deliveries if r.get("outcome") == "accepted" and r["batch_id"] == "nb2.jsonl"]
