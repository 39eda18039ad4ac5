"""pipeline/dvc_activity.py: every wait on DVC's locks ends, naming the holder; reused PIDs are no holders.

Real DVC locks, taken by DVC's own code in other processes (`dvc.lock.make_lock`, `dvc.rwlock.rwlock`),
in real `dvc init` projects: flock and `core.hardlink_lock`, a symlinked project root, and a lock entry
whose PID now belongs to a process born after the entry was written.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import time
from datetime import UTC
from pathlib import Path

import dvc
import pytest

from pipeline import dvc_activity
from pipeline.locks import LockTimeout

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

HOLD_REPO_LOCK = """
import sys
from dvc.lock import make_lock
lock = make_lock(sys.argv[1] + "/.dvc/tmp/lock", tmp_dir=sys.argv[1] + "/.dvc/tmp", hardlink_lock=sys.argv[2] == "1")
lock.lock()
print("held", flush=True)
sys.stdin.readline()
lock.unlock()
"""

HOLD_PATH_LOCK = """
import sys
from dvc.fs import localfs
from dvc.rwlock import rwlock
root = sys.argv[1]
with rwlock(root + "/.dvc/tmp", localfs, " ".join(sys.argv), [root + "/data/incoming"], [], False):
    print("held", flush=True)
    sys.stdin.readline()
"""


def _project(path: Path, hardlink: bool = False) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run([PY, "-m", "dvc", "init", "--no-scm", "-q"], cwd=path, check=True)
    if hardlink:
        subprocess.run([PY, "-m", "dvc", "config", "core.hardlink_lock", "true"], cwd=path, check=True)
    (path / "data" / "incoming").mkdir(parents=True)
    (path / ".dvc" / "tmp").mkdir(exist_ok=True)
    return path


def _hold(script: str, *args: str) -> subprocess.Popen:
    """A process holding a DVC lock (its command line, short and recognisable, is what the message must name)."""
    file = Path(args[0]).parent / "hold_lock.py"
    file.write_text(script, encoding="utf-8")
    proc = subprocess.Popen([PY, str(file), *args, "--holder-marker"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def _release(proc: subprocess.Popen) -> None:
    proc.communicate("\n", timeout=60)


@pytest.mark.parametrize("hardlink", [False, True], ids=["flock", "hardlink_lock"])
def test_wait_until_idle_ends_naming_the_repo_lock_holder(tmp_path, hardlink):
    root = _project(tmp_path / "p", hardlink)
    holder = _hold(HOLD_REPO_LOCK, str(root), "1" if hardlink else "0")
    try:
        with pytest.raises(LockTimeout) as caught:
            dvc_activity.wait_until_idle(root, poll_s=0.1, timeout_s=0.5)
        message = str(caught.value)
        assert "\n" not in message and "waited 0.5 s" in message and "RMPIPE_LOCK_TIMEOUT_S" in message
        assert str(root / ".dvc" / "tmp" / "lock") in message
        if hardlink:  # flufl's claim file names no PID: say so, and how to clear a stale one
            assert "core.hardlink_lock" in message and "delete" in message
        else:
            assert f"PID {holder.pid} (" in message and "--holder-marker" in message and f"kill {holder.pid}" in message
    finally:
        _release(holder)
    dvc_activity.wait_until_idle(root, poll_s=0.05, timeout_s=5)  # released: no wait


def test_inputs_guard_waits_for_a_stage_lock_through_a_symlinked_root_and_ends(tmp_path):
    real = _project(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real)
    holder = _hold(HOLD_PATH_LOCK, str(link))  # DVC records the path as it was given: through the link
    try:
        with pytest.raises(LockTimeout) as caught:
            with dvc_activity.inputs_guard(real.resolve(), real.resolve() / "data" / "incoming", poll_s=0.1,
                                           timeout_s=0.5):
                pytest.fail("the guard let a change through while a stage held data/incoming")
        message = str(caught.value)
        assert "\n" not in message and f"PID {holder.pid} (" in message and "--holder-marker" in message
        assert "read lock on" in message and f"kill {holder.pid}" in message
        with pytest.raises(LockTimeout):  # and the other way round: the guard given the link, DVC the real path
            with dvc_activity.inputs_guard(link, link / "data" / "incoming", poll_s=0.1, timeout_s=0.3):
                pass
    finally:
        _release(holder)
    with dvc_activity.inputs_guard(real, real / "data" / "incoming", timeout_s=5):
        pass


def _stale_entry(root: Path, pid: int, mode: str = "read") -> None:
    """An rwlock entry written a minute ago for `pid` (a process that starts after it: a reused PID)."""
    path = str(root / "data" / "incoming")
    info = {"pid": pid, "cmd": "/venv/bin/dvc repro"}
    lock = {"read": {path: [info]}} if mode == "read" else {"write": {path: info}}
    rwlock = root / ".dvc" / "tmp" / "rwlock"
    rwlock.write_text(json.dumps(lock), encoding="utf-8")
    past = time.time() - 60
    os.utime(rwlock, (past, past))


@pytest.mark.parametrize(("mode", "hardlink"), [("read", False), ("write", False), ("read", True)],
                         ids=["read", "write", "read-hardlink_lock"])
def test_a_lock_entry_whose_pid_was_reused_is_no_holder_and_is_removed(tmp_path, mode, hardlink):
    root = _project(tmp_path / "p", hardlink)  # with core.hardlink_lock DVC's guard is a flufl hard-link lock
    reused = subprocess.Popen(["sleep", "60"])  # alive, but born after the entry was written
    try:
        _stale_entry(root, reused.pid, mode)
        assert dvc_activity.live_path_locks(root) == []
        assert dvc_activity.other_dvc_activity(root) is None
        dvc_activity.wait_until_idle(root, poll_s=0.05, timeout_s=5)
        with dvc_activity.inputs_guard(root, root / "data" / "incoming", timeout_s=5):
            pass
        left = json.loads((root / ".dvc" / "tmp" / "rwlock").read_text(encoding="utf-8"))
        assert not left.get("read") and not left.get("write")  # DVC's own check would have kept it
    finally:
        reused.kill()
        reused.wait()


def test_a_live_entry_of_the_same_age_still_blocks(tmp_path):
    """The control: the same entry for a process that started before it was written is a holder."""
    root = _project(tmp_path / "p")
    holder = subprocess.Popen(["sleep", "60"])
    try:
        time.sleep(1.2)
        rwlock = root / ".dvc" / "tmp" / "rwlock"
        path = str(root / "data" / "incoming")
        rwlock.write_text(json.dumps({"read": {path: [{"pid": holder.pid, "cmd": "sleep 60"}]}}), encoding="utf-8")
        busy = dvc_activity.other_dvc_activity(root)
        assert busy and f"PID {holder.pid} (sleep 60)" in busy
        with pytest.raises(LockTimeout, match=f"PID {holder.pid}"):
            dvc_activity.wait_until_idle(root, poll_s=0.05, timeout_s=0.3)
    finally:
        holder.kill()
        holder.wait()


def test_the_private_dvc_api_is_pinned_to_the_version_it_was_written_against():
    """inputs_guard reads dvc.rwlock._edit_rwlock and the rwlock file's format: DVC may change either in any
    release. On another DVC version this fails: re-read dvc/rwlock.py, then update WRITTEN_FOR_DVC."""
    from dvc import rwlock

    assert dvc.__version__ == dvc_activity.WRITTEN_FOR_DVC, (
        f"DVC {dvc.__version__} is installed, but pipeline/dvc_activity.py was written against DVC "
        f"{dvc_activity.WRITTEN_FOR_DVC}'s private dvc.rwlock._edit_rwlock and rwlock format: check them, then "
        "update WRITTEN_FOR_DVC")
    assert list(inspect.signature(rwlock._edit_rwlock).parameters) == ["lock_dir", "fs", "hardlink"]
    assert rwlock.RWLOCK_FILE == "rwlock" and set(rwlock.INFO_SCHEMA) == {"pid", "cmd"}


# --- a stage started by another DVC run while an rmpipe rebuild runs its own ---------------------------------

def _run_stage(cwd: Path, *wrapper: str) -> subprocess.CompletedProcess:
    return subprocess.run([*wrapper, PY, "-m", "stages.split"], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def _marker(cwd: Path, pid: int, since: float) -> None:
    from datetime import datetime

    from rmpipe.core.stage import REBUILD_MARKER

    (cwd / REBUILD_MARKER).parent.mkdir(parents=True, exist_ok=True)
    (cwd / REBUILD_MARKER).write_text(json.dumps({"pid": pid, "command": "dvc repro", "since": datetime.fromtimestamp(
        since, UTC).isoformat(timespec="seconds")}))


def test_a_stage_of_another_dvc_run_stops_untouched_while_a_rebuild_runs(tmp_path):
    """The stage refuses in one line before reading params or writing any output (the rebuild's DVC is alive);
    a note left by a killed rebuild (its PID reused) and the rebuild's own stages are let through."""
    rebuild = subprocess.Popen(["sleep", "60"])  # stands for the rebuild's `dvc repro`
    try:
        time.sleep(1.5)
        _marker(tmp_path, rebuild.pid, time.time())
        proc = _run_stage(tmp_path)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"an rmpipe rebuild is running DVC in this project (PID {rebuild.pid} (sleep 60" \
            in errors[0] and "stage split stops before reading or writing anything" in errors[0], proc.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == [".rmpipe"]  # nothing written

        _marker(tmp_path, rebuild.pid, time.time() - 120)  # written before that process started: a reused PID
        proc = _run_stage(tmp_path)
        assert "rmpipe rebuild is running" not in proc.stderr and "params.yaml not found" in proc.stderr, proc.stderr
    finally:
        rebuild.kill()
        rebuild.wait()
    # the rebuild's own stage: the marked process is its ancestor (here: the shell that runs it)
    script = "import json,os,subprocess,sys,time; time.sleep(1.5); from datetime import datetime,timezone; " \
             "open('.rmpipe/rebuild-dvc.json','w').write(json.dumps({'pid': os.getpid(), 'command': 'dvc repro', " \
             "'since': datetime.now(timezone.utc).isoformat(timespec='seconds')})); " \
             "sys.exit(subprocess.run([sys.executable, '-m', 'stages.split']).returncode)"
    proc = subprocess.run([PY, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "rmpipe rebuild is running" not in proc.stderr and "params.yaml not found" in proc.stderr, proc.stderr
