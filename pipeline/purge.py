"""`rmpipe retract --purge`: delete a retracted batch's file and every DVC cache object it flowed into.

The outputs of every recorded model built with it and of every cached stage run downstream of it (the
run cache) go, except objects the current pipeline or a model built without the batch still uses.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rmpipe.audit import dvc_cache, history
from rmpipe.core import io
from rmpipe.core.errors import DataError
from rmpipe.core.io import sha256_file
from rmpipe.data import retractions


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def purge_batch(root: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Delete the quarantined copy and every DVC cache object derived from the batch (see module doc)."""
    root = Path(root)
    name = entry["target"]
    batch_objects = {m for m in [entry.get("md5"), *(entry.get("file_md5s") or {}).values()] if m}
    records = history.read(root)
    tainted_records = [r for r in records if name in (r.get("batches") or {})]
    # What the batch reached: its objects, the data/incoming snapshots that held it, every output of a model
    # built with it, and (transitively, through the run cache) every stage run downstream of any of them.
    tainted, siblings = _incoming_snapshots(root, batch_objects)
    for record in tainted_records:
        tainted |= _record_md5s(record)
    runs = list(dvc_cache.run_cache_entries(root))
    tainted_runs = _downstream_runs(runs, tainted)
    # What must stay: the workspace's outputs (dvc.lock) and the outputs of every model built without it.
    keep = dvc_cache.lock_md5s(root)
    for record in records:
        if name not in (record.get("batches") or {}):
            keep |= _record_md5s(record)
    keep_objects = {o for m in keep for o in dvc_cache.objects_of(root, m)}
    delete = ({o for m in tainted for o in dvc_cache.objects_of(root, m)} - keep_objects - siblings) | batch_objects
    removed = []
    for md5 in sorted(m for m in delete if m):
        path = dvc_cache.object_path(root, md5)
        if path.exists():
            path.unlink()
            removed.append(md5)
    for path, deps, outs in runs:  # a run record pointing at deleted objects would restore nothing
        if path in tainted_runs or (deps | outs) & delete:
            path.unlink(missing_ok=True)
    quarantined = root / retractions.RETRACTED_DIR / name
    file_removed = quarantined.exists()
    copies = _remove_files(root, quarantined, entry.get("sha256"))
    left = [m for m in batch_objects if dvc_cache.object_path(root, m).exists()]
    if left:
        raise DataError(f"purge of {name}: its cache objects {left} are still there")
    result = {"time": _now(), "file": str(quarantined.relative_to(root)), "file_removed": file_removed,
              "sha256": entry.get("sha256"), "md5": entry.get("md5"), "cache_objects_removed": removed,
              "copies_removed": [str(p.relative_to(root)) for p in copies],
              "run_cache_entries_removed": len(tainted_runs),
              "models_affected": [history.model_id(r) for r in tainted_records]}
    io.write_json(quarantined.with_name(name + ".purge.json"), result)
    return result


def _record_md5s(record: dict[str, Any]) -> set[str]:
    """The DVC objects a history record names: its data outputs (code deps aside) and its models."""
    found = {v for k, v in (record.get("upstream_lock_md5") or {}).items() if v and not k.endswith(".py")}
    found |= {m for m in ((record.get("model") or {}).get("md5"),
                          ((record.get("promoted_model") or {}) or {}).get("md5")) if m}
    return found


def _incoming_snapshots(root: Path, batch_objects: set[str]) -> tuple[set[str], set[str]]:
    """(the batch's objects plus each data/incoming folder object that lists them, the other batches' files
    in those folders): the folders go, the other batches' files stay."""
    cache = dvc_cache.cache_root(root) / "files" / "md5"
    incoming_dirs = {f"{p.parent.name}{p.name}" for p in cache.glob("*/*.dir")
                     if batch_objects & set(dvc_cache.dir_listing(root, f"{p.parent.name}{p.name}").values())} \
        if cache.is_dir() else set()
    siblings = {m for d in incoming_dirs for m in dvc_cache.dir_listing(root, d).values()} - batch_objects
    return batch_objects | incoming_dirs, siblings


def _downstream_runs(runs: list, tainted: set[str]) -> set[Path]:
    """Run-cache entries downstream of anything in `tainted` (which grows by their outputs), including runs
    that never reached an export."""
    tainted_runs: set[Path] = set()
    grew = True
    while grew:
        grew = False
        for path, deps, outs in runs:
            if path not in tainted_runs and deps & tainted:
                tainted_runs.add(path)
                grew = grew or not outs <= tainted
                tainted |= outs
    return tainted_runs


def _remove_files(root: Path, quarantined: Path, sha256: str | None) -> list[Path]:
    """Remove the quarantined batch and every refused re-delivery of the same bytes (moved to the rejected
    folder); returns the copies removed."""
    from pipeline.registry import REJECTED_DIR

    if quarantined.is_dir():
        shutil.rmtree(quarantined)
    quarantined.unlink(missing_ok=True)
    rejected = root / REJECTED_DIR
    copies = [p for p in rejected.glob("*") if p.is_file() and not p.name.endswith(".reasons.json")
              and sha256 and sha256_file(p) == sha256] if rejected.is_dir() else []
    for copy in copies:
        copy.unlink()
    return copies


