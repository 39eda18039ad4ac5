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

The flows' parts, one module each: `locks` (one rebuild at a time), `dvc_runner` (`dvc repro` in a
subprocess, its failures sorted), `registry` (registered, queued and rejected batches), `publish`
(metrics, the promotion decision, `dvc push`), `records` (a run record per delivered batch),
`tasks` (failures with a message, retries for transient trouble only).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterator

from pipeline import prefect_env

prefect_env.configure()  # before `import prefect`: Prefect reads its settings at import

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402

from pipeline import orphans, records  # noqa: E402
from pipeline.dvc_runner import dvc_repro, has_git  # noqa: E402
from pipeline.locks import STATE_DIR, pipeline_lock  # noqa: E402
from pipeline.prefect_env import find_project_root  # noqa: E402
from pipeline.publish import outcome_line, promotion, push_to_remote, read_metrics  # noqa: E402
from pipeline.registry import (  # noqa: E402
    ALREADY_QUEUED, REJECTED_DIR, admit_queued, file_names, find_registered, incoming_dir, queue_batch,
    quick_check, reject_batch, staged_copy,
)
from pipeline.tasks import (  # noqa: E402
    TRANSIENT_RETRIES, StageFailed, fails_cleanly, retry_transient_only, run_task,
)
from rmpipe.core import io  # noqa: E402
from rmpipe.core.errors import UserError  # noqa: E402
from rmpipe.core.params import PARAMS_FILE, load_params  # noqa: E402
from rmpipe.core.settings import CollectSettings  # noqa: E402
from rmpipe.core.paths import DVC_LOCK  # noqa: E402


class BatchRejected(UserError):
    """The delivered batch failed the quick check; it was moved to the rejected folder."""

    def __init__(self, name: str, message: str):
        super().__init__(f"batch {name} rejected: {message}")  # the run's last line, the reason spelled once
        self.state_message = f"batch {name} rejected (the reason: the line above, and {REJECTED_DIR}/{name}.reasons.json)"


# --- stages as flows ---------------------------------------------------------------------------

def dvc_stage_names(root: Path) -> list[str]:
    import yaml

    spec = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}
    return list((spec.get("stages") or {}).keys())


@task(retries=TRANSIENT_RETRIES, retry_delay_seconds=5, retry_condition_fn=retry_transient_only,
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
    _check_generated_deps(root)
    targets = list(targets or [])
    if set_params:
        if not has_git(root):
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
        incoming = incoming_dir(root)
        admitted = admit_queued(root, incoming, run_id) if incoming is not None else []
        if admitted:
            logger.info("admitted into %s: %s", incoming.relative_to(root), ", ".join(admitted))
        try:
            stages = run_task(dvc_repro, root, args, trigger)
        except Exception as exc:
            if incoming is not None:
                records.mark_failed(root, str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc),
                                    file_names(incoming))
            raise
        version = _register(root, trigger) if "export" in stages["ran"] else None
        lock = root / DVC_LOCK
        lock_sha = hashlib.sha256(lock.read_bytes()).hexdigest() if lock.exists() else None
        result = {**stages, "dvc_lock_sha256": lock_sha, "admitted": admitted, "flow_run_id": run_id,
                  "version": version}
        if incoming is not None and not targets:
            result["records_completed"] = _settle_records(root, incoming, result)
    logger.info("ran %s; up to date %s", stages["ran"] or "nothing", stages["skipped"] or "nothing")
    return result


def _check_generated_deps(root: Path) -> None:
    """`rmpipe deps --check` before every rebuild: a dvc.yaml whose code or param-file deps are stale would let
    DVC skip a stage whose inputs changed. Stages it cannot follow are named in the log, never skipped in silence."""
    from rmpipe.core import codedeps

    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.is_file():
        return  # DVC itself says so
    if line := codedeps.stale_line(dvc_yaml):
        raise UserError(line)
    for stage, why in codedeps.unchecked(dvc_yaml).items():
        get_run_logger().info("stage %s: code deps not checked (%s)", stage, why)


def _register(root: Path, trigger: str) -> dict[str, Any]:
    """The model this rebuild exported becomes a GTO version on the branch rmpipe/models (rmpipe.audit.registry):
    never a commit on the user's branch. Without git: one line saying why, and nothing else changes."""
    from rmpipe.audit.registry import register_export
    from rmpipe.core.settings import ExportSettings

    logger = get_run_logger()
    try:
        found = register_export(root, ExportSettings.parse(load_params(root / "params.yaml")).out_dir, trigger)
    except Exception as exc:  # noqa: BLE001 - e.g. git refused the tag: the model is built and recorded; say so
        found = {"note": f"registry: could not register the model: {str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)}",
                 "error": True}
    if "note" in found:
        (logger.warning if found.get("error") else logger.info)("%s", found["note"])
    else:
        logger.info("registered %s (stage: %s) on commit %s", found["tag"], found["stage"] or "none",
                    found["commit"][:12])
    return found


def _settle_records(root: Path, incoming: Path, built: dict[str, Any]) -> list[str]:
    """After a successful full rebuild: read the gate, push, and complete every pending run record."""
    if not (root / records.RUNS_DIR).is_dir() and not built["admitted"]:
        return []  # nothing delivered through rmpipe here yet (e.g. a plain `make repro` project)
    gate = promotion(root)
    lineage = set(gate.get("batch_ids") or []) if gate.get("export_path") else None
    if not records.needs_reconciling(root, lineage):
        return []
    pushed = push_to_remote(root, return_state=True)  # a push that still fails after retries is reported
    push = {"remote": pushed.result()} if pushed.is_completed() else {"error": pushed.message}
    details = {"rebuild": {k: built.get(k) for k in ("ran", "skipped", "dvc_lock_sha256", "flow_run_id", "admitted",
                                                     "version")},
               "metrics": read_metrics(root), "promotion": gate, "export_path": gate.get("export_path"),
               "dvc_push": push}
    return records.reconcile(root, lineage, file_names(incoming), details, built["flow_run_id"])


# --- a new batch arrives -----------------------------------------------------------------------------

class BatchRefused(UserError):
    """The delivered file cannot be taken as a batch as it is (e.g. its name is too long); it is left in place."""


def _batch_run_name() -> str:
    return records.safe_name(Path(flow_run.parameters.get("batch_path", "?")).name, 120)


@flow(name="on-new-batch", flow_run_name=_batch_run_name, log_prints=True)
@fails_cleanly
def on_new_batch(batch_path: str, project: str | None = None) -> dict[str, Any]:
    """Check, queue and train on one delivered batch; returns its run record (`records`).

    Outcomes: `duplicate` (already registered or queued: nothing new), `rejected` (moved to
    data/rejected/ with reasons; the flow fails with them), `refused` (the name is too long, or
    it is a symlink: left in place), `accepted` (admitted and rebuilt, in the exported model's lineage; the
    record holds metrics, export path and the promotion decision), `failed` / `not_in_model`
    (completed by a later rebuild).
    """
    root = find_project_root(project)
    with _tracked_run(root, str(flow_run.id) if flow_run.id else None):
        # the folder resolved, not the file: a symlink is refused, never registered under its target's name
        given = Path(batch_path).expanduser()
        summary = _deliver(given.parent.resolve() / given.name, root)
    get_run_logger().info("%s", outcome_line(summary))  # how it ended: the last line of the run (a rejection's is its error)
    return summary


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
        raise BatchRejected(batch.name, message)

    _refuse_long_name(batch, finish)
    _refuse_symlink(batch, finish)
    if not batch.is_file():
        raise UserError(f"batch file {batch} not found (was it moved after the event fired?)")
    incoming = root / CollectSettings.parse(load_params(root / PARAMS_FILE)).incoming_dir
    with contextlib.ExitStack() as stack:
        try:  # one read of the delivery: the copy is what is hashed, checked and queued
            staged = stack.enter_context(staged_copy(batch, root))
            sha = summary["batch_sha256"] = io.sha256_file(staged)
        except OSError as exc:  # e.g. chmod 000
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # our side: the batch itself is fine, leave it
                raise UserError(f"no space left to copy batch {batch.name} into {root / STATE_DIR} ({exc.strerror}): "
                                "free space there and deliver it again; the batch is left where it is") from None
            reason = f"cannot read the file ({exc.strerror or exc}): fix its permissions and deliver it again"
            reject([reason], reason)
        if (hit := find_registered(staged, incoming, sha)) is not None:
            logger.info("batch %s: duplicate, nothing to do (%s)", batch.name, hit[1])
            return finish("duplicate", reasons=[hit[1]])
        with _no_warnings("rmpipe.collect"):  # collect's WARNING of a refused batch: the flow's own line says it
            check = run_task(quick_check, staged, root)
        if not check["accepted"]:
            reject(check["reasons"], check["message"], check=check["report"])
        own, why_not = queue_batch(staged, root, incoming, sha,
                                   {**summary, "outcome": "queued", "reasons": [], "check": check["report"]})
    if why_not is not None and why_not != ALREADY_QUEUED:
        logger.info("batch %s: duplicate, nothing to do (%s)", batch.name, why_not)
        return finish("duplicate", reasons=[why_not])
    if own is not None:
        logger.info("queued %s for the next rebuild", batch.name)

    with pipeline_lock(root):
        if own is not None and (record := records.read(root, own["summary_path"]))["outcome"] == "accepted":
            logger.info("batch %s was taken in and trained by an earlier rebuild", batch.name)
            return record  # a rebuild that ran while we waited took this batch in: nothing left to do
        # admits the queue (this batch too), rebuilds, completes the records
        built = rebuild(project=str(root), trigger=f"on-new-batch {batch.name}")
    if own is None:
        return finish("duplicate", reasons=[why_not], rebuild=built)
    return records.read(root, own["summary_path"])


@contextlib.contextmanager
def _no_warnings(name: str) -> Iterator[None]:
    """The logger `name` without its WARNING records while the block runs (INFO and ERROR still show)."""
    def not_a_warning(record: logging.LogRecord) -> bool:
        return record.levelno != logging.WARNING

    logger = logging.getLogger(name)
    logger.addFilter(not_a_warning)
    try:
        yield
    finally:
        logger.removeFilter(not_a_warning)


def _refuse_symlink(batch: Path, finish) -> None:
    """A symlink is refused, as collect refuses one in data/incoming: the batch id would be the link's name and
    its bytes whatever the link points at later. Left in place."""
    if batch.is_symlink():
        reason = (f"it is a symbolic link (to {os.readlink(batch)}): deliver the file itself (copy it into the "
                  "delivery folder); the link is left where it is")
        finish("refused", reasons=[reason])
        raise BatchRefused(f"batch {records.safe_name(batch.name, 60)} refused: {reason}")


def _refuse_long_name(batch: Path, finish) -> None:
    """A name whose temp and record names would not fit the file system's 255 bytes: refused, left in place."""
    size = len(batch.name.encode("utf-8", "surrogateescape"))
    if size > records.MAX_NAME_BYTES:
        reason = (f"file name is {size} bytes long, over {records.MAX_NAME_BYTES}: rename it shorter (the name is "
                  "the batch id); it is left where it is")
        finish("refused", reasons=[reason])
        raise BatchRefused(f"batch {records.safe_name(batch.name, 60)} refused: {reason}")


if __name__ == "__main__":  # python -m pipeline.flows STAGE: one stage as a Prefect flow, outside DVC
    import argparse

    from rmpipe.core.errors import exits_cleanly
    from rmpipe.core.progress import setup_logging

    @exits_cleanly
    def _main(argv: list[str]) -> None:
        setup_logging()
        parser = argparse.ArgumentParser(prog="python -m pipeline.flows", description="run one stage as a Prefect flow")
        parser.add_argument("stage", help="a stage name from dvc.yaml")
        run_stage(stage=parser.parse_args(argv).stage)

    _main(sys.argv[1:])
