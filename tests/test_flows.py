"""The Prefect flows in ephemeral mode (a temporary local server, PREFECT_HOME inside the project).

Real Prefect, real DVC, real stages; the rebuild tests use a two-stage toy DVC
project so they take seconds, the full pipeline runs in tests/test_service.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline import flows, registry, tasks
from rmpipe.core.errors import UserError
from rmpipe.core.io import sha256_file
from rmpipe.core.schema import canonical_prompt, prompt_hash

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def toy_project(tmp: Path) -> Path:
    """A DVC project (no git) whose two stages copy params into files: real `dvc repro`, in seconds."""
    (tmp / "params.yaml").write_text("toy:\n  value: 1\n")
    (tmp / "dvc.yaml").write_text(textwrap.dedent(f"""\
        stages:
          first:
            cmd: {PY} -c "import yaml; open('first.txt','w').write(str(yaml.safe_load(open('params.yaml'))['toy']['value']))"
            params: [toy]
            outs: [first.txt]
          second:
            cmd: {PY} -c "open('second.txt','w').write(open('first.txt').read() * 2)"
            deps: [first.txt]
            outs: [second.txt]
        """))
    subprocess.run([PY, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp, check=True)
    return tmp


def test_prefect_home_is_inside_the_project_and_never_the_users_home(tmp_path):
    home, project = tmp_path / "home", tmp_path / "project"
    home.mkdir()
    project.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        (project / name).write_text((ROOT / name).read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(HOME=str(home), PYTHONPATH=str(ROOT))
    code = "import pipeline.flows, prefect.settings as s; print(s.get_current_settings().home)"
    out = subprocess.run([PY, "-c", code], cwd=project, env=env, capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()) == project / ".prefect"
    assert not (home / ".prefect").exists()

    # A user who points at a server keeps their own settings.
    env["PREFECT_API_URL"] = "http://127.0.0.1:9/api"
    out = subprocess.run([PY, "-c", "import pipeline.flows, os; print(os.environ.get('PREFECT_HOME'))"],
                         cwd=project, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"


def prefect_db_snapshot(home: Path):
    return sorted((str(p.relative_to(home)), p.stat().st_mtime_ns) for p in home.rglob("*")) if home.exists() else None


@pytest.mark.slow
def test_the_test_suite_leaves_the_projects_prefect_database_alone():
    """A `make test`-style run (pytest from the project folder, no PREFECT_* set) runs flows in a throwaway
    Prefect home: the project's .prefect/ (what the user's server shows) is not touched, and the run
    ends without Prefect's shutdown noise."""
    before = prefect_db_snapshot(ROOT / ".prefect")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    proc = subprocess.run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_flows.py::test_stage_flow_fails_with_the_stages_message"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "1 passed" in output
    assert prefect_db_snapshot(ROOT / ".prefect") == before
    for noise in ("Logging error", "Error logging to API", "I/O operation on closed file"):
        assert noise not in output, output[-3000:]


def test_stage_flow_runs_the_stage_entry_point(tmp_path):
    project = tmp_path / "p"
    project.mkdir()
    for name in ("params.yaml", "dvc.yaml"):
        (project / name).write_text((ROOT / name).read_text())
    prompts = [f"question {i}" for i in range(40)]
    pairs = pd.DataFrame([{"pair_id": f"p{i}", "prompt": canonical_prompt(t), "chosen": "good", "rejected": "bad",
                           "prompt_hash": prompt_hash(t)} for i, t in enumerate(prompts)])
    (project / "data/aggregated").mkdir(parents=True)
    pairs.to_parquet(project / "data/aggregated/pairs.parquet")

    state = flows.run_stage(stage="split", project=str(project), return_state=True)

    assert state.is_completed(), state.message
    report = json.loads((project / "reports/split.json").read_text())
    assert sum(report[s]["pairs"] for s in ("train", "val", "test")) == len(prompts)


def test_stage_flow_fails_with_the_stages_message(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())

    state = flows.run_stage(stage="split", project=str(tmp_path), return_state=True)
    assert state.is_failed()
    assert "run the aggregate stage first" in state.message

    state = flows.run_stage(stage="no_such_stage", project=str(tmp_path), return_state=True)
    assert state.is_failed() and "no stage 'no_such_stage'" in state.message
    with pytest.raises(UserError, match="no stage 'no_such_stage'"):
        flows.run_stage(stage="no_such_stage", project=str(tmp_path))


def test_rebuild_goes_through_dvc_and_dvc_decides_what_is_stale(tmp_path):
    project = toy_project(tmp_path)

    first = flows.rebuild(project=str(project))
    assert first["ran"] == ["first", "second"]
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["first"]["params"]["params.yaml"]["toy"] == {"value": 1}
    assert (project / "second.txt").read_text() == "11"

    again = flows.rebuild(project=str(project))
    assert again["ran"] == [] and sorted(again["skipped"]) == ["first", "second"]
    assert again["dvc_lock_sha256"] == first["dvc_lock_sha256"]

    (project / "params.yaml").write_text("toy:\n  value: 7\n")
    changed = flows.rebuild(project=str(project))
    assert changed["ran"] == ["first", "second"] and (project / "second.txt").read_text() == "77"


def test_rebuild_failure_is_reported_not_retried(tmp_path):
    project = toy_project(tmp_path)
    spec = yaml.safe_load((project / "dvc.yaml").read_text())
    attempts = tmp_path / "attempts"
    spec["stages"]["first"]["cmd"] = (f"{PY} -c \"import sys; open({str(attempts)!r}, 'a').write('x'); "
                                      f"sys.exit('error: toy stage refuses')\"")
    (project / "dvc.yaml").write_text(yaml.safe_dump(spec))

    state = flows.rebuild(project=str(project), return_state=True)
    assert state.is_failed()
    assert "toy stage refuses" in state.message and "failed to reproduce" in state.message
    assert attempts.read_text() == "x"  # the stage ran once: a user's error is not retried


def test_overrides_need_dvc_experiments(tmp_path):
    project = toy_project(tmp_path)
    with pytest.raises(UserError, match="dvc exp run -S"):
        flows.rebuild(set_params=["toy.value=3"], project=str(project))


def test_overrides_run_as_a_dvc_experiment_recorded_in_params_and_lock(tmp_path):
    project = toy_project(tmp_path)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([PY, "-m", "dvc", "config", "core.no_scm", "false"], cwd=project, check=True)
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    subprocess.run([*git, "commit", "-qm", "toy"], cwd=project, check=True)

    result = flows.rebuild(set_params=["toy.value=3"], project=str(project))

    assert result["ran"] == ["first", "second"]
    assert yaml.safe_load((project / "params.yaml").read_text())["toy"]["value"] == 3
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["first"]["params"]["params.yaml"]["toy"] == {"value": 3}
    assert (project / "second.txt").read_text() == "33"


def test_pipeline_lock_queues_a_second_holder(tmp_path):
    (tmp_path / ".dvc").mkdir()
    """The second holder gets the lock only after the first let it go, however slow the machine: the first
    holds on until the second is about to ask, then marks its release just before leaving."""
    go, released = tmp_path / "go", tmp_path / "released"
    holder = subprocess.Popen(
        [PY, "-c", "import time; from pathlib import Path; from pipeline.locks import pipeline_lock\n"
                   f"with pipeline_lock(Path({str(tmp_path)!r})):\n print('held', flush=True)\n"
                   f" while not Path({str(go)!r}).exists(): time.sleep(0.05)\n"
                   f" time.sleep(0.5); Path({str(released)!r}).touch()"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        go.touch()
        with flows.pipeline_lock(tmp_path):
            got_it_after_release = released.exists()
            with flows.pipeline_lock(tmp_path):  # re-entrant inside one process (on_new_batch -> rebuild)
                pass
        assert got_it_after_release
    finally:
        holder.kill()
        holder.wait()


def test_retry_condition_retries_only_transient_failures():
    from prefect.states import Failed

    def state(exc):
        return Failed(data=exc)

    assert tasks.retry_transient_only(None, None, state(tasks.TransientFailure("dvc lock busy")))
    assert not tasks.retry_transient_only(None, None, state(tasks.StageFailed("bad params")))
    assert not tasks.retry_transient_only(None, None, state(ValueError("a bug")))


def test_duplicate_detection_by_content_and_by_name(tmp_path):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "b1.jsonl").write_text('{"x": 1}\n')
    same_content = tmp_path / "renamed.jsonl"
    same_content.write_text('{"x": 1}\n')
    same_name = tmp_path / "drop" / "b1.jsonl"
    same_name.parent.mkdir()
    same_name.write_text('{"x": 2}\n')
    new = tmp_path / "b2.jsonl"
    new.write_text('{"x": 3}\n')

    hit = registry.find_registered(same_content, incoming, sha256_file(same_content))
    assert hit is not None and "b1.jsonl" in hit[1]
    hit = registry.find_registered(same_name, incoming, sha256_file(same_name))
    assert hit is not None and "different file" in hit[1]
    assert registry.find_registered(new, incoming, sha256_file(new)) is None

    registered = registry.register_batch(new, incoming)
    assert registered.read_bytes() == new.read_bytes()
    assert sorted(p.name for p in incoming.iterdir()) == ["b1.jsonl", "b2.jsonl"]  # no temp file left


# --- on_new_batch ----------------------------------------------------------------------------------

def batch_project(tmp: Path) -> Path:
    """A DVC project whose one stage lists data/incoming: the real check and registration, a seconds-long rebuild."""
    project = tmp / "project"
    (project / "data/incoming").mkdir(parents=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (project / "params.yaml").write_text(yaml.safe_dump({"collect": params["collect"]}))
    (project / "dvc.yaml").write_text(textwrap.dedent(f"""\
        stages:
          inventory:
            cmd: {PY} inventory.py
            deps: [data/incoming]
            params: [collect]
            outs: [inventory.txt]
            metrics:
              - inventory.json:
                  cache: false
        """))
    (project / "inventory.py").write_text(
        "import json, os\n"
        "names = sorted(os.listdir('data/incoming'))\n"
        "open('inventory.txt', 'w').write(' '.join(names))\n"
        "json.dump({'batches': len(names)}, open('inventory.json', 'w'))  # a DVC metric\n")
    subprocess.run([PY, "-m", "dvc", "init", "--no-scm", "-q"], cwd=project, check=True)
    return project


def vote_lines(n: int, prefix: str = "q") -> str:
    return "".join(json.dumps({"prompt": f"{prefix} {i}?", "response_a": f"answer {i}", "response_b": f"reply {i}",
                               "annotator_id": f"ann{i % 3}", "choice": "a"}) + "\n" for i in range(n))


def test_a_good_batch_is_registered_rebuilt_and_summarised(tmp_path, monkeypatch):
    monkeypatch.setenv("RMPIPE_FAKE_TOKEN", "s3cr3t-token-value")  # environment values never reach a summary
    project = batch_project(tmp_path)
    batch = tmp_path / "drop" / "b-good.jsonl"
    batch.parent.mkdir()
    batch.write_text(vote_lines(12))

    summary = flows.on_new_batch(batch_path=str(batch), project=str(project))

    assert summary["outcome"] == "accepted" and summary["batch_id"] == "b-good.jsonl"
    assert (project / "data/incoming/b-good.jsonl").read_bytes() == batch.read_bytes()
    assert summary["rebuild"]["ran"] == ["inventory"]
    assert (project / "inventory.txt").read_text() == "b-good.jsonl"
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["inventory"]["deps"][0]["nfiles"] == 1  # DVC hashed the registered batch
    written = json.loads((project / summary["summary_path"]).read_text())
    assert written["outcome"] == "accepted" and written["flow_run_id"] and written["batch_sha256"]
    assert written["metrics"] == {"inventory.json": {"batches": 1}}  # the run record carries DVC's metrics
    assert "s3cr3t-token-value" not in (project / summary["summary_path"]).read_text()

    # The same content delivered again, under another name: a no-op.
    again = tmp_path / "drop" / "b-again.jsonl"
    again.write_bytes(batch.read_bytes())
    lock_before = (project / "dvc.lock").read_bytes()
    dup = flows.on_new_batch(batch_path=str(again), project=str(project))
    assert dup["outcome"] == "duplicate" and "b-good.jsonl" in dup["reasons"][0]
    assert sorted(p.name for p in (project / "data/incoming").iterdir()) == ["b-good.jsonl"]
    assert (project / "dvc.lock").read_bytes() == lock_before and again.exists()


def test_a_malformed_batch_is_rejected_with_reasons_and_touches_nothing_else(tmp_path):
    project = batch_project(tmp_path)
    drop = tmp_path / "drop"
    drop.mkdir()
    bad = drop / "b-bad.jsonl"
    bad.write_text("{not json\n" * 6 + vote_lines(2))

    state = flows.on_new_batch(batch_path=str(bad), project=str(project), return_state=True)

    assert state.is_failed() and "b-bad.jsonl rejected" in state.message
    assert not bad.exists() and (project / "data/rejected/b-bad.jsonl").exists()
    reasons = json.loads((project / "data/rejected/b-bad.jsonl.reasons.json").read_text())["reasons"]
    assert reasons and any("JSON" in r or "json" in r for r in reasons)
    (summary_file,) = (project / "reports/runs").glob("*-b-bad.jsonl.json")
    summary = json.loads(summary_file.read_text())
    assert summary["outcome"] == "rejected" and summary["reasons"] == reasons
    assert list((project / "data/incoming").iterdir()) == []
    assert not (project / "dvc.lock").exists()
