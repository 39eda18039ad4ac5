"""Shared test set-up: offline, quiet, and pointed at the project root."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# Offline and telemetry-free for every library the pipeline touches.
for key, value in {
    "GX_ANALYTICS_ENABLED": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "DS_ACCELERATOR": "cpu",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)

# Tests never write into the project's own Prefect database (`.prefect/`, what the user's server shows):
# one throwaway Prefect home for the session, set before anything imports prefect, and no server the
# developer's shell may point at. pipeline.prefect_env keeps a PREFECT_HOME that is already set, so
# importing pipeline.flows here (or in any subprocess a test starts) leaves `.prefect/` alone.
PREFECT_HOME = Path(tempfile.mkdtemp(prefix="rmpipe-test-prefect-"))
os.environ["PREFECT_HOME"] = str(PREFECT_HOME)
for key in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE"):
    os.environ.pop(key, None)

ROOT = Path(__file__).resolve().parents[1]


def pytest_sessionfinish(session, exitstatus):
    """Stop Prefect's temporary server now, while pytest's streams are open: at interpreter exit its
    "Stopping temporary server" line hit a closed stream (`--- Logging error ---`). Queued logs and
    events are sent first, so nothing is left to fail against a stopped server."""
    if "prefect.server.api.server" in sys.modules:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker
        from prefect.server.api.server import SubprocessASGIServer

        APILogWorker.drain_all(timeout=5)
        EventsWorker.drain_all(timeout=5)
        prefect_log = logging.getLogger("prefect")
        level = prefect_log.level
        prefect_log.setLevel(logging.WARNING)  # the server's own "Stopping" line is no news here
        try:
            for server in list(SubprocessASGIServer._instances.values()):
                server.stop()
        finally:
            prefect_log.setLevel(level)
    shutil.rmtree(PREFECT_HOME, ignore_errors=True)


@pytest.fixture
def project_root() -> Path:
    return ROOT
