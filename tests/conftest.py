"""Shared test set-up: offline, quiet, pointed at the project root, and order-independent.

Every test starts from the same process state: the environment, the working directory and what an
in-process training run changes (torch threads and determinism, the DeepSpeed process group) are
restored after each test, so which code path a later test takes never depends on what ran before it.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

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

# One xdist worker per core: each worker's torch (in process and in the stages it starts) gets its share of
# the cores, not all of them. Two workers each running two OpenMP threads on two cores spin at every barrier
# for a descheduled partner: an evaluate stage took 24.5 s (median of 4) with two threads beside other jobs
# and 15.0 s with one. Serial runs (no xdist) keep torch's default.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

# Tests never write into the project's own Prefect database (`.prefect/`, what the user's server shows):
# one throwaway Prefect home for the session, set before anything imports prefect, and no server the
# developer's shell may point at. pipeline.prefect_env keeps a PREFECT_HOME that is already set, so
# importing pipeline.flows here (or in any subprocess a test starts) leaves `.prefect/` alone.
PREFECT_HOME = Path(tempfile.mkdtemp(prefix="rmpipe-test-prefect-"))
os.environ["PREFECT_HOME"] = str(PREFECT_HOME)
for key in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE"):
    os.environ.pop(key, None)

# Hypothesis: a fixed seed and no example database by default (what CI runs), so a red run replays exactly
# and no earlier run's saved examples change this one. HYPOTHESIS_PROFILE=explore draws fresh examples.
hypothesis_settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
hypothesis_settings.register_profile("explore", print_blob=True)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

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
    if "prefect_server" in sys.modules:  # the session's shared server (tests/prefect_server.py), if one started
        sys.modules["prefect_server"].stop_shared()
    shutil.rmtree(PREFECT_HOME, ignore_errors=True)


def pytest_addoption(parser):
    parser.addoption("--reverse-order", action="store_true",
                     help="run the collected tests in reverse order (an order-independence check)")
    parser.addoption("--shuffle-seed", type=int, default=None,
                     help="run the test files, and the tests within each, in an order shuffled with this seed "
                          "(an order-independence check that replays exactly; a file's tests stay together, so its "
                          "module fixtures are built once)")


# The files that take longest (worker seconds in a full `make test`, read from `pytest --durations=60`), most
# first. `make test` hands whole files to its workers in collection order (--dist loadfile, no reorder): the
# long ones start first and the short ones fill in beside them, so no worker is left alone with a long file
# at the end (longest-first scheduling). Order only: every test still runs.
LONGEST_FIRST = ("test_service.py", "test_audit.py", "test_retract_kill.py", "test_security.py",
                 "test_arrivals.py", "test_train.py", "test_dvc_pipeline.py", "test_packing.py",
                 "test_repro_guarantees.py", "test_reliability.py", "test_byod_pipeline.py", "test_annotate.py",
                 "test_validate.py", "test_flows.py", "test_sampling.py")


def _longest_first(items: list) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    position = {}
    for item in items:
        position.setdefault(item.path.name, len(position))
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), position[item.path.name]))  # stable


def pytest_collection_modifyitems(config, items):
    _longest_first(items)
    seed = config.getoption("--shuffle-seed")
    if seed is not None:
        rng = random.Random(seed)
        files: dict[str, list] = {}
        for item in items:
            files.setdefault(item.nodeid.split("::")[0], []).append(item)
        groups = list(files.values())
        rng.shuffle(groups)
        for group in groups:
            rng.shuffle(group)
        items[:] = [item for group in groups for item in group]
    if config.getoption("--reverse-order"):
        items.reverse()


@pytest.fixture
def project_root() -> Path:
    return ROOT


def reset_distributed() -> None:
    """Tear down a process group an in-process `stages.train.run` left up, and DeepSpeed's caches of it,
    so the next in-process run builds a fresh one-rank group (and subprocesses inherit nothing)."""
    import torch.distributed as dist

    from rmpipe.training.distributed import leave_distributed

    if not (dist.is_available() and dist.is_initialized()):
        return
    leave_distributed(finished=False)
    import deepspeed.comm.comm as ds_comm
    import deepspeed.utils.groups as ds_groups

    ds_comm.cdb = None
    for name, value in vars(ds_groups).items():
        if name.startswith("_") and name.isupper() and isinstance(value, dict):
            value.clear()
        elif name.startswith("_") and name.isupper() and not isinstance(value, (str, int, float, tuple)):
            setattr(ds_groups, name, None)


# What an in-process training run sets for its one-rank group. A module-scoped fixture that trains runs
# before a test's snapshot is taken, so these are restored to their values at session start, not per test.
DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_SESSION_ENV = {key: os.environ.get(key) for key in DISTRIBUTED_ENV}
_SESSION_TORCH: tuple | None = None


def _torch_state(torch) -> tuple:
    return (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled())


def pytest_collection_finish(session):
    """Torch as the test modules left it at import, before any fixture trained."""
    global _SESSION_TORCH
    if "torch" in sys.modules:
        _SESSION_TORCH = _torch_state(sys.modules["torch"])


@pytest.fixture(autouse=True)
def _restore_process_state():
    env, cwd = dict(os.environ), os.getcwd()
    yield
    if "torch.distributed" in sys.modules:
        reset_distributed()
    torch = sys.modules.get("torch")
    if torch is not None and _SESSION_TORCH is not None:
        threads, deterministic, warn_only = _SESSION_TORCH
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for key, value in _SESSION_ENV.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module", autouse=True)
def _shared_prefect_server(request):
    """A module marked `prefect_server` runs its flow subprocesses (`rmpipe on-new-batch`, `retract`, ...)
    against the session's one Prefect server (tests/prefect_server.py) instead of an ephemeral server each:
    PREFECT_API_URL is set for the module (module fixtures included) and removed after it. In-process flows
    keep the ephemeral server Prefect chose at import."""
    if request.node.get_closest_marker("prefect_server") is None:
        yield
        return
    from prefect_server import shared_api_url

    before = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = shared_api_url()
    yield
    if before is None:
        os.environ.pop("PREFECT_API_URL", None)
    else:
        os.environ["PREFECT_API_URL"] = before
