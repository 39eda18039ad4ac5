"""The batch registry: which delivered files are batches of this project, and where each one waits.

    data/incoming/         registered batches (collect's input; a batch's registration with DVC is the
                           next `dvc repro` hashing it into dvc.lock)
    .rmpipe/queue/         accepted batches waiting for the next rebuild (`admit_queued` moves them in)
    data/rejected/         rejected batches, each with its reasons beside it (no stage reads it)

A delivery is first copied into rmpipe's state folder (`staged_copy`); that copy is what is hashed,
checked by collect's own logic (`quick_check`), compared with what is registered or queued
(`find_registered`) and moved into the queue: the bytes checked are the bytes queued, whatever happens
to the delivered file meanwhile. The next rebuild admits the queue under DVC's rwlock guard; where
data/ is on another filesystem, a batch is copied to a temp name inside data/incoming and renamed there.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline import prefect_env

prefect_env.configure()  # before `import prefect`: Prefect reads its settings at import

from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from pipeline import dvc_activity, records  # noqa: E402
from pipeline.locks import STATE_DIR, queue_lock  # noqa: E402
from pipeline.tasks import fails_cleanly  # noqa: E402
from rmpipe.core import io  # noqa: E402
from rmpipe.core.errors import UserError  # noqa: E402
from rmpipe.core.params import PARAMS_FILE, load_params  # noqa: E402
from rmpipe.core.settings import CollectSettings  # noqa: E402

SOURCE_SUFFIX = ".source.json"  # a batch's source record (`rmpipe import`, `rmpipe annotate pull`) travels with it
REJECTED_DIR = Path("data/rejected")  # rejected batches + their reasons; no stage reads it
QUEUE_DIR = STATE_DIR / "queue"  # accepted batches waiting for the next rebuild
STAGING_DIR = STATE_DIR / "staging"  # a delivery's private copy while it is hashed and checked


def incoming_dir(root: Path) -> Path | None:
    """collect.incoming_dir, or None for a project without a collect stage (nothing to admit)."""
    params = load_params(root / PARAMS_FILE)
    if "collect" not in params:
        return None
    return root / CollectSettings.parse(params).incoming_dir


def file_names(folder: Path) -> set[str]:
    """Names of the files directly in `folder` (none when it does not exist)."""
    return {p.name for p in folder.iterdir() if p.is_file()} if folder.is_dir() else set()


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


@contextlib.contextmanager
def staged_copy(batch: Path, root: Path) -> Iterator[Path]:
    """A private copy of `batch`, under its own name (its batch id), in rmpipe's state folder; removed on exit
    unless `queue_batch` moved it into the queue. One read of the delivered file; all later reads are of this copy."""
    (root / STAGING_DIR).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="delivery-", dir=root / STAGING_DIR))
    try:
        copy = folder / batch.name
        shutil.copyfile(batch, copy)
        if (source := batch.with_name(batch.name + SOURCE_SUFFIX)).is_file():  # the lineage's record of its origin
            shutil.copyfile(source, folder / source.name)
        yield copy
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def move_into(source: Path, dest: Path) -> None:
    """Move `source` to `dest` atomically: a rename, or across filesystems (EXDEV) a copy to a temp name inside
    `dest`'s folder renamed there, then `source` removed. `dest` never exists half-written."""
    try:
        os.replace(source, dest)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    with io.atomic_path(dest) as tmp:  # temp name beside dest: same filesystem, so the rename is atomic
        shutil.copyfile(source, tmp)
    source.unlink()


def _cannot_admit(exc: OSError) -> str:
    """What to do about a queued batch that could not be moved, by cause."""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "fix the folder's permissions"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free space on its filesystem"
    return "fix the cause"


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
        names = sorted((p.name for p in queue.iterdir() if p.is_file() and not p.name.startswith(".")),
                       key=lambda name: (not name.endswith(SOURCE_SUFFIX), name)) if queue.is_dir() else []
        if not names:
            return []
        try:
            incoming.mkdir(parents=True, exist_ok=True)
            with dvc_activity.inputs_guard(root, incoming):
                for name in names:
                    move_into(queue / name, incoming / name)  # a rename; across filesystems copy + rename
                    moved.append(name)
        except OSError as exc:
            left = [n for n in names if n not in moved]
            raise AdmissionFailed(
                f"cannot move queued batch {left[0]} into {incoming.relative_to(root)} ({exc.strerror or exc}); "
                f"{len(left)} batch(es) stay queued in {QUEUE_DIR}: {_cannot_admit(exc)}, then run "
                "`rmpipe rebuild` (or deliver any batch) to take them in") from None
        finally:
            moved = [name for name in moved if not name.endswith(SOURCE_SUFFIX)]  # records are of batches
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
    from rmpipe.data import retractions
    from rmpipe.data.collect.run import check_batch

    cfg = CollectSettings.parse(load_params(root / PARAMS_FILE))
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


ALREADY_QUEUED = "already queued by an earlier delivery and not yet admitted: this run takes it in"


def queue_batch(batch: Path, root: Path, incoming: Path, sha: str, record: dict[str, Any]) -> tuple[dict | None, str | None]:
    """Move `batch` (the delivery's checked `staged_copy`) into the queue for the next rebuild unless it is
    already here: (its record, None) or (None, why not).

    Why not is `ALREADY_QUEUED` when this very file waits in the queue (the caller's rebuild takes it in), or
    a duplicate's reason. The record is written before the file is queued: a kill in between leaves a
    record, never a silent batch. The check and the queueing hold `queue_lock`, so a second delivery of the
    same batch meanwhile is seen.
    """
    with queue_lock(root):
        hit = find_registered(batch, incoming, sha)
        if hit is None and (queued := find_registered(batch, root / QUEUE_DIR, sha)) is not None:
            hit = (queued[0], ALREADY_QUEUED) if queued[1].startswith("already registered") else queued
        if hit is not None:
            return None, hit[1]
        own = records.write_new(root, record)
        (root / QUEUE_DIR).mkdir(parents=True, exist_ok=True)
        if (source := batch.with_name(batch.name + SOURCE_SUFFIX)).is_file():  # first: never a batch without it
            move_into(source, root / QUEUE_DIR / source.name)
        move_into(batch, root / QUEUE_DIR / batch.name)  # the very bytes that were hashed and checked
        return own, None
