"""Prefect plumbing the flows share: failures with a message and no traceback, retries for transient trouble only.

    @task(retries=TRANSIENT_RETRIES, retry_condition_fn=retry_transient_only, ...)
    @fails_cleanly
    def step(...): ...                 # a UserError ends it Failed, with its one-line message
    result = run_task(step, ...)       # ... and raises that UserError in the caller
"""

from __future__ import annotations

import functools
import logging

from pipeline import prefect_env

prefect_env.configure()  # before `import prefect`: Prefect reads its settings at import

from prefect import get_run_logger  # noqa: E402
from prefect.states import Failed  # noqa: E402

from rmpipe.core.errors import UserError  # noqa: E402

TRANSIENT_RETRIES = 3


class StageFailed(UserError):
    """A stage (or `dvc repro`) stopped with a message for the user; retrying would not help."""


class TransientFailure(RuntimeError):
    """A failure worth retrying: DVC's repo lock was busy, or the process was killed by a signal."""


def fails_cleanly(fn):
    """A UserError ends the flow/task as Failed with its message (logged once, no traceback).

    Calling the flow from Python still raises the same UserError (it is the state's data).
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            get_run_logger().error("%s", exc)
            # the state's message is logged again by Prefect ("Finished in state Failed(...)"): a long reason
            # that was just logged is not spelled out twice (`state_message` names where it is instead)
            return Failed(message=getattr(exc, "state_message", None) or str(exc), data=exc)

    return wrapper


class _UserErrorTracebacks(logging.Filter):
    """Drop Prefect's traceback of a UserError. A deployment run that fails on one (a rejected batch, a
    stage's message) has logged its one-line reason already; Prefect's engine would log it again as
    "Engine execution exited with unexpected exception" plus ~40 lines of its own frames."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], UserError))


class _NoDocLinks(logging.Filter):
    """Prefect's "See https://docs.prefect.io/... for more information on running a dedicated Prefect server"
    after "Starting temporary server": advice for a developer running a flow ad hoc, noise in `rmpipe retract`
    and the like, which run their one flow on a temporary server on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "https://docs.prefect.io" in record.msg:
            record.msg = "\n".join(line for line in record.msg.split("\n") if "https://docs.prefect.io" not in line)
        return bool(record.msg)


for _name in ("prefect.flow_runs", "prefect.task_runs"):
    logging.getLogger(_name).addFilter(_UserErrorTracebacks())
for _name in ("prefect", "prefect.server"):
    logging.getLogger(_name).addFilter(_NoDocLinks())


def run_task(task_, *args, **kwargs):
    """Call a task and return its result; a Failed state (e.g. from fails_cleanly) raises its exception here."""
    return task_(*args, return_state=True, **kwargs).result()


def retry_transient_only(task_, task_run, state) -> bool:
    """Prefect retry condition: retry TransientFailure / connection trouble, never a user or data error."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, (TransientFailure, ConnectionError, TimeoutError))
