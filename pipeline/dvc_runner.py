"""`dvc` as the flows run it: a subprocess with this interpreter's `python` on PATH, its output in the flow's log.

    stages = run_task(dvc_repro, root, ["repro"], trigger)    # {"ran": [...], "skipped": [...]}, from dvc.lock
    dvc(root, "remote", "default")                            # a quick one, output captured

A failed `dvc repro` becomes a StageFailed with the lines that say why, or a TransientFailure
(retried) when another DVC run was in the way or the process was killed by a signal.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import yaml

from pipeline import prefect_env

prefect_env.configure()  # before `import prefect`: Prefect reads its settings at import

from prefect import get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from pipeline import dvc_activity  # noqa: E402
from pipeline.tasks import (  # noqa: E402
    TRANSIENT_RETRIES, StageFailed, TransientFailure, fails_cleanly, retry_transient_only,
)
from rmpipe.audit.history import TRIGGER_ENV  # noqa: E402
from rmpipe.core import io  # noqa: E402
from rmpipe.core.paths import DVC_LOCK  # noqa: E402
from rmpipe.core.stage import REBUILD_MARKER  # noqa: E402

# DVC messages that mean "another DVC run was in the way" (or its lock files were removed under it):
# worth retrying once it is done.
TRANSIENT_MARKERS = ("Unable to acquire lock", "is busy", "Unlock called on an unlocked lock",
                     "changed while collect read it")
PUSH_HINT = "Use `dvc push` to send your updates to remote storage."  # said by DVC whether or not there is one
STAGE_TIME = re.compile(r"^\d\d:\d\d:\d\d (?=\S+ \| )")  # a stage's own log time: the flow's line has one


def subprocess_env() -> dict[str, str]:
    """dvc.yaml runs `python -m stages.x`: make that `python` the one running us."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def dvc(root: Path, *args: str, capture: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=subprocess_env(),
                          text=True, capture_output=capture)


def default_remote(root: Path) -> str | None:
    """The project's default DVC remote, or None ("No default remote set": exit 251)."""
    found = dvc(root, "remote", "default")
    return found.stdout.strip() or None if found.returncode == 0 else None


def relayed(line: str, root: Path) -> str | None:
    """A line of `dvc repro` as the flow's log shows it: one timestamp (the log's), no push hint without a remote."""
    if line.strip() == PUSH_HINT and default_remote(root) is None:
        return None
    return STAGE_TIME.sub("", line)


def locked_stages(root: Path) -> dict:
    """Each stage's record in dvc.lock (deps, params and outs by hash), in pipeline order."""
    lock = root / DVC_LOCK
    return (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {}) if lock.exists() else {}


def has_git(root: Path) -> bool:
    return subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=root,
                          capture_output=True).returncode == 0


@contextlib.contextmanager
def _named_as_the_rebuild(root: Path, pid: int, args: list[str]) -> Iterator[None]:
    """REBUILD_MARKER names our `dvc repro` while it runs (stages of any other DVC run refuse to start)."""
    marker = root / REBUILD_MARKER
    io.write_json(marker, {"pid": pid, "command": f"dvc {' '.join(args)}", "by": os.getpid(),
                           "since": datetime.now(UTC).isoformat(timespec="seconds")})
    try:
        yield
    finally:
        marker.unlink(missing_ok=True)


@task(retries=TRANSIENT_RETRIES, retry_delay_seconds=10, retry_condition_fn=retry_transient_only,
      cache_policy=NO_CACHE, task_run_name="dvc {args}")
@fails_cleanly
def dvc_repro(root: Path, args: list[str], trigger: str = "rmpipe rebuild") -> dict[str, list[str]]:
    """Run `dvc <args>` streaming its output into the flow's log; which stages ran and which were up to date.

    `trigger` reaches the export stage, which records it in the run history (rmpipe.audit.history)."""
    logger = get_run_logger()
    dvc_activity.wait_until_idle(root)  # a manual `dvc repro` finishes first: runs never interleave
    logger.info("$ dvc %s", " ".join(args))
    before = locked_stages(root)
    env = {**subprocess_env(), TRIGGER_ENV: trigger}
    proc = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=root, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
    lines: list[str] = []
    assert proc.stdout is not None
    with _named_as_the_rebuild(root, proc.pid, args):  # a manual `dvc repro` meanwhile: its stages stop at once
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            if line.strip() and (shown := relayed(line, root)) is not None:
                logger.info("%s", shown)
        code = proc.wait()
    # What ran is read from DVC's own record, not its console: a stage ran when its dvc.lock entry changed.
    after = locked_stages(root)
    ran = [stage for stage, record in after.items() if before.get(stage) != record]
    if code == 0:
        return {"ran": ran, "skipped": [stage for stage in after if stage not in ran]}
    # The lines that say what went wrong (stage `error:`/`FAIL` lines, DVC's ERROR), else the last few.
    errors = [line for line in lines if re.match(r"\s*(ERROR|error:|FAIL)", line)]
    tail = "\n".join(errors[-10:] or [line for line in lines[-8:] if line.strip()])
    if code < 0 or any(marker in "\n".join(lines[-40:]) for marker in TRANSIENT_MARKERS):
        raise TransientFailure(f"dvc {args[0]} was interrupted or blocked by another DVC run (exit {code}); "
                               f"retrying once it is done\n{tail}")
    raise StageFailed(f"dvc {' '.join(args)} failed (exit {code}); stages that ran: {ran or 'none'}\n{tail}")
