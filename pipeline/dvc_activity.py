"""Who else is running DVC in this project, and how to change a stage's input without racing them.

rmpipe's own `pipeline_lock` binds only rmpipe. A `dvc repro` started by hand takes
DVC's locks instead: the repo lock (`.dvc/tmp/lock`) while it plans and records, and
per-path read/write locks (`.dvc/tmp/rwlock`) on a stage's deps and outs from the
moment the stage starts until its hashes are saved (DVC releases the repo lock while
the stage's command runs). Between the two, a running `dvc repro` always holds one.

- `wait_until_idle`: the service starts its own `dvc repro` only when no other DVC run
  holds either lock, so a manual run and the service do not interleave stages.
- `inputs_guard`: admission moves batches into data/incoming under DVC's own rwlock
  guard, and only while no stage holds a lock on that folder, so a stage that reads it
  either saw the batches from its start or not at all.

Both waits end (`RMPIPE_LOCK_TIMEOUT_S`, as rmpipe's own locks) with one line naming the holder:
PID, command line, and how to clear it. An rwlock entry whose PID now belongs to a process that
started after the entry was written (a reused PID) is no holder: it is ignored and removed. The repo
lock is probed as DVC takes it: flock, or with `core.hardlink_lock` a hard-linked file. Paths are
compared resolved on both sides (DVC records them unresolved: a symlinked project root).

`inputs_guard` uses DVC's private `dvc.rwlock._edit_rwlock` (the guard DVC itself takes around its
rwlock file): tests/test_dvc_activity.py pins the DVC version it was written against.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterator

import psutil

from pipeline.locks import PIPELINE_TIMEOUT_S, TIMEOUT_ENV, LockTimeout, lock_timeout
from rmpipe.core import holders

log = logging.getLogger("rmpipe.flows")

WRITTEN_FOR_DVC = "3.67.1"  # the DVC whose rwlock format and private guard this module reads


def _tmp_dir(root: Path) -> Path:
    return root / ".dvc" / "tmp"


def _config_says_hardlink(root: Path) -> bool:
    """`core.hardlink_lock` from the project's DVC config (DVC then locks with hard links, not flock)."""
    from configobj import ConfigObj

    value = False
    for name in ("config", "config.local"):
        path = root / ".dvc" / name
        if path.exists():
            value = ConfigObj(str(path)).get("core", {}).get("hardlink_lock", value)
    return str(value).lower() in ("true", "1", "yes")


def _describe(pid: int | None, recorded_cmd: str | None, what: str, clear: str) -> str:
    """'PID n (command) holds WHAT: let it finish, or stop it (kill n); CLEAR' on one line."""
    if pid is None:
        return f"{what} is held by a process that recorded no PID ({clear})"
    cmd = holders.command_line(pid) or holders.one_line(recorded_cmd or "command unknown")
    return f"PID {pid} ({cmd}) holds {what}: let it finish, or stop it (kill {pid}); {clear}"


# --- the repo lock ------------------------------------------------------------------------------
def _dvc_processes_here(root: Path) -> list[str]:
    """'PID n (cmd)' of processes running DVC with their working folder in `root` (hard-link locks name no PID)."""
    here, found = root.resolve(), []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        cmd, cwd = proc.info.get("cmdline") or [], proc.info.get("cwd")
        if proc.pid == os.getpid() or not cwd or not any("dvc" in Path(part).name for part in cmd[:3]):
            continue
        if Path(cwd).resolve() == here or here in Path(cwd).resolve().parents:
            found.append(f"PID {proc.pid} ({holders.one_line(' '.join(cmd))})")
    return found


def repo_lock_holder(root: Path) -> str | None:
    """One line naming who holds DVC's repo lock (.dvc/tmp/lock), or None when it is free."""
    path = _tmp_dir(root) / "lock"
    if _config_says_hardlink(root):  # flufl.lock: held while the lock file is a second link to a claim file
        try:
            if path.stat().st_nlink < 2:
                return None
        except FileNotFoundError:
            return None
        running = _dvc_processes_here(root)
        who = f"running here: {', '.join(running)}" if running else "no DVC process runs here, so it is stale"
        return (f"DVC's repo lock {path} (core.hardlink_lock, which records no PID) is held; {who}: "
                f"let it finish, or, when no DVC command runs, delete {path}")
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        return None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: a probe, never blocks DVC for long
        except BlockingIOError:
            text = fh.read(64).decode(errors="replace").strip()  # zc.lockfile writes " <pid>"
            pid = int(text) if text.isdigit() else None
            return _describe(pid, None, f"DVC's repo lock {path}", "the OS frees it when its holder ends")
        fcntl.flock(fh, fcntl.LOCK_UN)
        return None


# --- per-path read/write locks -------------------------------------------------------------------
def _rwlock_file(root: Path) -> Path:
    return _tmp_dir(root) / "rwlock"


def _overlaps(a: str | Path, b: Path) -> bool:
    a, b = Path(os.path.realpath(a)), Path(os.path.realpath(b))
    return a == b or b in a.parents or a in b.parents


def _entries(lock: dict) -> Iterator[tuple[str, str, dict]]:
    for mode in ("read", "write"):
        for path, infos in (lock.get(mode) or {}).items():
            for info in infos if isinstance(infos, list) else [infos]:
                yield mode, path, info


def sort_path_locks(root: Path, lock: dict, under: Path | None = None) -> tuple[list[str], list[tuple]]:
    """(one line per live holder of a lock overlapping `under`, [(mode, path, info)] of stale entries).

    An entry is stale when its PID is gone, or now runs a process that started after the rwlock file was
    last written (the entry was written at or before that time) or runs another command than the entry
    records: a reused PID."""
    try:
        written = _rwlock_file(root).stat().st_mtime
    except FileNotFoundError:
        written = time.time()
    live, stale = [], []
    for mode, path, info in _entries(lock):
        pid = int(info.get("pid", 0))
        if pid == os.getpid():
            continue
        if not holders.is_holder(pid, written) or holders.runs_other_command(pid, str(info.get("cmd", ""))):
            stale.append((mode, path, info))
        elif under is None or _overlaps(path, under):
            live.append(_describe(pid, info.get("cmd"), f"DVC's {mode} lock on {path} ({_rwlock_file(root)})",
                                  "DVC frees it when the stage ends"))
    return live, stale


def _drop(lock: dict, stale: list[tuple]) -> None:
    """Remove stale entries from an rwlock dict being edited under DVC's guard (as DVC does for dead PIDs)."""
    for mode, path, info in stale:
        if mode == "read" and info in (lock["read"].get(path) or []):
            lock["read"][path].remove(info)
            if not lock["read"][path]:
                del lock["read"][path]
        elif mode == "write" and lock["write"].get(path) == info:
            del lock["write"][path]
        log.info("removed a stale DVC %s lock on %s (PID %s: %s): that process is gone or its PID was reused",
                 mode, path, info.get("pid"), holders.one_line(info.get("cmd", "?")))


def live_path_locks(root: Path, under: Path | None = None) -> list[str]:
    """One line per live holder of a DVC path lock in `root` (overlapping `under` when given)."""
    try:
        lock = json.loads(_rwlock_file(root).read_text(encoding="utf-8") or "{}")
    except (FileNotFoundError, ValueError):
        return []
    return sort_path_locks(root, lock, under)[0]


def other_dvc_activity(root: Path) -> str | None:
    """A line saying which DVC run is active in `root` and who runs it, or None when none is."""
    return repo_lock_holder(root) or next(iter(live_path_locks(root)), None)


# --- the waits ------------------------------------------------------------------------------------
def _deadline(timeout_s: float | None) -> tuple[float, float]:
    wait = lock_timeout(PIPELINE_TIMEOUT_S) if timeout_s is None else timeout_s
    return wait, time.monotonic() + wait


def _ran_out(wait: float, doing: str, busy: str) -> LockTimeout:
    return LockTimeout(f"waited {wait:g} s {doing}: {busy}. Wait longer with {TIMEOUT_ENV}=SECONDS")


def wait_until_idle(root: Path, poll_s: float = 1.0, settle_polls: int = 2, timeout_s: float | None = None) -> None:
    """Block while another DVC run is active here, at most `timeout_s` (default RMPIPE_LOCK_TIMEOUT_S or 3 h);
    idle must hold for `settle_polls` polls in a row (a probe can fall between a repro's two locks)."""
    wait, deadline = _deadline(timeout_s)
    quiet, announced = 0, False
    while quiet < settle_polls:
        busy = other_dvc_activity(root)
        if busy:
            quiet = 0
            if time.monotonic() >= deadline:
                raise _ran_out(wait, f"for another DVC run in {root} to finish", busy)
            if not announced:
                log.info("waiting for another DVC run in %s to finish (up to %g s): %s", root, wait, busy)
                announced = True
        else:
            quiet += 1
        if quiet < settle_polls:
            time.sleep(poll_s)


@contextlib.contextmanager
def inputs_guard(root: Path, folder: Path, poll_s: float = 0.5, timeout_s: float | None = None) -> Iterator[None]:
    """Hold DVC's rwlock guard with no live DVC lock on `folder`; the body may then change `folder`.

    A DVC stage registers its read lock on its deps under this same guard, so it either
    registered before (we wait for it to finish and save its hashes) or registers after
    the body (and reads the folder as the body left it). Keep the body short: DVC
    waits for the guard for at most ~3 s before giving up. Stale entries (dead or reused
    PIDs) are removed on the way; a live holder is waited for at most `timeout_s`.
    """
    # DVC's own guard around its rwlock file (private: see WRITTEN_FOR_DVC)
    from dvc.fs import localfs
    from dvc.rwlock import _edit_rwlock

    tmp = _tmp_dir(root)
    wait, deadline = _deadline(timeout_s)
    announced = False
    while True:
        tmp.mkdir(parents=True, exist_ok=True)
        with _edit_rwlock(str(tmp), localfs, _config_says_hardlink(root)) as lock:
            blockers, stale = sort_path_locks(root, lock, folder)
            _drop(lock, stale)
            if not blockers:
                yield
                return
        if time.monotonic() >= deadline:
            raise _ran_out(wait, f"to change {folder}", blockers[0])
        if not announced:
            log.info("waiting to change %s (up to %g s): %s", folder, wait, blockers[0])
            announced = True
        time.sleep(poll_s)
