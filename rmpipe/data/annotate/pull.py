"""`rmpipe annotate pull`: the annotations finished since the last pull -> one batch + its source record.

Each pull takes a new export snapshot of the project (Label Studio keeps it, with an id and an md5),
turns every annotation no earlier pull took into a row (`judgements`) and writes, atomically:
  <out>/label-studio-<project>-e<export id>.jsonl              the batch (vote rows or ranked rows)
  <out>/label-studio-<project>-e<export id>.jsonl.source.json  tool, server, project, export, the
      annotation ids taken and the left-out annotations with their reasons (collect copies it into
      reports/collect.json and the export's lineage)
The sidecar is written first, then the batch, then the cursor (`.rmpipe/annotate/<project>.json`,
rmpipe's git-ignored state). A pull killed before the cursor moved is caught up by the next one:
it reads back the sidecars already in <out>, so no judgement is ever in two batches. One pull per
project at a time (a file lock). Nothing new: no file, `None`, and the snapshot is deleted again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rmpipe.core import io
from rmpipe.core.errors import DataError
from rmpipe.data.annotate.client import Client
from rmpipe.data.annotate.judgements import rows_of

STATE_DIR = Path(".rmpipe") / "annotate"
SOURCE_SUFFIX = ".source.json"  # the same sidecar `rmpipe import` writes (collect.hf_batches.SOURCE_SUFFIX)
TOOL = "label-studio"


def slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:60] or "project"


@contextlib.contextmanager
def _one_pull(state_dir: Path, name: str) -> Iterator[None]:
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # a second pull of this project waits, then finds nothing new
        yield


def read_cursor(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"annotations": {}, "judged": {}, "batches": [], "left_out": []}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"pull cursor {path} is unreadable ({exc}): restore it, or remove it to pull every "
                        "annotation again (the batches already in data/incoming are still recognised)") from None


def _catch_up(cursor: dict, out_dir: Path, project_id: int) -> None:
    """Take into the cursor what sidecars in `out_dir` say earlier pulls of this project exported."""
    for sidecar in sorted(out_dir.glob(f"label-studio-*{SOURCE_SUFFIX}")) if out_dir.is_dir() else []:
        try:
            source = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if source.get("tool") != TOOL or source.get("project_id") != project_id:
            continue
        if source.get("batch_file") not in cursor["batches"]:
            _advance(cursor, source)


def _advance(cursor: dict, source: dict) -> None:
    cursor["annotations"].update({str(a): u for a, u in source.get("annotations", {}).items()})
    cursor["judged"].update(source.get("judged", {}))
    cursor["left_out"].extend(source.get("left_out", []))
    if source.get("batch_file"):
        cursor["batches"].append(source["batch_file"])


def new_annotations(tasks: list[dict], cursor: dict) -> tuple[set[int], list[dict]]:
    """Annotation ids no pull took yet, and left-out entries for ones edited after they were taken."""
    seen, new, edited = cursor["annotations"], set(), []
    for task in tasks:
        for annotation in task.get("annotations") or []:
            key = str(annotation["id"])
            if key not in seen:
                new.add(annotation["id"])
            elif seen[key] != annotation.get("updated_at"):
                edited.append({"reason_code": "edited_after_pull", "label_studio_task": task["id"],
                               "label_studio_annotation": annotation["id"], "task_id": task["data"].get("task_id"),
                               "reason": f"changed in Label Studio after it was pulled (at {seen[key]}); "
                                         "the pulled judgement stands", "updated_at": annotation.get("updated_at")})
    return new, edited


def pull(client: Client, project_title: str, out_dir: Path, root: Path = Path(".")) -> dict[str, Any]:
    """Pull once; returns a summary (`batch`: the file written, or None when nothing new came)."""
    project = client.find_project(project_title)
    if project is None:
        raise DataError(f"no Label Studio project {project_title!r} at {client.conn.url}: push tasks first "
                        "(`rmpipe annotate push TASKS --project NAME`)")
    name, state_dir = slug(project_title), root / STATE_DIR
    out_dir = Path(out_dir)
    with _one_pull(state_dir, name):
        cursor_path = state_dir / f"{name}.json"
        cursor = read_cursor(cursor_path)
        _catch_up(cursor, out_dir, project["id"])
        export, raw = client.snapshot_export(project["id"])
        tasks = json.loads(raw)
        new_ids, edited = new_annotations(tasks, cursor)
        edited = [e for e in edited if e not in cursor["left_out"]]
        rows, left = rows_of(tasks, new_ids, client.users(), project_title, cursor["judged"])
        left += edited
        source = _source(client, project, export, raw, tasks, new_ids, rows, left)
        batch = None
        if rows:
            batch = out_dir / f"label-studio-{name}-e{export['id']}.jsonl"
            source["batch_file"] = batch.name
            _write_batch(batch, rows, source)
        if not rows and not left:  # nothing new: the snapshot is not kept (a scheduled pull would pile them up)
            client.call("DELETE", f"/api/projects/{project['id']}/exports/{export['id']}")
            return {"project": project_title, "project_id": project["id"], "export_id": export["id"],
                    "batch": None, "rows": 0, "left_out": {}}
        _advance(cursor, source)
        io.write_json(cursor_path, cursor)  # last: a batch in place before the cursor says it was taken
    return {"project": project_title, "project_id": project["id"], "export_id": export["id"],
            "batch": str(batch) if batch else None, "rows": len(rows), "left_out": _count(left)}


def _write_batch(batch: Path, rows: list[dict], source: dict) -> None:
    if batch.exists():
        raise DataError(f"{batch} exists already (export ids repeat only with a new Label Studio database): "
                        "move it away and pull again")
    text = "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)
    source["batch_sha256"] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    io.write_json(batch.with_name(batch.name + SOURCE_SUFFIX), source)  # first: the batch never arrives alone
    io.write_text(batch, text)


def _count(entries: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry["reason_code"]] = counts.get(entry["reason_code"], 0) + 1
    return counts


def _source(client: Client, project: dict, export: dict, raw: bytes, tasks: list[dict], new_ids: set[int],
            rows: list[dict], left: list[dict]) -> dict[str, Any]:
    """The sidecar: which tool, server, project and export; what was taken, what was left out and why."""
    updated = {a["id"]: a.get("updated_at") for t in tasks for a in t.get("annotations") or []}
    return {
        "tool": TOOL, "label_studio_version": client.version(), "url": client.conn.url,
        "project_id": project["id"], "project_title": project.get("title"),
        "export_id": export["id"], "export_title": export.get("title"), "export_created_at": export.get("created_at"),
        "export_md5": export.get("md5"), "export_sha256": hashlib.sha256(raw).hexdigest(),
        "pulled_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": len(rows), "left_out_counts": _count(left),
        "annotations": {str(a): updated.get(a) for a in sorted(new_ids)},
        "judged": {f"{r['label_studio_task']}|{r['annotator_id']}": _judgement(r) for r in rows},
        "left_out": left, "batch_file": None,
    }


def _judgement(row: dict) -> dict:
    return {k: row[k] for k in ("choice", "strength", "ranking") if k in row}
