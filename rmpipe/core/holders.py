"""Who holds a lock, in one line: a PID, its command line, and whether that PID is still the holder.

    started_after(pid, when)   # True: the PID was reused by a process born after the lock was taken
    command_line(pid)          # the live process's command line (None when it is gone or unreadable)

A lock entry names a PID; a PID is reused once its process ends. A process that started after the
entry was written cannot have written it, so comparing the process's start time with the entry's
time tells a reused PID from the holder (psutil's create_time, read from /proc/<pid>/stat).
"""

from __future__ import annotations

import psutil

# create_time comes from clock ticks since boot: allow for its rounding against wall-clock file times.
CLOCK_SLACK_S = 1.0
MAX_COMMAND_CHARS = 240


def start_time(pid: int) -> float | None:
    """When process `pid` started (epoch seconds), or None when there is no such process."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, ValueError):
        return None
    except psutil.AccessDenied:  # another user's process: alive, start unknown
        return 0.0


def is_holder(pid: int, since: float | None) -> bool:
    """True when `pid` runs and may be the process that took a lock at `since` (epoch seconds; None: unknown)."""
    started = start_time(pid)
    if started is None:
        return False
    return since is None or started <= since + CLOCK_SLACK_S


def started_after(pid: int, since: float) -> bool:
    """True when `pid` runs but started after `since`: its PID was reused, it is not the lock's holder."""
    started = start_time(pid)
    return started is not None and started > since + CLOCK_SLACK_S


def runs_other_command(pid: int, recorded: str) -> bool:
    """True when `pid` runs a command other than `recorded` (a holder's `" ".join(sys.argv)`, as DVC records it).

    sys.argv drops the interpreter and rewrites argv[0] (`python -m dvc repro` records
    `.../dvc/__main__.py repro`), so only the arguments after argv[0] are compared, with the end of the
    live command line. Unknown (unreadable, no arguments recorded): False, it may be the holder."""
    args = recorded.split(" ", 1)[1].strip() if " " in recorded.strip() else ""
    try:
        live = " ".join(psutil.Process(pid).cmdline())
    except (psutil.Error, ValueError):
        return False
    return bool(args and live) and not live.endswith(args)


def command_line(pid: int) -> str | None:
    try:
        parts = psutil.Process(pid).cmdline()
    except (psutil.Error, ValueError):
        return None
    return one_line(" ".join(parts)) if parts else None


def one_line(text: str) -> str:
    """`text` on one line, at most MAX_COMMAND_CHARS (a command line may hold newlines or be huge): its start
    and its end (the arguments, which tell one run from another) with " ... " between."""
    text = " ".join(str(text).split())
    if len(text) <= MAX_COMMAND_CHARS:
        return text
    half = (MAX_COMMAND_CHARS - 5) // 2
    return f"{text[:half]} ... {text[-half:]}"
