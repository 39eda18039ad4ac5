"""Watch a delivery folder and announce each new *complete* batch file, once.

Polling (stdlib only): a file is complete when its size and mtime are unchanged
across two polls, so a file still being written (or copied) never fires. Writers
that rename into place (`x.jsonl.part` -> `x.jsonl`) fire one poll after the
rename. Dotfiles and `.part`/`.tmp`-style names are never batches. Every fired
file is remembered in a state file (bounded), so a restarted watcher does not
announce it again; a changed file (new size or mtime) is announced anew and the
flow decides whether it is a duplicate.

Delivery is at least once: a file is recorded as fired only after `announce` returned
(the server took the event); a watcher killed in between announces it again. One
watcher per folder: it holds `<folder>/.rmpipe-watch.lock`, and a second one is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable

from rmpipe.core import io
from rmpipe.core.schema import BATCH_FORMATS

log = logging.getLogger("rmpipe.watch")

BATCH_SUFFIXES = tuple(BATCH_FORMATS)  # what the collect stage reads
IN_PROGRESS_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload", ".swp", ".lock")
STATE_NAME = ".rmpipe-watch.json"
LOCK_NAME = ".rmpipe-watch.lock"  # one watcher per folder holds it
MAX_REMEMBERED = 10_000

Signature = tuple[int, int]  # (size, mtime_ns)


def is_batch_name(name: str) -> bool:
    lower = name.lower()
    return not name.startswith(".") and not lower.endswith(IN_PROGRESS_SUFFIXES) and lower.endswith(BATCH_SUFFIXES)


def _key(name: str, sig: Signature) -> str:
    return f"{name}|{sig[0]}|{sig[1]}"


class BatchWatcher:
    """Remembers what it saw last poll and what it already fired; `poll()` returns newly complete files."""

    def __init__(self, folder: str | Path, state_file: str | Path | None = None,
                 max_remembered: int = MAX_REMEMBERED):
        self.folder = Path(folder)
        self.state_file = Path(state_file) if state_file else self.folder / STATE_NAME
        self.max_remembered = max_remembered
        self.fired: OrderedDict[str, float] = self._load()
        self.last_seen: dict[str, Signature] = {}
        self._ignored: set[str] = set()

    def _load(self) -> OrderedDict[str, float]:
        if not self.state_file.exists():
            return OrderedDict()
        try:
            data = json.loads(self.state_file.read_text(encoding="utf-8"))
            return OrderedDict((str(k), float(v)) for k, v in data.get("fired", {}).items())
        except (ValueError, AttributeError, TypeError):
            log.warning("watch state %s is unreadable; starting with an empty memory", self.state_file)
            return OrderedDict()

    def _save(self) -> None:
        io.write_json(self.state_file, {"folder": str(self.folder.resolve()), "fired": self.fired})

    def _scan(self) -> dict[str, Signature]:
        found: dict[str, Signature] = {}
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if not entry.is_file(follow_symlinks=False):
                    continue
                if not is_batch_name(entry.name):
                    if not entry.name.startswith(".") and entry.name not in self._ignored \
                            and not entry.name.lower().endswith(IN_PROGRESS_SUFFIXES):
                        self._ignored.add(entry.name)
                        log.info("ignoring %s: not a batch file (%s)", entry.name, " ".join(BATCH_SUFFIXES))
                    continue
                st = entry.stat(follow_symlinks=False)
                found[entry.name] = (st.st_size, st.st_mtime_ns)
        return found

    def poll(self) -> list[Path]:
        """Files whose size and mtime did not change since the previous poll and were never fired."""
        current = self._scan()
        ready = [self.folder / name for name, sig in sorted(current.items())
                 if self.last_seen.get(name) == sig and _key(name, sig) not in self.fired]
        self.last_seen = {name: sig for name, sig in current.items() if _key(name, sig) not in self.fired}
        return ready

    def mark_fired(self, path: Path) -> None:
        st = path.stat() if path.exists() else None
        sig = (st.st_size, st.st_mtime_ns) if st else self.last_seen.get(path.name, (0, 0))
        self.fired[_key(path.name, sig)] = time.time()
        while len(self.fired) > self.max_remembered:  # bounded memory: forget the oldest
            self.fired.popitem(last=False)
        self.last_seen.pop(path.name, None)
        self._save()


def watch(folder: str | Path, announce: Callable[[Path], None], interval_s: float = 5.0,
          state_file: str | Path | None = None, polls: int | None = None) -> None:
    """Poll `folder` every `interval_s` and call `announce(path)` once per complete batch file.

    A failed announcement (e.g. the server is down) is retried on the next poll.
    `polls` bounds the loop (tests); None runs until interrupted.
    """
    folder = Path(folder)
    if not folder.is_dir():
        from rmpipe.core.errors import UserError

        raise UserError(f"{folder} is not a folder: create it or point `rmpipe watch` at the delivery folder")
    with _one_watcher(folder):
        watcher = BatchWatcher(folder, state_file)
        log.info("watching %s every %.1fs for %s files", folder, interval_s, "/".join(BATCH_SUFFIXES))
        _loop(watcher, announce, interval_s, polls)


@contextlib.contextmanager
def _one_watcher(folder: Path):
    """Hold `<folder>/.rmpipe-watch.lock` for the watcher's life; a second watcher is refused."""
    from rmpipe.core.errors import UserError

    with (folder / LOCK_NAME).open("a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            raise UserError(f"another watcher (pid {holder}) is already watching {folder}: one watcher per "
                            "folder (stop it first, or watch another folder)") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield


def _loop(watcher: BatchWatcher, announce: Callable[[Path], None], interval_s: float, polls: int | None) -> None:
    for _ in _ticks(polls):
        for path in watcher.poll():
            try:
                announce(path)
            except Exception as exc:  # noqa: BLE001 - keep watching; retried next poll
                log.warning("could not announce %s (%s); will retry", path.name, exc)
                continue
            watcher.mark_fired(path)
            log.info("announced %s", path.name)
        time.sleep(interval_s)


def _ticks(polls: int | None) -> Iterable[int]:
    n = 0
    while polls is None or n < polls:
        yield n
        n += 1
