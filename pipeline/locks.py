"""One rebuild at a time per project: re-entrant (per thread) file locks (`filelock`) that never wait forever.

    with pipeline_lock(root): ...   # a rebuild, a stage flow, a retraction
    with queue_lock(root): ...      # moments: the duplicate check + queueing, admitting the queue

The locks live in `.rmpipe/` (rmpipe's own, git-ignored state), not in .dvc/tmp, which people clear.
Whoever holds one leaves a note beside it (`<lock>.holder.json`: PID, command line, since when), so a
wait that runs out (`RMPIPE_LOCK_TIMEOUT_S`, default 3 hours for the pipeline, 2 minutes for the queue)
ends in one line naming the holder and how to clear it. The OS releases a lock when its holder dies.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import filelock

from rmpipe.core import holders
from rmpipe.core.errors import UserError

STATE_DIR = Path(".rmpipe")  # rmpipe's own state (git-ignored); not .dvc/tmp, which people clear
LOCK_FILE = STATE_DIR / "pipeline.lock"
QUEUE_LOCK_FILE = STATE_DIR / "queue.lock"  # held for moments: duplicate check + queue/admit
TIMEOUT_ENV = "RMPIPE_LOCK_TIMEOUT_S"
PIPELINE_TIMEOUT_S = 3 * 3600.0  # a rebuild waits for the one before it, however long training takes, but not forever
QUEUE_TIMEOUT_S = 120.0

_held: dict[tuple[Path, int], int] = {}
_held_guard = threading.Lock()


class LockTimeout(UserError):
    """A lock stayed held longer than the wait allowed."""


def lock_timeout(default: float) -> float:
    """Seconds a wait may last: RMPIPE_LOCK_TIMEOUT_S, else `default`."""
    try:
        return float(os.environ.get(TIMEOUT_ENV) or default)
    except ValueError:
        raise UserError(f"{TIMEOUT_ENV}={os.environ[TIMEOUT_ENV]!r} is not a number of seconds") from None


def _holder_file(lock: Path) -> Path:
    return lock.with_name(lock.name + ".holder.json")


def _write_holder(lock: Path) -> None:
    note = {"pid": os.getpid(), "command": " ".join(sys.argv) or sys.executable,
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    _holder_file(lock).write_text(json.dumps(note), encoding="utf-8")


def holder(lock: Path) -> str:
    """Who holds `lock`, in words, from the note its holder left (and /proc, where the note is stale)."""
    try:
        note = json.loads(_holder_file(lock).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "an unknown process (it left no note)"
    pid, command = note.get("pid"), note.get("command")
    try:
        since = datetime.fromisoformat(str(note.get("since"))).timestamp()
    except ValueError:
        since = None
    # a PID that runs a process born after the note was written is another process: the note is stale
    alive = isinstance(pid, int) and holders.is_holder(pid, since)
    if alive:
        command = holders.command_line(pid) or command
    state = "" if alive else ", which no longer runs"
    return f"PID {pid} ({holders.one_line(command or 'command unknown')}, since {note.get('since')}{state})"


@contextlib.contextmanager
def pipeline_lock(root: Path, lock_file: Path = LOCK_FILE, timeout_s: float | None = None) -> Iterator[None]:
    """Exclusive, re-entrant (per thread) lock on the project's pipeline; waits at most `timeout_s`.

    Waiting callers queue on the OS lock, so a second rebuild runs after the first instead of being
    dropped or colliding on DVC's own lock. Re-entrance is per thread (on_new_batch -> rebuild); other
    threads of the process wait like other processes (each acquisition opens the file anew).
    """
    path = ((root / lock_file).resolve(), threading.get_ident())
    with _held_guard:
        reentered = path in _held
        if reentered:
            _held[path] += 1
    if reentered:
        try:
            yield
        finally:
            with _held_guard:
                _held[path] -= 1
        return
    lock_path = path[0]
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    wait = lock_timeout(PIPELINE_TIMEOUT_S if lock_file == LOCK_FILE else QUEUE_TIMEOUT_S) if timeout_s is None else timeout_s
    lock = filelock.FileLock(str(lock_path), thread_local=False)
    try:
        lock.acquire(blocking=False)
    except filelock.Timeout:
        logging.getLogger("rmpipe.flows").info("%s is held by %s; waiting for it (up to %.0f s)", lock_path.name,
                                               holder(lock_path), wait)
        try:
            lock.acquire(timeout=wait)
        except filelock.Timeout:
            raise LockTimeout(
                f"waited {wait:g} s for {lock_path}, held by {holder(lock_path)}: let it finish, or stop it "
                f"(kill PID); the OS frees the lock when its holder ends. Wait longer with {TIMEOUT_ENV}=SECONDS"
            ) from None
    with _held_guard:
        _held[path] = 1
    try:
        _write_holder(lock_path)
        yield
    finally:
        with _held_guard:
            del _held[path]
        lock.release()


def queue_lock(root: Path):
    """Short lock around the duplicate check + queueing, and around admitting the queue."""
    return pipeline_lock(root, QUEUE_LOCK_FILE)
