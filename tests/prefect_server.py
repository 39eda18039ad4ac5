"""A real Prefect server for tests: started on 127.0.0.1 (port 0), polled until healthy, stopped whole.

`shared_api_url()` is one server per test session (per xdist worker), started the first time a test asks:
every `rmpipe on-new-batch` / `retract` / `rebuild` a test runs as a subprocess talks to it instead of
starting its own ephemeral server (20-40 s each on two busy cores; a call against a running server, ~5 s).
Tests about the ephemeral mode itself do not use it. Flow runs from several tests meet in its database, so
a test that reads runs back filters them by its own project (every rmpipe flow takes the project as a
parameter).
"""

from __future__ import annotations

import atexit
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.orphans import stop_process_group

PY = sys.executable


def wait_for(what: str, check, timeout_s: float, procs=(), every_s: float = 1.0):
    """Poll `check()` until it returns something truthy; fail with `what` after `timeout_s` or if a process died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        for proc in procs:
            if proc.poll() is not None:
                pytest.fail(f"{proc.args} exited with {proc.returncode} while waiting for {what}")
        time.sleep(every_s)
    pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}")


def start(cmd: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # own process group: killed whole in `stop`


stop = stop_process_group  # the server and what it started, whole


def healthy(api: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{api}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def start_server(tmp: Path, log: Path, **extra: str) -> tuple[subprocess.Popen, dict[str, str]]:
    """`prefect server start` on 127.0.0.1 port 0: the kernel picks a free port as the server binds it, read
    back from /proc/net/tcp (no port picked here and bound later, which another process could take between).
    Returns the server and the environment its clients use (PREFECT_API_URL with the port it got)."""
    from procnet import listening

    from pipeline.prefect_env import api_url, server_env

    env = {**server_env(tmp / "prefect-home", 0), **extra}
    server_own = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}  # the server needs no client URL
    proc = start([PY, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", "0"], tmp, server_own, log)
    try:
        ((_, port),) = wait_for("the Prefect server to listen", lambda: listening(proc.pid), 150, [proc], every_s=0.2)
        env.update(PREFECT_SERVER_API_PORT=str(port), PREFECT_API_URL=api_url(port))
        wait_for("the Prefect server", lambda: healthy(env["PREFECT_API_URL"]), 150, [proc])
    except BaseException:
        stop(proc)
        raise
    return proc, env


_shared: dict = {}


def shared_api_url() -> str:
    """The session's one server (started on first use, stopped by `stop_shared`): its PREFECT_API_URL."""
    if "url" not in _shared:
        home = Path(tempfile.mkdtemp(prefix="rmpipe-test-prefect-server-"))
        proc, env = start_server(home, home / "server.log")
        atexit.register(stop, proc)  # a session that ends without pytest_sessionfinish
        _shared.update(url=env["PREFECT_API_URL"], proc=proc, home=home)
    return _shared["url"]


def stop_shared() -> None:
    """Stop the session's server and remove its home (pytest_sessionfinish: before pytest reports leftovers)."""
    if "proc" in _shared:
        stop(_shared.pop("proc"))
        shutil.rmtree(_shared.pop("home"), ignore_errors=True)
        _shared.clear()
