"""Errors a user can act on, and the one place that turns them into a clean exit.

Anything raised as `UserError` is a mistake in the user's data or config: it is
printed as one readable message (no traceback) and the process exits non-zero.
Anything else is a bug in rmpipe and keeps its traceback.
"""

from __future__ import annotations

import functools
import logging
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


def exits_cleanly(main: F) -> F:
    """Wrap a command's entry point: a `UserError` becomes `error: ...` on stderr and its exit code."""

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

    return wrapper  # type: ignore[return-value]
