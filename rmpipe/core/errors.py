"""Errors a user can act on, and the one place that turns them into a clean exit.

Anything raised as `UserError` is a mistake in the user's data or config: it is
printed as one readable message (no traceback) and the process exits non-zero.
Anything else is a bug in rmpipe and keeps its traceback.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import shutil
import sys
from typing import Callable, TypeVar

log = logging.getLogger("rmpipe")

F = TypeVar("F", bound=Callable[..., object])


class UserError(Exception):
    """A problem with the user's data, files or params, explained in words they can act on."""

    exit_code = 2


class ConfigError(UserError):
    """params.yaml (or an override) is missing a key or holds a value of the wrong kind."""


class DataError(UserError):
    """Input data breaks the contract badly enough that the stage cannot go on."""


class ValidationFailed(UserError):
    """A data contract check failed; the stage has already printed each failure."""

    exit_code = 1


class EnvironmentFault(UserError):
    """The machine, not the data: a full disk, a read-only file system, a name the file system refuses."""

    exit_code = 3


# errno -> (what happened, what to do). Each is the environment's fault: one line, no traceback.
_FAULTS = {
    errno.ENOSPC: ("no space left on the disk", "free space there (or point that path at a larger disk) and run again"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota (or ask for a larger one) and run again"),
    errno.ENAMETOOLONG: ("file name too long for the file system", "rename the file shorter (200 bytes at most)"),
    errno.EROFS: ("read-only file system", "mount it writable, or run the project from a writable folder"),
}
_FAULT_WORDS = {"No space left on device": errno.ENOSPC, "database or disk is full": errno.ENOSPC,
                "Disk quota exceeded": errno.EDQUOT, "Read-only file system": errno.EROFS}


def _fault_errno(exc: BaseException) -> int | None:
    if isinstance(exc, OSError) and exc.errno in _FAULTS:
        return exc.errno
    text = str(exc)  # pyarrow, sqlite and torch carry the cause in the message only
    return next((code for words, code in _FAULT_WORDS.items() if words in text), None)


def environment_fault(exc: BaseException, path: str | os.PathLike | None = None,
                      needed: str | None = None) -> EnvironmentFault | None:
    """The `EnvironmentFault` an exception (or one in its cause/context chain) stands for, or None.

    ENOSPC/EDQUOT/ENAMETOOLONG/EROFS become one line naming the path, the cause and the fix; for a full
    disk also the space still free there. `path`: the file being written, when the error does not say;
    `needed`: how much the write needs, in words (e.g. "about 12.0 MB, the batches' size").
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        code = _fault_errno(exc)
        if code is not None:
            where = str(path or getattr(exc, "filename", None) or "") or None
            what, fix = _FAULTS[code]
            full = code in (errno.ENOSPC, errno.EDQUOT)
            free = f"; {_free_space(where)}" if where and full else ""
            free += f", needs {needed}" if needed and full else ""
            return EnvironmentFault(f"{what}{' writing ' + where if where else ''}{free}: {fix}")
        exc = exc.__cause__ or exc.__context__
    return None


def nearest_existing(path: str | os.PathLike) -> str:
    """`path`, or its nearest parent that exists: where a path that is not made yet takes its disk space."""
    folder = os.path.abspath(path)
    while folder != os.path.dirname(folder) and not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return folder


def _free_space(path: str) -> str:
    """'N MB free of M MB there' for the file system holding `path`."""
    try:
        usage = shutil.disk_usage(nearest_existing(path))
    except OSError:
        return "free space unknown"
    return f"{usage.free / 2**20:.1f} MB free of {usage.total / 2**20:.1f} MB there"


def exits_cleanly(main: F) -> F:
    """Wrap a command's entry point: a `UserError` becomes `error: ...` on stderr and its exit code; so does
    a fault of the environment (`environment_fault`: full disk, quota, name too long, read-only)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        except BrokenPipeError:  # `rmpipe lineage ... | head`: the reader left; nothing to report
            sys.stderr.close()
            sys.exit(0)
        except Exception as exc:  # a full disk, a read-only folder: the environment's fault, not a bug
            fault = environment_fault(exc)
            if fault is None:
                raise
            print(f"error: {fault}", file=sys.stderr)
            sys.exit(fault.exit_code)

    return wrapper  # type: ignore[return-value]
