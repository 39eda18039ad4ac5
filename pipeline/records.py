"""Run records: one per delivered batch, kept true to the model that was built.

`reports/runs/<time>-<batch>.json` is written when a batch is queued (`queued`), updated
when a rebuild moves it into data/incoming (`admitted`), and completed when a rebuild
finishes: `accepted` once the latest export's lineage lists it (or, in a project without
an export, once a full rebuild succeeded), `failed` when the rebuild failed (it is then
completed by the next one), `not_in_model` when the rebuild succeeded but no pair of
the model came from it (e.g. its pairs have too few votes yet). Every rebuild reconciles
all records that are not final, so a batch whose run was killed, or failed and was
trained later, still ends with exactly one `accepted` record; a batch that reached the
model without one (copied into data/incoming by hand) gets one marked `reconciled`.
Duplicates, rejections and refusals get a record of their own and never say `accepted`.
`rmpipe retract` turns a batch's records into `retracted` (with the retraction's id and reason).
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from rmpipe.core import io, schema

log = logging.getLogger("rmpipe.flows")

RUNS_DIR = Path("reports/runs")
PENDING = ("queued", "admitted", "failed", "not_in_model")  # completed by a later rebuild
MAX_NAME_BYTES = schema.MAX_BATCH_NAME_BYTES  # longer names are refused: derived names (temp, record) must fit 255


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


def safe_name(batch_id: str, limit: int = MAX_NAME_BYTES) -> str:
    """The batch id, or for an over-long one a shortened form with a hash, fit for a file name."""
    if len(batch_id.encode("utf-8")) <= limit:
        return batch_id
    digest = hashlib.sha256(batch_id.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return batch_id.encode("utf-8", "surrogateescape")[:limit - 13].decode("utf-8", "ignore") + "-" + digest


def write_new(root: Path, record: dict[str, Any]) -> dict[str, Any]:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    path = root / RUNS_DIR / f"{stamp}-{safe_name(record['batch_id'])}.json"
    record["summary_path"] = str(path.relative_to(root))
    io.write_json(path, record)
    return record


def update(root: Path, record: dict[str, Any], **fields: Any) -> dict[str, Any]:
    record.update(fields)
    io.write_json(root / record["summary_path"], record)
    return record


def all_records(root: Path) -> Iterator[dict[str, Any]]:
    folder = root / RUNS_DIR
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            log.warning("run record %s is unreadable; left as it is", path)
            continue
        if isinstance(record, dict) and "batch_id" in record:
            record["summary_path"] = str(path.relative_to(root))
            yield record


def read(root: Path, summary_path: str) -> dict[str, Any]:
    record = json.loads((root / summary_path).read_text(encoding="utf-8"))
    record["summary_path"] = summary_path
    return record


def pending(root: Path) -> dict[str, dict[str, Any]]:
    """batch id -> its record that is not final yet (the newest, if a batch somehow has two)."""
    return {r["batch_id"]: r for r in all_records(root) if r.get("outcome") in PENDING}


def mark_admitted(root: Path, names: list[str], run_id: str | None) -> None:
    open_ = pending(root)
    for name in names:
        fields = {"outcome": "admitted", "admitted_at": now(), "admitted_by": run_id, "admitted_with": names}
        if name in open_:
            update(root, open_[name], **fields)
        else:  # queued by a run killed before it wrote its record
            write_new(root, {"batch_id": name, "source": None, "started": now(), **fields,
                             "reconciled": "no record from its delivery (its run was killed); written at admission"})


def mark_retracted(root: Path, name: str, retraction: dict[str, Any]) -> list[dict[str, Any]]:
    """Every delivery record of batch `name` that is not closed otherwise (accepted or still pending) now says
    `retracted`, with the retraction's id, time, reason and who; what it said before stays in `was`."""
    changed = []
    for record in all_records(root):
        if record["batch_id"] == name and record.get("outcome") in ("accepted", *PENDING):
            changed.append(update(root, record, outcome="retracted", was=record.get("outcome"), retracted={
                key: retraction.get(key) for key in ("id", "time", "reason", "by")}))
    return changed


def mark_failed(root: Path, reason: str, incoming_names: set[str]) -> None:
    """A rebuild failed: the admitted batches wait for the next one (which completes their records)."""
    for record in pending(root).values():
        if record["outcome"] in ("admitted", "not_in_model") and record["batch_id"] in incoming_names:
            update(root, record, outcome="failed", reasons=[reason], finished=now())


def needs_reconciling(root: Path, lineage: set[str] | None) -> bool:
    """Is any record pending, or any batch of the lineage without an accepted record?"""
    found = list(all_records(root))
    accepted = {r["batch_id"] for r in found if r.get("outcome") == "accepted"}
    return any(r.get("outcome") in PENDING for r in found) or bool((lineage or set()) - accepted)


def reconcile(root: Path, lineage: set[str] | None, incoming_names: set[str], built: dict[str, Any],
              run_id: str | None) -> list[str]:
    """After a successful full rebuild: complete every pending record; returns the batch ids completed.

    `lineage`: batch ids of the latest export (None: the project has no export stage, so a
    successful rebuild is as far as a batch goes). `built`: what to record with an accepted
    batch (rebuild, metrics, promotion, export path).
    """
    open_ = pending(root)
    accepted = {r["batch_id"] for r in all_records(root) if r.get("outcome") == "accepted"}
    completed = []
    for name, record in open_.items():
        if name in accepted:  # already has its accepted record (e.g. a stale duplicate): close this one
            update(root, record, outcome="duplicate", reasons=["another record of this batch says accepted"],
                   finished=now())
            continue
        if name not in incoming_names:
            continue  # still queued: the next admission takes it in
        if lineage is None or name in lineage:
            late = record["outcome"] in ("failed", "not_in_model") or record.get("admitted_by") != run_id
            update(root, record, outcome="accepted", reasons=[], finished=now(), **built,
                   **({"reconciled": f"completed by a later rebuild (was {record['outcome']})"} if late else {}))
            accepted.add(name)
            completed.append(name)
        elif record["outcome"] != "not_in_model":
            update(root, record, outcome="not_in_model", finished=now(), reasons=[
                "the rebuild succeeded but no pair of the exported model came from this batch (e.g. its pairs "
                "have fewer than aggregate.min_votes votes); it stays in data/incoming and counts once later "
                "votes complete its pairs"])
    for name in sorted((lineage or set()) - accepted):  # reached the model with no record at all
        write_new(root, {"batch_id": name, "source": None, "outcome": "accepted", "reasons": [], "started": None,
                         "finished": now(), **built,
                         "reconciled": "no earlier record: registered without `rmpipe on-new-batch`, "
                                       "or its run was killed before writing one"})
        completed.append(name)
    return completed
