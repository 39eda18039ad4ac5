"""Arrivals are never lost: the queue, admission beside a manual `dvc repro`, run records, orphans.

Real processes throughout: real DVC, the real collect stage, real Prefect (the CLI's flows on the
session's one server, in-process flows ephemeral), real `kill -9`, real permission checks as a
non-root user. The pipeline after collect is one stand-in stage that writes an export folder with a real lineage manifest (`build_manifest`),
so `rmpipe verify` checks it for real and a scenario takes seconds, not minutes. Every
scenario ends with `assert_invariants`: every accepted batch is in data/incoming and in
the latest export's lineage with exactly one record, nothing is left pending or queued,
`dvc status` is clean and `rmpipe verify` passes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
BIN = Path(PY).parent
pytestmark = [pytest.mark.slow, pytest.mark.prefect_server]  # CLI flows talk to the session's server

EXPORT_STAGE = '''
import json, sys, time
from pathlib import Path
import pandas as pd, yaml
from rmpipe.core import io
from rmpipe.audit.lineage import build_manifest

with open("export-runs.jsonl", "a") as fh:  # not a DVC output: a record of every real run
    fh.write(json.dumps({"event": "entered", "t": time.time()}) + "\\n")
while Path("hold-export").exists():  # tests hold the stage here to race it
    time.sleep(0.05)
if Path("fail-export").exists():
    sys.exit("error: export refused (fail-export is present)")
started = time.time()
ids = sorted(set(pd.read_parquet("data/collected/votes", columns=["batch_id"])["batch_id"]))
with io.atomic_dir("models/export") as tmp:
    (tmp / "model.txt").write_text("\\n".join(ids))
    manifest = build_manifest(tmp, Path("."), yaml.safe_load(open("params.yaml")), {"train": ids}, ("export",),
                              {"promotion": {"promoted": False, "reason": "stand-in export"}},
                              read_paths=("data/collected",))
    io.write_json(tmp / "lineage.json", manifest)
with open("export-runs.jsonl", "a") as fh:
    fh.write(json.dumps({"event": "done", "start": started, "end": time.time(), "batches": ids}) + "\\n")
'''


def env_for(project: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") or k == "PREFECT_API_URL"}
    env.update(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1",
               PREFECT_HOME=str(project / ".prefect"))
    return env


def arrival_project(tmp: Path) -> Path:
    """The real collect stage + a stand-in export, under real DVC (no git)."""
    project = tmp / "project"
    (project / "data/incoming").mkdir(parents=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (project / "params.yaml").write_text(yaml.safe_dump({"collect": params["collect"], "export": params["export"]}))
    (project / "export_stage.py").write_text(EXPORT_STAGE)
    (project / "hold.py").write_text("import pathlib, sys, time\n"  # tests hold a stage at its end
                                     "while pathlib.Path(sys.argv[1]).exists():\n    time.sleep(0.05)\n")
    (project / "dvc.yaml").write_text(textwrap.dedent("""\
        stages:
          collect:
            cmd: python -m stages.collect && python hold.py hold-collect
            deps: [data/incoming]
            params: [collect]
            outs: [data/collected]
            metrics:
              - reports/collect.json:
                  cache: false
          export:
            cmd: python export_stage.py
            deps: [data/collected, export_stage.py]
            outs:
              - models/export:
                  persist: true
        """))
    subprocess.run([PY, "-m", "dvc", "init", "--no-scm", "-q"], cwd=project, check=True)
    return project


def vote_lines(tag: str, n: int = 4) -> str:
    return "".join(json.dumps({"prompt": f"{tag} q{i}?", "response_a": f"{tag} yes {i}", "response_b": f"no {i}",
                               "annotator_id": f"ann{i % 2}", "choice": "a"}) + "\n" for i in range(n))


def batch(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(vote_lines(name))
    return path


def set_param(project: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params))


def run_records(project: Path) -> list[dict]:
    folder = project / "reports/runs"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def record_of(project: Path, name: str, outcome: str | None = None) -> dict:
    found = [r for r in run_records(project) if r["batch_id"] == name and outcome in (None, r["outcome"])]
    assert len(found) == 1, (name, outcome, found)
    return found[0]


def export_runs(project: Path) -> list[dict]:
    path = project / "export-runs.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in lines if r["event"] == "done"]


def assert_invariants(project: Path, expected: set[str]) -> None:
    """Nothing lost, nothing recorded that was not read, every record matches the lineage."""
    from pipeline import records

    incoming = {p.name for p in (project / "data/incoming").iterdir() if not p.name.startswith(".")}
    manifest = json.loads((project / "models/export/lineage.json").read_text())
    lineage = {b for ids in manifest["batch_ids"].values() for b in ids}
    assert expected <= incoming and expected <= lineage, (expected, incoming, lineage)
    recs = run_records(project)
    accepted = Counter(r["batch_id"] for r in recs if r["outcome"] == "accepted")
    assert set(accepted) == lineage and set(accepted.values()) == {1}, accepted
    assert not [r for r in recs if r["outcome"] in records.PENDING], "records left pending"
    queue = project / ".rmpipe/queue"
    assert not queue.is_dir() or not [p for p in queue.iterdir() if not p.name.startswith(".")], "batches left queued"
    env = env_for(project)
    status = subprocess.run([PY, "-m", "dvc", "status", "--json"], cwd=project, env=env, capture_output=True,
                            text=True, timeout=120)
    assert status.returncode == 0 and json.loads(status.stdout or "{}") == {}, status.stdout + status.stderr
    verify = subprocess.run([PY, "-m", "pipeline.cli", "verify", "models/export"], cwd=project, env=env,
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def cli(project: Path, *args: str, log: Path | None = None, **popen) -> subprocess.Popen:
    out = log.open("w") if log else subprocess.PIPE
    return subprocess.Popen([PY, "-m", "pipeline.cli", *args], cwd=project, env=env_for(project), stdout=out,
                            stderr=subprocess.STDOUT, text=True, **popen)


def wait_for(what: str, check, timeout_s: float = 180, every_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(every_s)
    pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}")


class LockHolder:
    """Another process holding the project's pipeline lock until `release()`: deliveries queue up and wait."""

    def __init__(self, project: Path):
        code = ("import sys; from pathlib import Path; from pipeline.locks import pipeline_lock\n"
                f"with pipeline_lock(Path({str(project)!r})):\n print('held', flush=True); sys.stdin.readline()")
        self.proc = subprocess.Popen([PY, "-c", code], cwd=ROOT, env=env_for(project), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"

    def release(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=30)


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def deliver(project: Path, path: Path):
    from pipeline import flows

    return flows.on_new_batch(batch_path=str(path), project=str(project), return_state=True)


# --- 1 + 6 + 7: a killed delivery, `rm -rf .dvc/tmp`, and what is left behind ---------------------------

def test_killed_deliveries_and_a_removed_dvc_tmp_lose_nothing_and_leave_no_process(tmp_path):
    project = arrival_project(tmp_path)
    drop = tmp_path / "drop"
    a, b, c = (batch(drop, f"{n}.jsonl") for n in ("a", "b", "c"))
    (project / "hold-export").touch()
    logs = tmp_path / "logs"
    logs.mkdir()
    run_a = cli(project, "on-new-batch", str(a), log=logs / "a.log")
    run_b = None
    try:
        # A's rebuild is inside its export stage; B is queued behind it, waiting for the pipeline lock.
        wait_for("A's export stage", lambda: (project / "export-runs.jsonl").exists() or run_a.poll() is not None)
        assert run_a.poll() is None, (logs / "a.log").read_text()
        run_b = cli(project, "on-new-batch", str(b), log=logs / "b.log")
        wait_for("B queued", lambda: (project / ".rmpipe/queue/b.jsonl").exists() or run_b.poll() is not None)
        assert run_b.poll() is None, (logs / "b.log").read_text()
        wait_for("B waiting for the pipeline lock", lambda: "waiting for it" in (logs / "b.log").read_text())

        children = [p for run in (run_a, run_b) for p in psutil.Process(run.pid).children(recursive=True)]
        assert any("dvc" in " ".join(p.cmdline()) for p in children)  # A's `dvc repro` and its stage
        for run in (run_a, run_b):
            os.kill(run.pid, signal.SIGKILL)  # the process only, as an operator's `kill -9 PID` does
            run.wait()
        _, alive = psutil.wait_procs(children, timeout=60)
        assert not alive, [" ".join(p.cmdline())[:200] for p in alive]  # no Prefect server, dvc or stage left

        shutil.rmtree(project / ".dvc/tmp")  # the standard advice for a stale DVC lock
        (project / "hold-export").unlink()
        assert (project / ".rmpipe/queue/b.jsonl").exists()  # the queue survives it

        run_c = cli(project, "on-new-batch", str(c))
        out, _ = run_c.communicate(timeout=400)
        assert run_c.returncode == 0, out
        assert "marked Crashed" in out  # A's and B's flow runs no longer show RUNNING
    finally:
        for run in (run_a, run_b):
            if run is not None and run.poll() is None:
                run.kill()
    assert_invariants(project, {"a.jsonl", "b.jsonl", "c.jsonl"})
    assert "was admitted" in record_of(project, "a.jsonl")["reconciled"]  # its own rebuild was killed
    assert record_of(project, "b.jsonl")["admitted_with"] == ["b.jsonl", "c.jsonl"]  # C's rebuild took B in
    assert not list((project / ".rmpipe/runs").glob("*.json"))


# --- 2: admission while someone else's `dvc repro` runs collect ----------------------------------------------

def test_an_admission_racing_a_manual_dvc_repro_never_records_an_unread_batch(tmp_path):
    project = arrival_project(tmp_path)
    drop = tmp_path / "drop"
    assert deliver(project, batch(drop, "a.jsonl")).is_completed()

    holder = LockHolder(project)
    results = {}
    thread = threading.Thread(target=lambda: results.update(r=deliver(project, batch(drop, "r.jsonl"))))
    seen, flows_log = Lines(), logging.getLogger("rmpipe.flows")
    level = flows_log.level
    flows_log.setLevel(logging.INFO)
    flows_log.addHandler(seen)
    (project / "hold-collect").touch()  # the manual collect stops after reading, before DVC hashes its input
    try:
        thread.start()
        wait_for("R queued", lambda: (project / ".rmpipe/queue/r.jsonl").exists())
        manual = subprocess.Popen([PY, "-m", "dvc", "repro", "--force"], cwd=project, env=env_for(project), text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        lines = []
        for line in manual.stdout:
            lines.append(line)
            if "Running stage 'collect'" in line:
                holder.release()  # R now tries to admit while the manual collect runs
                break
        # R must wait for the stage: moved in now, R would be hashed into dvc.lock as read by collect.
        wait_for("R to wait for the manual collect", lambda: any("waiting to change" in m for m in seen.lines))
        (project / "hold-collect").unlink()
        lines += manual.stdout.readlines()
        assert manual.wait(timeout=300) == 0, "".join(lines)
        thread.join(timeout=400)
    finally:
        holder.release()
        (project / "hold-collect").unlink(missing_ok=True)
        flows_log.removeHandler(seen)
        flows_log.setLevel(level)
    assert results["r"].is_completed(), results["r"].message
    runs = export_runs(project)
    assert runs[-2]["batches"] == ["a.jsonl"]  # the manual run: R neither read nor recorded
    assert runs[-1]["batches"] == ["a.jsonl", "r.jsonl"]  # R's own rebuild, after it
    assert_invariants(project, {"a.jsonl", "r.jsonl"})


def test_collect_fails_when_its_folder_changes_while_it_reads(tmp_path):
    """Whoever writes into data/incoming mid-collect (a person, a script), DVC records nothing."""
    incoming = tmp_path / "data/incoming"
    incoming.mkdir(parents=True)
    (incoming / "a.jsonl").write_text(vote_lines("a"))
    (incoming / "b.jsonl").write_text(vote_lines("b", 150_000))  # takes seconds to read: the window
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"collect": yaml.safe_load((ROOT / "params.yaml").read_text())["collect"]}))
    proc = subprocess.Popen([PY, "-m", "stages.collect"], cwd=tmp_path, env=env_for(tmp_path), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "a.jsonl:" in line:  # a is read, b is being read
            (incoming / "late.jsonl").write_text(vote_lines("late"))
            break
    lines += proc.stdout.readlines()
    out = "".join(lines)
    assert proc.wait(timeout=300) == 2, out
    assert "changed while collect read it (added: late.jsonl)" in out and "Traceback" not in out


# --- 3: a manual `dvc repro` and the service do not interleave; verify catches a lineage that does -------

def test_the_service_waits_for_a_manual_dvc_repro_instead_of_interleaving(tmp_path):
    project = arrival_project(tmp_path)
    drop = tmp_path / "drop"
    assert deliver(project, batch(drop, "a.jsonl")).is_completed()
    (project / "hold-export").touch()
    manual = subprocess.Popen([PY, "-m", "dvc", "repro", "--force"], cwd=project, env=env_for(project), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    for line in manual.stdout:
        lines.append(line)
        if "Running stage 'export'" in line:
            break
    seen, flows_log = Lines(), logging.getLogger("rmpipe.flows")
    level = flows_log.level
    flows_log.setLevel(logging.INFO)
    flows_log.addHandler(seen)
    results = {}
    thread = threading.Thread(target=lambda: results.update(x=deliver(project, batch(drop, "x.jsonl"))))
    try:
        thread.start()
        wait_for("the service to wait for the manual run",
                 lambda: any("waiting for another DVC run" in line for line in seen.lines))
        (project / "hold-export").unlink()
        lines += manual.stdout.readlines()
        assert manual.wait(timeout=300) == 0, "".join(lines)
        thread.join(timeout=400)
    finally:
        flows_log.removeHandler(seen)
        flows_log.setLevel(level)
        (project / "hold-export").unlink(missing_ok=True)
    assert results["x"].is_completed(), results["x"].message
    runs = export_runs(project)
    assert all(p["end"] <= n["start"] for p, n in zip(runs, runs[1:]))
    assert runs[-2]["batches"] == ["a.jsonl"] and runs[-1]["batches"] == ["a.jsonl", "x.jsonl"]
    assert_invariants(project, {"a.jsonl", "x.jsonl"})


def test_verify_and_export_refuse_a_lineage_whose_stages_disagree(tmp_path):
    """What an interleaved run leaves: split recorded from new pairs, train from the old ones."""
    from rmpipe.core.errors import DataError
    from rmpipe.audit.lineage import build_manifest, chain_conflicts, verify_export

    lock = {"schema": "2.0", "stages": {
        "aggregate": {"cmd": "x", "outs": [{"path": "pairs.parquet", "md5": "new", "size": 1}]},
        "split": {"cmd": "x", "deps": [{"path": "pairs.parquet", "md5": "new", "size": 1}],
                  "outs": [{"path": "data/split", "md5": "s2.dir", "size": 1}]},
        "train": {"cmd": "x", "deps": [{"path": "data/split", "md5": "s1.dir", "size": 1}],
                  "outs": [{"path": "model", "md5": "m.dir", "size": 1}]},
    }}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    export = tmp_path / "export"
    export.mkdir()
    with pytest.raises(DataError, match="lineage inconsistent: data/split .* s2.dir .*split outs.* s1.dir .*train deps"):
        build_manifest(export, tmp_path, {}, {"train": ["a"]}, ("export",), {})

    lock["stages"]["train"]["deps"][0]["md5"] = "s2.dir"  # an honest run: one chain
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    manifest = build_manifest(export, tmp_path, {}, {"train": ["a"]}, ("export",), {})
    (export / "lineage.json").write_text(json.dumps(manifest))
    assert verify_export(export) == [] and chain_conflicts(manifest["stages"]) == []

    manifest["stages"]["train"]["deps"]["data/split"] = "s1.dir"  # a manifest written before the check existed
    (export / "lineage.json").write_text(json.dumps(manifest))
    (problem,) = verify_export(export)
    assert problem.startswith("lineage inconsistent: data/split")


# --- 4 + 5: permissions, unreadable files, over-long names (without root's power over permissions) ----------

# Tests run as root, who may write into a 555 folder and read a 000 file: drop those capabilities
# (for the process and all it starts) so the permission bits apply as they do to any user.
NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]

NOBODY_SCRIPT = '''
import json, os, sys
from pathlib import Path
from pipeline import flows
project, drop = Path(sys.argv[1]), Path(sys.argv[2])
incoming = project / "data/incoming"

def deliver(name):
    state = flows.on_new_batch(batch_path=str(drop / name), project=str(project), return_state=True)
    return {"completed": state.is_completed(), "message": state.message}

out = {"a": deliver("a.jsonl")}  # the first batch, into a writable data/incoming
os.chmod(incoming, 0o555)
out["x_blocked"] = deliver("x.jsonl")
out["x_queued"] = (project / ".rmpipe/queue/x.jsonl").exists()
os.chmod(incoming, 0o755)
out["x_again"] = deliver("x.jsonl")  # re-delivery of a batch stuck in the queue takes it in
os.chmod(incoming, 0o555)
out["y_blocked"] = deliver("y.jsonl")
os.chmod(incoming, 0o755)
state = flows.rebuild(project=str(project), return_state=True)  # any rebuild takes the queue in
out["rebuild"] = {"completed": state.is_completed(), "message": state.message}
print("RESULT " + json.dumps(out))
'''


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_a_batch_stuck_by_permissions_is_taken_in_by_the_next_rebuild_and_unreadable_files_are_rejected(tmp_path):
    project = arrival_project(tmp_path)
    drop = tmp_path / "drop"
    for name in ("a.jsonl", "x.jsonl", "y.jsonl", "z.jsonl"):
        batch(drop, name)
    env = env_for(project)
    try:
        if os.geteuid() == 0:
            probe = subprocess.run([*NO_DAC, "true"], capture_output=True, text=True)
            if probe.returncode != 0:
                pytest.skip(f"cannot drop capabilities here: {probe.stderr.strip()}")
        as_user = NO_DAC if os.geteuid() == 0 else []
        proc = subprocess.run([*as_user, PY, "-c", NOBODY_SCRIPT, str(project), str(drop)], cwd=project,
                              env=env, capture_output=True, text=True, timeout=600)
        result = json.loads(next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")))
        assert result["a"]["completed"], result["a"]
        assert not result["x_blocked"]["completed"] and result["x_queued"]
        assert "cannot move queued batch x.jsonl into data/incoming (Permission denied)" in result["x_blocked"]["message"]
        assert result["x_again"]["completed"], result["x_again"]
        assert not result["y_blocked"]["completed"] and result["rebuild"]["completed"], result

        (drop / "z.jsonl").chmod(0)  # unreadable: rejected into data/rejected/ as promised, one line, no traceback
        bad = subprocess.run([*as_user, PY, "-m", "pipeline.cli", "on-new-batch", str(drop / "z.jsonl")],
                             cwd=project, env=env, capture_output=True, text=True, timeout=400)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
        assert "z.jsonl rejected: cannot read the file (Permission denied)" in bad.stderr
        assert (project / "data/rejected/z.jsonl").exists() and not (drop / "z.jsonl").exists()
        assert "cannot read" in (project / "data/rejected/z.jsonl.reasons.json").read_text()
        assert record_of(project, "z.jsonl")["outcome"] == "rejected"
        assert_invariants(project, {"a.jsonl", "x.jsonl", "y.jsonl"})
        assert record_of(project, "x.jsonl", "accepted") and record_of(project, "y.jsonl", "accepted")
    finally:
        for path in (project / "data/incoming", drop / "z.jsonl"):
            if path.exists():
                path.chmod(0o755 if path.is_dir() else 0o644)  # let pytest clean up


def test_over_long_names_are_refused_up_front_and_empty_batches_rejected(tmp_path):
    project = arrival_project(tmp_path)
    drop = tmp_path / "drop"
    assert deliver(project, batch(drop, "a.jsonl")).is_completed()
    for length in (250, 230):
        long = batch(drop, "b" * (length - len(".jsonl")) + ".jsonl")
        state = deliver(project, long)
        assert state.is_failed() and f"file name is {length} bytes long, over 200: rename it" in state.message
        assert long.exists()  # left where it is
    refused = [r for r in run_records(project) if r["outcome"] == "refused"]
    assert len(refused) == 2 and all(len(Path(r["summary_path"]).name) < 255 for r in refused)
    link = drop / "link.jsonl"  # a symlink is refused in one line, as collect refuses one; left in place
    link.symlink_to(batch(tmp_path / "elsewhere", "target.jsonl"))
    state = deliver(project, link)
    assert state.is_failed() and "batch link.jsonl refused: it is a symbolic link (to " in state.message
    assert "\n" not in state.message and link.is_symlink()
    assert not (project / "data/incoming/target.jsonl").exists() and not (project / "data/incoming/link.jsonl").exists()
    empty = drop / "empty.jsonl"
    empty.write_text("")
    state = deliver(project, empty)
    assert state.is_failed() and "batch empty.jsonl rejected" in state.message  # the reason: its own log line
    assert (project / "data/rejected/empty.jsonl").exists()
    assert "no usable vote rows" in (project / "data/rejected/empty.jsonl.reasons.json").read_text()
    ok = deliver(project, batch(drop, "c.jsonl"))  # and later runs are unaffected
    assert ok.is_completed(), ok.message
    assert_invariants(project, {"a.jsonl", "c.jsonl"})


# --- 6: a failed rebuild's batch is completed by the next one ----------------------------------------------

def test_a_batch_whose_rebuild_failed_gets_its_one_record_from_the_next_rebuild(tmp_path):
    from pipeline import flows

    project = arrival_project(tmp_path)
    drop = tmp_path / "drop"
    (project / "fail-export").touch()
    state = deliver(project, batch(drop, "f.jsonl"))
    assert state.is_failed() and "export refused" in state.message
    assert record_of(project, "f.jsonl")["outcome"] == "failed"
    (project / "fail-export").unlink()
    (project / "data/incoming/hand.jsonl").write_text(vote_lines("hand"))  # copied in by hand, no delivery
    built = flows.rebuild(project=str(project))
    assert sorted(built["records_completed"]) == ["f.jsonl", "hand.jsonl"]
    record = record_of(project, "f.jsonl")
    assert record["outcome"] == "accepted" and "was failed" in record["reconciled"]
    assert "hand.jsonl" in record["promotion"]["batch_ids"]
    assert_invariants(project, {"f.jsonl", "hand.jsonl"})


# --- deliveries waiting together: one rebuild takes them all in --------------------------------------------

def rebuild_runs(project: Path) -> list:
    """The `rebuild` flow runs of `project` in this process's (ephemeral) Prefect database, newest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["rebuild"])),
                                     sort=FlowRunSort.START_TIME_DESC, limit=100)
    return [r for r in runs if r.parameters.get("project") == str(project)]


def test_deliveries_waiting_together_are_taken_in_by_one_rebuild_and_the_others_find_theirs_trained(tmp_path):
    """Three deliveries queue while another process holds the pipeline lock; the first to get it admits and
    trains all three, the two behind it find their batch already trained and start no rebuild.
    Mutation tried: dropping `_deliver`'s early return for an already accepted record makes the two
    waiting deliveries rebuild again (three rebuild flow runs) and fails this."""
    project = arrival_project(tmp_path)
    drop = tmp_path / "drop"
    names = ["a.jsonl", "b.jsonl", "c.jsonl"]
    paths = [batch(drop, name) for name in names]
    results = {}
    threads = [threading.Thread(target=lambda p=p: results.update({p.name: deliver(project, p)})) for p in paths]
    assert rebuild_runs(project) == []  # (and Prefect's ephemeral server is up before three flows need it at once)
    holder = LockHolder(project)
    try:
        for thread in threads:
            thread.start()
        wait_for("all three queued", lambda: all((project / ".rmpipe/queue" / n).exists() for n in names))
        holder.release()
        for thread in threads:
            thread.join(timeout=400)
    finally:
        holder.release()
    assert {n: s.is_completed() for n, s in results.items()} == {n: True for n in names}
    summaries = {n: s.result() for n, s in results.items()}
    assert {n: s["outcome"] for n, s in summaries.items()} == {n: "accepted" for n in names}
    assert {tuple(s["admitted_with"]) for s in summaries.values()} == {tuple(names)}  # one admission
    assert [r["batches"] for r in export_runs(project)] == [names]  # one real build
    assert len(rebuild_runs(project)) == 1  # the deliveries behind it started no rebuild of their own
    assert_invariants(project, set(names))


# --- 8: one watcher per folder -----------------------------------------------------------------------------------

def test_a_second_watcher_on_the_same_folder_is_refused(tmp_path):
    from pipeline.watch import _one_watcher, watch
    from rmpipe.core.errors import UserError

    with _one_watcher(tmp_path):
        with pytest.raises(UserError, match="another watcher .* is already watching"):
            watch(tmp_path, lambda p: None, interval_s=0.01, polls=1)
    watch(tmp_path, lambda p: None, interval_s=0.01, polls=1)  # free again once the first one stopped
