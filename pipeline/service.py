"""The pipeline as a service: `on_new_batch` served with an event trigger, one run at a time.

    rmpipe serve          # against a running Prefect server (PREFECT_API_URL)
    rmpipe watch DIR      # announces each complete batch file as a `preference.batch.arrived` event

An arrival event becomes a flow run of the `on-new-batch` deployment with the
batch path from the event payload. Runs are serialised twice over: the
deployment's concurrency limit is 1 with the ENQUEUE strategy (extra runs wait
in the server's queue rather than being dropped) and the runner executes one run
at a time; inside the flow, `pipeline_lock` still guards DVC against any other
process (a manual `rmpipe rebuild`).
"""

from __future__ import annotations

import asyncio
import os
import signal
from datetime import timedelta
from pathlib import Path

from pipeline import prefect_env
from rmpipe.errors import UserError

prefect_env.configure()  # before any `import prefect` below: Prefect reads its settings at import

BATCH_EVENT = "preference.batch.arrived"
BATCH_RESOURCE_PREFIX = "rmpipe.batch."
DEPLOYMENT = "on-new-batch"


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

    # Prefect's SIGTERM handler calls the sync Runner.stop() inside the running event loop, where it only
    # makes a coroutine nobody awaits ("coroutine 'Runner.astop' was never awaited") and exits without
    # pausing the deployments. Treat SIGTERM as Ctrl-C, whose path shuts the runner down cleanly.
    Runner.handle_sigterm = lambda self, *args, **kwargs: signal.raise_signal(signal.SIGINT)

    from pipeline.flows import on_new_batch, rebuild

    deployments = [
        on_new_batch.to_deployment(name=DEPLOYMENT, triggers=[batch_trigger()], concurrency_limit=one_at_a_time(),
                                   parameters={"project": str(root)}),
        rebuild.to_deployment(name="rebuild", concurrency_limit=one_at_a_time(), parameters={"project": str(root)}),
    ]
    prefect_serve(*deployments, limit=1)


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
