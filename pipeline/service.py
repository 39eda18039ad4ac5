"""The pipeline as a service: `on_new_batch` served with an event trigger, one run at a time.

    rmpipe serve          # against a running Prefect server (PREFECT_API_URL)
    rmpipe watch DIR      # announces each complete batch file as a `preference.batch.arrived` event

An arrival event becomes a flow run of the `on-new-batch` deployment with the
batch path from the event payload. Runs are serialised twice over: the
deployment's concurrency limit is 1 with the ENQUEUE strategy (extra runs wait
in the server's queue rather than being dropped) and the runner executes one run
at a time; inside the flow, `pipeline_lock` still guards DVC against any other
process (a manual `rmpipe rebuild`).

Delivery is at least once: the watcher records a file as announced only after the
server took the event, so a crash in between announces it again (the flow's duplicate
check makes that harmless). Order is not kept: the server starts queued runs in any
order, and it does not matter, because every rebuild takes in every queued batch and
the model depends on the set of batches (collect reads them sorted by name, the split
is a function of each prompt's hash), not on the order they came in.

Stopping `rmpipe serve` (Ctrl-C or SIGTERM) finishes within `SHUTDOWN_GRACE_S` whether
or not the server answers: deployments are not paused on the way out (a paused
deployment would also drop arrivals while the service is down; unpaused, they wait on
the server as scheduled runs), and after the grace period the process exits hard; the
flow runs it was executing die with it (`orphans`) and the next run marks them Crashed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from datetime import timedelta
from pathlib import Path

from pipeline import prefect_env
from rmpipe.core.errors import UserError

prefect_env.configure()  # before any `import prefect` below: Prefect reads its settings at import

BATCH_EVENT = "preference.batch.arrived"
BATCH_RESOURCE_PREFIX = "rmpipe.batch."
DEPLOYMENT = "on-new-batch"
SHUTDOWN_GRACE_S = 10.0


class NoServer(UserError):
    """The command needs a running Prefect server and none is configured."""


def require_server() -> str:
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        raise NoServer("no Prefect server configured: start one (`prefect server start`) and set "
                       "PREFECT_API_URL=http://127.0.0.1:4200/api (or your remote server's URL)")
    return url


def batch_trigger():
    """One flow run per arrival event, with the batch path from the event payload."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name="preference batch arrived",
        expect={BATCH_EVENT},
        match={"prefect.resource.id": f"{BATCH_RESOURCE_PREFIX}*"},
        posture="Reactive",
        threshold=1,
        within=timedelta(0),
        parameters={"batch_path": "{{ event.payload.batch_path }}"},
    )


def one_at_a_time():
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    return ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


def serve(project: str | Path | None = None) -> None:
    """Serve `on-new-batch` (event-triggered) and `rebuild` (manual) from this process until interrupted."""
    require_server()
    root = prefect_env.find_project_root(project)
    os.chdir(root)  # the runner starts flow runs in its working directory
    from prefect import serve as prefect_serve
    from prefect.runner import Runner

    from pipeline import orphans
    from pipeline.flows import on_new_batch, rebuild

    orphans.tie_descendants_to_this_process()  # flow runs in progress die with the service

    # Prefect's SIGTERM handler calls the sync Runner.stop() inside the running event loop, where it only
    # makes a coroutine nobody awaits ("coroutine 'Runner.astop' was never awaited") and exits without
    # pausing the deployments. Treat SIGTERM as Ctrl-C, whose path shuts the runner down cleanly.
    # Prefect then logs "Received KeyboardInterrupt": `_SaySigterm` names the signal that came.
    received: dict[str, str] = {}

    def sigterm_as_sigint(self, *args, **kwargs) -> None:
        received["signal"] = "SIGTERM"
        signal.raise_signal(signal.SIGINT)

    Runner.handle_sigterm = sigterm_as_sigint
    logging.getLogger("prefect.flows").addFilter(_SaySigterm(received))

    def on_sigint(signum, frame):  # Ctrl-C (or SIGTERM, above): a graceful stop, bounded in time
        _exit_hard_after(SHUTDOWN_GRACE_S, 128 + signum)
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, on_sigint)
    deployments = [
        on_new_batch.to_deployment(name=DEPLOYMENT, triggers=[batch_trigger()], concurrency_limit=one_at_a_time(),
                                   parameters={"project": str(root)}),
        rebuild.to_deployment(name="rebuild", concurrency_limit=one_at_a_time(), parameters={"project": str(root)}),
    ]
    # Not paused on the way out: pausing needs the server (it hung when the server was down), and a paused
    # deployment would drop arrivals while the service is stopped; unpaused, they wait as scheduled runs.
    prefect_serve(*deployments, limit=1, pause_on_shutdown=False)


class _SaySigterm(logging.Filter):
    """Prefect's "Received KeyboardInterrupt, shutting down..." reads "Received SIGTERM, ..." after a SIGTERM."""

    def __init__(self, received: dict[str, str]):
        super().__init__()
        self.received = received

    def filter(self, record: logging.LogRecord) -> bool:
        if "signal" in self.received and isinstance(record.msg, str) and "Received KeyboardInterrupt" in record.msg:
            record.msg = record.msg.replace("KeyboardInterrupt", self.received["signal"])
        return True


def _exit_hard_after(seconds: float, code: int) -> None:
    """Let a graceful shutdown try for `seconds`, then leave anyway (an unreachable server can stall it)."""
    def leave():
        logging.getLogger("rmpipe.service").warning("shutdown took over %.0fs (server unreachable?): exiting", seconds)
        os._exit(code)

    timer = threading.Timer(seconds, leave)
    timer.daemon = True
    timer.start()


def batch_event(path: Path):
    from prefect.events import Event

    path = path.resolve()
    return Event(
        event=BATCH_EVENT,
        resource={"prefect.resource.id": f"{BATCH_RESOURCE_PREFIX}{path.name}", "prefect.resource.name": path.name},
        payload={"batch_path": str(path), "size_bytes": path.stat().st_size},
    )


async def _emit(path: Path) -> None:
    from prefect.events.clients import get_events_client

    async with get_events_client(reconnection_attempts=3) as client:
        await client.emit(batch_event(path))


def announce_batch(path: Path) -> None:
    """Send one `preference.batch.arrived` event and wait until the server took it (raises if it could not)."""
    asyncio.run(_emit(path))
