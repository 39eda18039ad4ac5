"""Prefect flows: each stage, the DVC rebuild, and the arrival of a new preference batch.

- `run_stage(stage)` runs one stage's entry point (the same `main` that
  `python -m stages.<stage>` runs under `dvc repro`) as a flow: logs and states in
  Prefect, retries only for transient failures.
- `rebuild()` runs the pipeline *through DVC* (`dvc repro`, or `dvc exp run -S`
  for parameter overrides), so dvc.lock records every input hash and DVC decides
  what is stale.
- `on_new_batch(batch_path)` checks one delivered batch, queues it at once, then
  rebuilds (one run at a time), which takes in every queued batch.

Only one rebuild touches a project at a time: `pipeline_lock` queues the others, and
a rebuild starts `dvc repro` only once no other DVC run (a manual `dvc repro`) is
active (`dvc_activity`). Arrivals wait in `.rmpipe/queue/` (rmpipe's own state, which
survives `rm -rf .dvc/tmp`), never straight in data/incoming/. Every rebuild, of any
kind, first admits what is queued: it moves the batches into data/incoming/ under DVC's
rwlock guard, so no stage reading that folder sees it change (and collect fails if it
does anyway). A batch is *registered* once admitted. Run records (`records`) follow each
batch from queued to accepted and are reconciled by every rebuild.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from pipeline import prefect_env

prefect_env.configure()  # before `import prefect`: Prefect reads its settings at import

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402
from prefect.states import Failed  # noqa: E402

from rmpipe import io  # noqa: E402
from rmpipe.errors import UserError  # noqa: E402
from rmpipe.history import TRIGGER_ENV  # noqa: E402
from rmpipe.params import get, load_params, section  # noqa: E402
from pipeline import dvc_activity, orphans, records  # noqa: E402
from pipeline.prefect_env import find_project_root  # noqa: E402

REJECTED_DIR = Path("data/rejected")  # rejected batches + their reasons; no stage reads it
RUNS_DIR = records.RUNS_DIR  # one JSON record per delivered batch
STATE_DIR = Path(".rmpipe")  # rmpipe's own state (git-ignored); not .dvc/tmp, which people clear
LOCK_FILE = STATE_DIR / "pipeline.lock"
QUEUE_DIR = STATE_DIR / "queue"  # accepted batches waiting for the next rebuild
QUEUE_LOCK_FILE = STATE_DIR / "queue.lock"  # held for moments: duplicate check + queue/admit
TRANSIENT_RETRIES = 3
# DVC messages that mean "another DVC run was in the way" (or its lock files were removed under it):
# worth retrying once it is done.
TRANSIENT_MARKERS = ("Unable to acquire lock", "is busy", "Unlock called on an unlocked lock",
                     "changed while collect read it")


class StageFailed(UserError):
    """A stage (or `dvc repro`) stopped with a message for the user; retrying would not help."""


class TransientFailure(RuntimeError):
    """A failure worth retrying: DVC's repo lock was busy, or the process was killed by a signal."""


class BatchRejected(UserError):
    """The delivered batch failed the quick check; it was moved to the rejected folder."""


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
            return Failed(message=str(exc), data=exc)

    return wrapper


class _UserErrorTracebacks(logging.Filter):
    """Drop Prefect's traceback of a UserError. A deployment run that fails on one (a rejected batch, a
    stage's message) has logged its one-line reason already; Prefect's engine would log it again as
    "Engine execution exited with unexpected exception" plus ~40 lines of its own frames."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], UserError))


for _name in ("prefect.flow_runs", "prefect.task_runs"):
    logging.getLogger(_name).addFilter(_UserErrorTracebacks())


def run_task(task_, *args, **kwargs):
    """Call a task and return its result; a Failed state (e.g. from fails_cleanly) raises its exception here."""
    return task_(*args, return_state=True, **kwargs).result()


def _retry_transient_only(task_, task_run, state) -> bool:
    """Prefect retry condition: retry TransientFailure / connection trouble, never a user or data error."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, (TransientFailure, ConnectionError, TimeoutError))


# --- one run at a time ----------------------------------------------------------------------

_held: dict[tuple[Path, int], int] = {}
_held_guard = threading.Lock()


@contextlib.contextmanager
def pipeline_lock(root: Path, lock_file: Path = LOCK_FILE) -> Iterator[None]:
    """Exclusive, blocking, re-entrant (per thread) lock on the project's pipeline.

    Waiting callers queue on the OS lock, so a second rebuild runs after the first
    instead of being dropped or colliding on DVC's own lock. Re-entrance is per thread
    (on_new_batch -> rebuild); other threads of the process wait like other processes
    (flock conflicts between separate opens of the file, even within one process).
    """
    path = ((root / lock_file).resolve(), threading.get_ident())
    with _held_guard:
        if path in _held:
            _held[path] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _held_guard:
                _held[path] -= 1
        return
    path[0].parent.mkdir(parents=True, exist_ok=True)
    with path[0].open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logging.getLogger("rmpipe.flows").info("another rebuild is running in %s; waiting for it", root)
            fcntl.flock(fh, fcntl.LOCK_EX)
        with _held_guard:
            _held[path] = 1
        try:
            yield
        finally:
            with _held_guard:
                del _held[path]
            fcntl.flock(fh, fcntl.LOCK_UN)


# --- stages as flows ---------------------------------------------------------------------------

def dvc_stage_names(root: Path) -> list[str]:
    import yaml

    spec = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}
    return list((spec.get("stages") or {}).keys())


@task(retries=TRANSIENT_RETRIES, retry_delay_seconds=5, retry_condition_fn=_retry_transient_only,
      cache_policy=NO_CACHE, task_run_name="{stage}")
@fails_cleanly
def _call_stage_main(stage: str, root: Path) -> None:
    main = importlib.import_module(f"stages.{stage}").main
    # exits_cleanly turns a UserError into sys.exit; call the function it wraps so the
    # message becomes this flow's failure instead of a bare exit code.
    body = getattr(main, "__wrapped__", main)
    with contextlib.chdir(root):
        try:
            body([])
        except UserError as exc:
            raise StageFailed(f"stage '{stage}': {exc}") from None
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise StageFailed(f"stage '{stage}' exited with {exc.code}") from None


@flow(name="stage", flow_run_name="stage-{stage}", log_prints=True)
@fails_cleanly
def run_stage(stage: str, project: str | None = None) -> None:
    """Run one pipeline stage in this process, exactly as `python -m stages.<stage>` does (outside DVC's lock)."""
    root = find_project_root(project)
    if stage not in dvc_stage_names(root):
        raise StageFailed(f"no stage '{stage}' in dvc.yaml; stages: {', '.join(dvc_stage_names(root))}")
    with pipeline_lock(root):
        run_task(_call_stage_main, stage, root)


# --- the pipeline through DVC ---------------------------------------------------------------------

_RAN = re.compile(r"Running stage '([^']+)'")
_SKIPPED = re.compile(r"Stage '([^']+)' didn't change, skipping")


def _subprocess_env() -> dict[str, str]:
    """dvc.yaml runs `python -m stages.x`: make that `python` the one running us."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _dvc(root: Path, *args: str, capture: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=_subprocess_env(),
                          text=True, capture_output=capture)


@task(retries=TRANSIENT_RETRIES, retry_delay_seconds=10, retry_condition_fn=_retry_transient_only,
      cache_policy=NO_CACHE, task_run_name="dvc {args}")
@fails_cleanly
def _dvc_repro(root: Path, args: list[str], trigger: str = "rmpipe rebuild") -> dict[str, list[str]]:
    """Run `dvc <args>` streaming its output into the flow's log; which stages ran and which were up to date.

    `trigger` reaches the export stage, which records it in the run history (rmpipe.history)."""
    logger = get_run_logger()
    dvc_activity.wait_until_idle(root)  # a manual `dvc repro` finishes first: runs never interleave
    logger.info("$ dvc %s", " ".join(args))
    env = {**_subprocess_env(), TRIGGER_ENV: trigger}
    proc = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=root, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        lines.append(line)
        if line.strip():
            logger.info("%s", line)
    code = proc.wait()
    ran = [m.group(1) for line in lines if (m := _RAN.search(line))]
    skipped = [m.group(1) for line in lines if (m := _SKIPPED.search(line))]
    if code == 0:
        return {"ran": ran, "skipped": skipped}
    # The lines that say what went wrong (stage `error:`/`FAIL` lines, DVC's ERROR), else the last few.
    errors = [line for line in lines if re.match(r"\s*(ERROR|error:|FAIL)", line)]
    tail = "\n".join(errors[-10:] or [line for line in lines[-8:] if line.strip()])
    if code < 0 or any(marker in "\n".join(lines[-40:]) for marker in TRANSIENT_MARKERS):
        raise TransientFailure(f"dvc {args[0]} was interrupted or blocked by another DVC run (exit {code}); "
                               f"retrying once it is done\n{tail}")
    raise StageFailed(f"dvc {' '.join(args)} failed (exit {code}); stages that ran: {ran or 'none'}\n{tail}")


def _has_git(root: Path) -> bool:
    return subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=root,
                          capture_output=True).returncode == 0


@contextlib.contextmanager
def _tracked_run(root: Path, run_id: str | None) -> Iterator[None]:
    """Children die with this process; flow runs left RUNNING by dead processes are marked Crashed."""
    orphans.tie_descendants_to_this_process()
    try:
        orphans.crash_stale_runs(root)
    except Exception as exc:  # noqa: BLE001 - bookkeeping must never stop a rebuild
        logging.getLogger("rmpipe.flows").warning("could not check for crashed flow runs (%s)", exc)
    orphans.flow_run_started(root, run_id)
    try:
        yield
    finally:
        orphans.flow_run_finished(root, run_id)


def _incoming_dir(root: Path) -> Path | None:
    """collect.incoming_dir, or None for a project without a collect stage (nothing to admit)."""
    params = load_params(root / "params.yaml")
    if "collect" not in params:
        return None
    return root / get(section(params, "collect"), "incoming_dir", str, "collect")


def _names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_file()} if folder.is_dir() else set()


@flow(name="rebuild", log_prints=True)
@fails_cleanly
def rebuild(targets: list[str] | None = None, set_params: list[str] | None = None, force: bool = False,
            project: str | None = None, trigger: str = "rmpipe rebuild") -> dict[str, Any]:
    """Admit every queued batch, then `dvc repro [targets]`: DVC re-runs what is stale and records every
    input hash in dvc.lock; then complete the run records of the batches that reached the model.

    `set_params` (["train.epochs=1", ...]) goes through `dvc exp run -S`, which
    writes the values into params.yaml before running, so the lineage names them.
    """
    root = find_project_root(project)
    targets = list(targets or [])
    if set_params:
        if not _has_git(root):
            raise UserError("parameter overrides run as a DVC experiment (dvc exp run -S), which needs a git "
                            "repository; without git, edit params.yaml and run rebuild again")
        args = ["exp", "run", *(a for kv in set_params for a in ("-S", kv))]
    else:
        args = ["repro"]
    if force:
        args.append("--force")
    args.extend(targets)
    run_id = str(flow_run.id) if flow_run.id else None
    logger = get_run_logger()
    with _tracked_run(root, run_id), pipeline_lock(root):
        incoming = _incoming_dir(root)
        admitted = admit_queued(root, incoming, run_id) if incoming is not None else []
        if admitted:
            logger.info("admitted into %s: %s", incoming.relative_to(root), ", ".join(admitted))
        try:
            stages = run_task(_dvc_repro, root, args, trigger)
        except Exception as exc:
            if incoming is not None:
                records.mark_failed(root, str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc),
                                    _names(incoming))
            raise
        lock = root / "dvc.lock"
        lock_sha = hashlib.sha256(lock.read_bytes()).hexdigest() if lock.exists() else None
        result = {**stages, "dvc_lock_sha256": lock_sha, "admitted": admitted, "flow_run_id": run_id}
        if incoming is not None and not targets:
            result["records_completed"] = _settle_records(root, incoming, result)
    logger.info("ran %s; up to date %s", stages["ran"] or "nothing", stages["skipped"] or "nothing")
    return result


def _settle_records(root: Path, incoming: Path, built: dict[str, Any]) -> list[str]:
    """After a successful full rebuild: read the gate, push, and complete every pending run record."""
    if not (root / RUNS_DIR).is_dir() and not built["admitted"]:
        return []  # nothing delivered through rmpipe here yet (e.g. a plain `make repro` project)
    gate = promotion(root)
    lineage = set(gate.get("batch_ids") or []) if gate.get("export_path") else None
    if not records.needs_reconciling(root, lineage):
        return []
    pushed = push_to_remote(root, return_state=True)  # a push that still fails after retries is reported
    push = {"remote": pushed.result()} if pushed.is_completed() else {"error": pushed.message}
    details = {"rebuild": {k: built[k] for k in ("ran", "skipped", "dvc_lock_sha256", "flow_run_id", "admitted")},
               "metrics": read_metrics(root), "promotion": gate, "export_path": gate.get("export_path"),
               "dvc_push": push}
    return records.reconcile(root, lineage, _names(incoming), details, built["flow_run_id"])


# --- a new batch arrives -----------------------------------------------------------------------------

def find_registered(batch: Path, incoming: Path, sha: str) -> tuple[Path, str] | None:
    """A file in `incoming` that already is this batch (same content, or same name): (file, why)."""
    if not incoming.is_dir():
        return None
    same_name = incoming / batch.name
    if same_name.exists():
        if io.sha256_file(same_name) == sha:
            return same_name, "already registered (same name and content)"
        return same_name, ("a different file with this batch id is already registered; "
                           "rename the file to deliver it as a new batch")
    size = batch.stat().st_size
    for other in incoming.iterdir():  # only files of equal size can have equal content
        if other.is_file() and not other.name.startswith(".") and other.stat().st_size == size:
            if io.sha256_file(other) == sha:
                return other, f"same content as the registered batch {other.name}"
    return None


def register_batch(batch: Path, incoming: Path) -> Path:
    """Copy the batch into data/incoming/ under its batch id, atomically (temp name + rename).

    data/incoming is a dependency of the collect stage, so the next `dvc repro`
    hashes the new file into dvc.lock: that is the batch's registration with DVC.
    """
    dest = incoming / batch.name
    with io.atomic_path(dest) as tmp:
        shutil.copyfile(batch, tmp)
    return dest


def queue_lock(root: Path):
    """Short lock around the duplicate check + queueing, and around admitting the queue."""
    return pipeline_lock(root, QUEUE_LOCK_FILE)


class AdmissionFailed(UserError):
    """A queued batch could not be moved into data/incoming (e.g. permissions); it stays queued."""


def admit_queued(root: Path, incoming: Path, run_id: str | None = None) -> list[str]:
    """Move every queued batch into `incoming` (names in order) and mark their records admitted.

    Call under `pipeline_lock`. The move happens under DVC's rwlock guard while no DVC stage
    holds a lock on `incoming` (`dvc_activity.inputs_guard`), so a manual `dvc repro` never
    records a batch its collect did not read. A batch that cannot be moved stays queued.
    """
    queue = root / QUEUE_DIR
    moved: list[str] = []
    with queue_lock(root):
        names = sorted(p.name for p in queue.iterdir() if p.is_file() and not p.name.startswith(".")) \
            if queue.is_dir() else []
        if not names:
            return []
        try:
            incoming.mkdir(parents=True, exist_ok=True)
            with dvc_activity.inputs_guard(root, incoming):
                for name in names:
                    os.replace(queue / name, incoming / name)  # same filesystem: atomic
                    moved.append(name)
        except OSError as exc:
            left = [n for n in names if n not in moved]
            raise AdmissionFailed(
                f"cannot move queued batch {left[0]} into {incoming.relative_to(root)} ({exc.strerror or exc}); "
                f"{len(left)} batch(es) stay queued in {QUEUE_DIR}: fix the folder's permissions, then run "
                "`rmpipe rebuild` (or deliver any batch) to take them in") from None
        finally:
            if moved:
                records.mark_admitted(root, moved, run_id)
    return moved


def reject_batch(batch: Path, rejected_dir: Path, reasons: list[str]) -> Path:
    """Move a rejected batch out of the delivery folder, with its reasons beside it."""
    rejected_dir.mkdir(parents=True, exist_ok=True)
    dest = rejected_dir / batch.name
    if dest.exists():  # keep earlier rejections of a same-named file
        dest = rejected_dir / f"{batch.stem}.{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}{batch.suffix}"
    try:
        shutil.move(str(batch), dest)
    except OSError as exc:  # e.g. an unreadable file on another filesystem: leave it, say so
        reasons = [*reasons, f"could not move it to {rejected_dir} ({exc.strerror or exc}); it is left at {batch}"]
        dest = batch
    io.write_json(rejected_dir / f"{dest.name}.reasons.json", {"batch_id": batch.name, "reasons": reasons})
    return dest


@task(cache_policy=NO_CACHE, task_run_name="check {batch.name}")
@fails_cleanly
def quick_check(batch: Path, root: Path) -> dict[str, Any]:
    """The collect stage's logic on this one file: accepted or rejected, and why."""
    from rmpipe import retractions
    from rmpipe.collect import check_batch

    cfg = section(load_params(root / "params.yaml"), "collect")
    report = dict(check_batch(batch, cfg, retractions.load(root)).report)  # a retracted batch is refused
    accepted = report.get("status") == "accepted"
    reasons = [f"{r['reason']} x{r['count']} (e.g. {r['example']})" if isinstance(r, dict) else str(r)
               for r in report.get("top_reasons") or []]
    if accepted and not report.get("rows_normalized"):  # it would be registered yet never reach a model
        accepted, reasons = False, ["the batch has no usable vote rows (an empty file?): nothing to train on"]
    message = str(report.get("message") or "; ".join(reasons) or f"status {report.get('status')!r}")
    if not accepted and not reasons:  # e.g. refused unread (too large, a symlink): the message is the reason
        reasons = [message]
    return {"accepted": accepted, "reasons": reasons, "message": message, "report": report}


def read_metrics(root: Path) -> dict[str, Any]:
    """The workspace's metrics files (dvc.yaml `metrics:`), read by DVC: {metrics file: values}.

    DVC names the workspace revision "workspace" in one version and "" in another; asked
    for no revision, it answers only the workspace, so the one entry is taken whatever its key.
    A metrics file DVC cannot read is left out (it is named in the log).
    """
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        revs = repo.metrics.show()
    workspace = next(iter(revs.values()), None) or {}
    metrics = {}
    for name, entry in (workspace.get("data") or {}).items():
        if "data" in entry:
            metrics[name] = entry["data"]
        else:
            logging.getLogger("rmpipe.flows").warning("metrics file %s unreadable: %s", name, entry.get("error"))
    return metrics


def promotion(root: Path) -> dict[str, Any]:
    """The promotion gate's decision for the model this rebuild exported.

    The export stage applies the gate inside `dvc repro` (so the decision is part of
    the DVC-tracked run and its lineage manifest); here we read it back with the
    batches the model was trained on.
    """
    cfg = load_params(root / "params.yaml").get("export")
    if not isinstance(cfg, dict) or "out_dir" not in cfg:
        return {"export_path": None, "promoted": False, "reason": "this pipeline has no export stage yet"}
    from rmpipe.lineage import manifest_sha256, read_manifest

    export_dir = root / str(cfg["out_dir"])
    manifest = read_manifest(export_dir)
    decision = manifest.get("promotion") or {}
    batches = sorted({b for ids in (manifest.get("batch_ids") or {}).values() for b in ids})
    promoted_dir = cfg.get("promoted_dir")
    return {"export_path": str(cfg["out_dir"]), "manifest_sha256": manifest_sha256(export_dir),
            "batch_ids": batches, "promoted": bool(decision.get("promoted")), "reason": decision.get("reason"),
            "promoted_path": str(promoted_dir) if decision.get("promoted") and promoted_dir else None}


@task(retries=TRANSIENT_RETRIES, retry_delay_seconds=30, retry_condition_fn=_retry_transient_only,
      cache_policy=NO_CACHE)
def push_to_remote(root: Path) -> str | None:
    """`dvc push` when the project has a default DVC remote: the new outputs become recoverable elsewhere."""
    found = _dvc(root, "remote", "default")
    remote = found.stdout.strip()
    if found.returncode != 0 or not remote:  # "No default remote set" (exit 251)
        return None
    proc = _dvc(root, "push")
    if proc.returncode != 0:
        raise TransientFailure(f"dvc push to '{remote}' failed: {proc.stderr.strip()[-500:]}")
    return remote


class BatchRefused(UserError):
    """The delivered file cannot be taken as a batch as it is (e.g. its name is too long); it is left in place."""


def _batch_run_name() -> str:
    return records.safe_name(Path(flow_run.parameters.get("batch_path", "?")).name, 120)


@flow(name="on-new-batch", flow_run_name=_batch_run_name, log_prints=True)
@fails_cleanly
def on_new_batch(batch_path: str, project: str | None = None) -> dict[str, Any]:
    """Check, queue and train on one delivered batch; returns its run record (`records`).

    Outcomes: `duplicate` (already registered or queued: nothing new), `rejected` (moved to
    data/rejected/ with reasons; the flow fails with them), `refused` (the name is too long:
    left in place), `accepted` (admitted and rebuilt, in the exported model's lineage; the
    record holds metrics, export path and the promotion decision), `failed` / `not_in_model`
    (completed by a later rebuild).
    """
    root = find_project_root(project)
    with _tracked_run(root, str(flow_run.id) if flow_run.id else None):
        return _deliver(Path(batch_path).expanduser().resolve(), root)


def _deliver(batch: Path, root: Path) -> dict[str, Any]:
    logger = get_run_logger()
    summary: dict[str, Any] = {"batch_id": batch.name, "batch_sha256": None, "source": str(batch),
                               "flow_run_id": str(flow_run.id) if flow_run.id else None, "started": records.now()}

    def finish(outcome: str, **fields: Any) -> dict[str, Any]:  # a record of its own: never `accepted`
        summary.update(outcome=outcome, finished=records.now(), **fields)
        records.write_new(root, summary)
        return summary

    def reject(reasons: list[str], message: str, **fields: Any) -> None:
        moved = reject_batch(batch, root / REJECTED_DIR, reasons)
        finish("rejected", reasons=reasons, rejected_path=str(moved.relative_to(root)) if moved.is_relative_to(root)
               else str(moved), **fields)
        raise BatchRejected(f"batch {batch.name} rejected ({message})")

    size = len(batch.name.encode("utf-8", "surrogateescape"))
    if size > records.MAX_NAME_BYTES:  # its temp and record names would not fit the file system's 255
        reason = (f"file name is {size} bytes long, over {records.MAX_NAME_BYTES}: rename it shorter (the name is "
                  "the batch id); it is left where it is")
        finish("refused", reasons=[reason])
        raise BatchRefused(f"batch {records.safe_name(batch.name, 60)} refused: {reason}")
    if not batch.is_file():
        raise UserError(f"batch file {batch} not found (was it moved after the event fired?)")
    incoming = root / get(section(load_params(root / "params.yaml"), "collect"), "incoming_dir", str, "collect")
    try:
        sha = summary["batch_sha256"] = io.sha256_file(batch)
    except OSError as exc:  # e.g. chmod 000
        reason = f"cannot read the file ({exc.strerror or exc}): fix its permissions and deliver it again"
        reject([reason], reason)

    if (hit := find_registered(batch, incoming, sha)) is not None:
        logger.info("batch %s: duplicate, nothing to do (%s)", batch.name, hit[1])
        return finish("duplicate", reasons=[hit[1]])

    check = run_task(quick_check, batch, root)
    if not check["accepted"]:
        reject(check["reasons"], check["message"], check=check["report"])

    own = None
    with queue_lock(root):  # a second delivery of the same batch may have been queued meanwhile
        hit = find_registered(batch, incoming, sha)
        if hit is None and (queued := find_registered(batch, root / QUEUE_DIR, sha)) is not None:
            if queued[1].startswith("already registered"):  # the same file, still waiting: take it in now
                hit = (queued[0], "already queued by an earlier delivery and not yet admitted: this run takes it in")
            else:
                hit = queued
        if hit is not None and not hit[1].startswith("already queued"):
            logger.info("batch %s: duplicate, nothing to do (%s)", batch.name, hit[1])
            return finish("duplicate", reasons=[hit[1]])
        if hit is None:  # record first, then queue: a kill in between leaves a record, never a silent batch
            own = records.write_new(root, {**summary, "outcome": "queued", "reasons": [], "check": check["report"]})
            register_batch(batch, root / QUEUE_DIR)
            logger.info("queued %s for the next rebuild", batch.name)

    with pipeline_lock(root):
        if own is not None and (record := records.read(root, own["summary_path"]))["outcome"] == "accepted":
            logger.info("batch %s was taken in and trained by an earlier rebuild", batch.name)
            return record  # a rebuild that ran while we waited took this batch in: nothing left to do
        # admits the queue (this batch too), rebuilds, completes the records
        built = rebuild(project=str(root), trigger=f"on-new-batch {batch.name}")
    if own is None:
        return finish("duplicate", reasons=[hit[1]], rebuild=built)
    return records.read(root, own["summary_path"])


if __name__ == "__main__":  # python -m pipeline.flows STAGE: one stage as a Prefect flow, outside DVC
    import argparse

    from rmpipe.errors import exits_cleanly
    from rmpipe.progress import setup_logging

    @exits_cleanly
    def _main(argv: list[str]) -> None:
        setup_logging()
        parser = argparse.ArgumentParser(prog="python -m pipeline.flows", description="run one stage as a Prefect flow")
        parser.add_argument("stage", help="a stage name from dvc.yaml")
        run_stage(stage=parser.parse_args(argv).stage)

    _main(sys.argv[1:])
