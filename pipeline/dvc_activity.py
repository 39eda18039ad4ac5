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

log = logging.getLogger("rmpipe.flows")


def _tmp_dir(root: Path) -> Path:
    return root / ".dvc" / "tmp"


def repo_lock_holder(root: Path) -> bool:
    """True when a DVC process holds the repo lock (zc.lockfile: an exclusive flock on .dvc/tmp/lock)."""
    path = _tmp_dir(root) / "lock"
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        return False
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: a probe, never blocks DVC for long
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


def _rwlock_entries(root: Path) -> dict:
    try:
        return json.loads((_tmp_dir(root) / "rwlock").read_text(encoding="utf-8") or "{}")
    except (FileNotFoundError, ValueError):
        return {}


def live_path_locks(root: Path, under: Path | None = None) -> list[str]:
    """'<path> (PID n: cmd)' for every rwlock entry of a live process (other than this one),
    limited to paths overlapping `under` when given."""
    lock = _rwlock_entries(root)
    found = []
    for mode in ("read", "write"):
        for path, infos in (lock.get(mode) or {}).items():
            if under is not None:
                a, b = Path(path), Path(under).resolve()
                if not (a == b or b in a.parents or a in b.parents):
                    continue
            for info in infos if isinstance(infos, list) else [infos]:
                pid = int(info.get("pid", 0))
                if pid != os.getpid() and psutil.pid_exists(pid):
                    found.append(f"{path} (PID {pid}: {info.get('cmd', '?')[:120]})")
    return found


def other_dvc_activity(root: Path) -> str | None:
    """A line saying which DVC run is active in `root`, or None when none is."""
    if repo_lock_holder(root):
        return "a DVC command holds the repo lock"
    if locks := live_path_locks(root):
        return f"a DVC stage is running ({locks[0]})"
    return None


def wait_until_idle(root: Path, poll_s: float = 1.0, settle_polls: int = 2) -> None:
    """Block while another DVC run is active here; idle must hold for `settle_polls` polls in a row
    (a repro between two stages holds the repo lock, but a probe can fall between two locks)."""
    quiet, announced = 0, False
    while quiet < settle_polls:
        busy = other_dvc_activity(root)
        if busy:
            quiet = 0
            if not announced:
                log.info("waiting for another DVC run in %s to finish: %s", root, busy)
                announced = True
        else:
            quiet += 1
        if quiet < settle_polls:
            time.sleep(poll_s)


def _config_says_hardlink(root: Path) -> bool:
    """`core.hardlink_lock` from the project's DVC config (DVC then locks with hard links, not flock)."""
    from configobj import ConfigObj

    value = False
    for name in ("config", "config.local"):
        path = root / ".dvc" / name
        if path.exists():
            value = ConfigObj(str(path)).get("core", {}).get("hardlink_lock", value)
    return str(value).lower() in ("true", "1", "yes")


@contextlib.contextmanager
def inputs_guard(root: Path, folder: Path, poll_s: float = 0.5) -> Iterator[None]:
    """Hold DVC's rwlock guard with no live DVC lock on `folder`; the body may then change `folder`.

    A DVC stage registers its read lock on its deps under this same guard, so it either
    registered before (we wait for it to finish and save its hashes) or registers after
    the body (and reads the folder as the body left it). Keep the body short: DVC
    waits for the guard for at most ~3 s before giving up.
    """
    from dvc.fs import localfs
    from dvc.rwlock import _edit_rwlock  # DVC's own guard around its rwlock file

    tmp = _tmp_dir(root)
    announced = False
    while True:
        tmp.mkdir(parents=True, exist_ok=True)
        with _edit_rwlock(str(tmp), localfs, _config_says_hardlink(root)):
            blockers = live_path_locks(root, folder)
            if not blockers:
                yield
                return
        if not announced:
            log.info("waiting to change %s: a DVC stage is using it (%s)", folder, blockers[0])
            announced = True
        time.sleep(poll_s)
