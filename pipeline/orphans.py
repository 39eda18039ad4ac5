"""Nothing outlives a killed rmpipe process, and nothing it left RUNNING stays RUNNING.

- `tie_descendants_to_this_process()`: starts one small guardian process per rmpipe
  process. The guardian reads a pipe whose other end only we hold; when we exit, even
  by `kill -9`, the kernel closes it and the guardian kills what we had started (Prefect's
  temporary server, `dvc repro`, the stage it runs, DeepSpeed ranks) and exits. It keeps a
  snapshot of our descendants every half second, because once we are gone they are
  re-parented and no longer findable as ours.
- `flow_run_started()` / `crash_stale_runs()`: each flow run leaves a marker with its pid
  under `.rmpipe/runs/`; the next flow run marks the flow runs of dead processes Crashed
  in Prefect (they would show RUNNING forever) and removes their markers.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import psutil

log = logging.getLogger("rmpipe.flows")

RUNS_DIR = Path(".rmpipe/runs")  # one marker per flow run in progress: {pid, started}

_guardian: subprocess.Popen | None = None
_guardian_lock = threading.Lock()

_GUARDIAN = r"""
import os, select, sys, time
import psutil

parent = psutil.Process(int(sys.argv[1]))
me = os.getpid()
known = {}  # pid -> create_time: our parent's descendants as last seen

def snapshot():
    try:
        for p in parent.children(recursive=True):
            if p.pid != me:
                known.setdefault(p.pid, p.create_time())
    except psutil.Error:
        pass

while True:
    snapshot()
    ready, _, _ = select.select([sys.stdin], [], [], 0.5)
    if ready and not os.read(sys.stdin.fileno(), 1024):  # EOF: the parent is gone
        break

victims = []
for pid, created in known.items():
    try:
        p = psutil.Process(pid)
        if p.create_time() == created:  # the same process, not a reused pid
            victims += [p, *p.children(recursive=True)]
    except psutil.Error:
        pass
for p in victims:
    try:
        p.terminate()
    except psutil.Error:
        pass
_, alive = psutil.wait_procs(victims, timeout=5)
for p in alive:
    try:
        p.kill()
    except psutil.Error:
        pass
"""


def tie_descendants_to_this_process() -> None:
    """Start this process's guardian once (idempotent, any thread)."""
    global _guardian
    with _guardian_lock:
        if _guardian is not None and _guardian.poll() is None:
            return
        read_end, write_end = os.pipe()  # both ends non-inheritable: no other child keeps the pipe open
        try:
            _guardian = subprocess.Popen([sys.executable, "-c", _GUARDIAN, str(os.getpid())], stdin=read_end,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
                                         start_new_session=True)  # Ctrl-C to our group does not kill it
        finally:
            os.close(read_end)
        _guardian_write_end.append(write_end)  # held open for our whole life; closed by the kernel at exit


_guardian_write_end: list[int] = []


# --- flow runs left RUNNING by a dead process -----------------------------------------------------

def _marker(root: Path, run_id: str) -> Path:
    return root / RUNS_DIR / f"{run_id}.json"


def flow_run_started(root: Path, run_id: str | None) -> None:
    if not run_id:
        return
    from rmpipe.core import io

    me = psutil.Process()
    io.write_json(_marker(root, run_id), {"pid": me.pid, "create_time": me.create_time()})


def flow_run_finished(root: Path, run_id: str | None) -> None:
    if run_id:
        _marker(root, run_id).unlink(missing_ok=True)


def _alive(info: dict) -> bool:
    try:
        return psutil.Process(int(info["pid"])).create_time() == info["create_time"]
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def crash_stale_runs(root: Path) -> list[str]:
    """Mark Crashed every flow run whose process died without finishing it; returns their ids."""
    folder = root / RUNS_DIR
    if not folder.is_dir():
        return []
    stale = []
    for marker in sorted(folder.glob("*.json")):
        try:
            info = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            info = {}
        if not _alive(info):
            stale.append(marker)
    if not stale:
        return []
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    done = []
    with get_client(sync_client=True) as client:
        for marker in stale:
            run_id = marker.stem
            try:
                run = client.read_flow_run(run_id)
                if run.state is not None and not run.state.is_final():
                    client.set_flow_run_state(run_id, Crashed(message="its process died (killed?) before the run "
                                                                      "finished; marked by the next rmpipe run"),
                                              force=True)
                    log.warning("flow run %s (%s) was left %s by a dead process: marked Crashed", run.name, run_id,
                                run.state.type.value)
                    done.append(run_id)
            except Exception as exc:  # noqa: BLE001 - e.g. a run of another server: forget the marker
                log.info("could not mark flow run %s crashed (%s)", run_id, exc)
            marker.unlink(missing_ok=True)
    return done


def stop_process_group(proc: subprocess.Popen, grace_s: float = 20) -> None:
    """Stop a server started in its own process group (`start_new_session=True`) with everything it started:
    SIGTERM to the group, SIGKILL after `grace_s`."""
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
