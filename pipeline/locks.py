"""One rebuild at a time per project: a blocking, re-entrant (per thread) file lock.

    with pipeline_lock(root): ...   # a rebuild, a stage flow, a retraction
    with queue_lock(root): ...      # moments: the duplicate check + queueing, admitting the queue

The locks live in `.rmpipe/` (rmpipe's own, git-ignored state), not in .dvc/tmp, which people clear.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import threading
from pathlib import Path
from typing import Iterator

STATE_DIR = Path(".rmpipe")  # rmpipe's own state (git-ignored); not .dvc/tmp, which people clear
LOCK_FILE = STATE_DIR / "pipeline.lock"
QUEUE_LOCK_FILE = STATE_DIR / "queue.lock"  # held for moments: duplicate check + queue/admit

_held: dict[tuple[Path, int], int] = {}
_held_guard = threading.Lock()


@contextlib.contextmanager
def pipeline_lock(root: Path, lock_file: Path = LOCK_FILE) -> Iterator[None]:
    """Exclusive, blocking, re-entrant (per thread) lock on the project's pipeline.

    Waiting callers queue on the OS lock, so a second rebuild runs after the first
    instead of being dropped or colliding on DVC's own lock. Re-entrance is per thread
    (on_new_batch -> rebuild); other threads of the process wait like other processes
    (flock conflicts between separate opens of the file, even within one process).
    """
    path = ((root / lock_file).resolve(), threading.get_ident())
    with _held_guard:
        if path in _held:
            _held[path] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _held_guard:
                _held[path] -= 1
        return
    path[0].parent.mkdir(parents=True, exist_ok=True)
    with path[0].open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logging.getLogger("rmpipe.flows").info("another rebuild is running in %s; waiting for it", root)
            fcntl.flock(fh, fcntl.LOCK_EX)
        with _held_guard:
            _held[path] = 1
        try:
            yield
        finally:
            with _held_guard:
                del _held[path]
            fcntl.flock(fh, fcntl.LOCK_UN)


def queue_lock(root: Path):
    """Short lock around the duplicate check + queueing, and around admitting the queue."""
    return pipeline_lock(root, QUEUE_LOCK_FILE)
