"""Where Prefect keeps its state: inside the project unless the user points it at a server.

Prefect reads its settings once, when `prefect` is first imported, so `configure()`
must run before that import (pipeline.flows calls it at the top). Without a
configured server, flows run in Prefect's ephemeral mode: a temporary local server
whose SQLite database lives in `<project>/.prefect/` (git-ignored), never in the
user's `~/.prefect` profile.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from rmpipe.core.errors import EnvironmentFault, UserError, nearest_existing
from rmpipe.core.params import PARAMS_FILE

PROJECT_ENV = "RMPIPE_PROJECT"

# Values we impose whatever the user configured: nothing leaves the machine, nothing listens beyond it.
_ALWAYS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_API_HOST": "127.0.0.1",
}
# Quieter, faster defaults the user may override from their environment.
_DEFAULTS = {
    "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "true",
    # The ephemeral server migrates a fresh SQLite DB on first start; on a busy 2-core box that outlasts 20 s.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "rmpipe",  # stage log lines show up in the flow run's logs
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",  # ...and outside a flow run (the watcher) stay local
    "PREFECT_CLI_PROMPT": "false",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "DS_ACCELERATOR": "cpu",
}


class NotAProject(UserError):
    """No dvc.yaml + params.yaml found where the command was run."""


def find_project_root(start: str | Path | None = None) -> Path:
    """The nearest folder at or above `start` (default: $RMPIPE_PROJECT or the cwd) holding dvc.yaml and params.yaml."""
    here = Path(start or os.environ.get(PROJECT_ENV) or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() and (folder / PARAMS_FILE).is_file():
            return folder
    raise NotAProject(f"no dvc.yaml + params.yaml at or above {here}: run from the rmpipe project folder "
                      f"or set {PROJECT_ENV}")


def prefect_home(project: Path) -> Path:
    return project / ".prefect"


def configure(project: str | Path | None = None) -> dict[str, str]:
    """Set Prefect's environment for this process (and the subprocesses it starts); returns what it set.

    A user who configured PREFECT_API_URL (a running or remote server) or PREFECT_HOME
    keeps their choice; otherwise PREFECT_HOME becomes `<project>/.prefect`.
    """
    changed: dict[str, str] = {}
    if not os.environ.get("PREFECT_API_URL") and not os.environ.get("PREFECT_HOME"):
        try:
            root = find_project_root(project)
        except NotAProject:
            root = None  # e.g. `rmpipe --help` outside a project: nothing will run a flow
        if root is not None:
            changed["PREFECT_HOME"] = str(prefect_home(root))
    changed.update(_ALWAYS)
    changed.update({k: v for k, v in _DEFAULTS.items() if k not in os.environ})
    os.environ.update(changed)
    return changed


MIN_FREE_MB = 50  # Prefect's SQLite database, its migrations and a run's logs; below this it fails in ~45 tracebacks


def require_space(project: str | Path | None = None, min_free_mb: float = MIN_FREE_MB) -> None:
    """Before a flow starts Prefect's temporary server: its database folder (PREFECT_HOME, ephemeral mode only)
    and the project must have `min_free_mb` free, else one line (`EnvironmentFault`) naming the folder and the
    space. SQLite on a full disk fails deep inside Prefect's server, in dozens of tracebacks, then a timeout."""
    folders = [("the project folder", Path(find_project_root(project)))]
    if not os.environ.get("PREFECT_API_URL") and os.environ.get("PREFECT_HOME"):
        folders.insert(0, ("Prefect's database folder", Path(os.environ["PREFECT_HOME"])))
    for what, folder in folders:
        free_mb = shutil.disk_usage(nearest_existing(folder)).free / 2**20
        if free_mb < min_free_mb:
            raise EnvironmentFault(f"no space left on the disk for {what} {folder}: {free_mb:.1f} MB free, Prefect's "
                                   f"temporary server needs at least {min_free_mb:g} MB: free space there, or point "
                                   "PREFECT_HOME (or PREFECT_API_URL) at another disk, and run again")


def server_env(home: str | Path, port: int) -> dict[str, str]:
    """Environment for a local `prefect server start` on 127.0.0.1:`port` and for its clients."""
    env = {**os.environ, **_ALWAYS, **_DEFAULTS}
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_API_URL": api_url(port),
    })
    return env


def api_url(port: int, host: str = "127.0.0.1") -> str:
    return f"http://{host}:{port}/api"
