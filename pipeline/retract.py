"""`rmpipe retract`: take a batch or an annotator out of the training data, rebuild through DVC, record it.

A batch moves from data/incoming/ to data/retracted/ with its retraction beside it; an
annotator is added to `aggregate.exclude_annotators` in params.yaml (the way
`exclude_flagged` works), so the rebuilt lineage names the change. Either way the
retraction goes into the register first (rmpipe.data.retractions: a re-delivery is refused
from then on), then the pipeline is rebuilt with `dvc repro` (the rebuild flow: one run
at a time), and the outcome is written to audit/retractions/<id>.json: what was removed,
why, by whom, the model before and after with their metrics and promotion decision.

A promoted model trained on what is retracted stops being the promoted model (its
folder is removed before the rebuild), so the promotion gate does not measure the
rebuilt model against it.

`--purge` (batches only, now or later) deletes the quarantined file and every DVC cache
object the batch flowed into: the outputs of every recorded model built with it and of
every cached stage run downstream of it (the run cache), except objects the current
pipeline or a model built without the batch still uses. Their md5s are recorded.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline import own_commit, tainted
from rmpipe.audit import dvc_cache, history
from rmpipe.core import io
from rmpipe.data import retractions
from rmpipe.core.errors import DataError, UserError
from rmpipe.core.io import sha256_file
from rmpipe.core.params import PARAMS_FILE, load_params
from rmpipe.core.settings import AggregateSettings, CollectSettings, ExportSettings


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _who(by: str | None) -> str:
    if by:
        return by
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"


def _md5(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "md5").hexdigest()


def _content_hashes(source: Path) -> dict[str, Any]:
    """sha256 as collect computes it (a dataset folder: one digest over its files), DVC's md5 per file, size."""
    from rmpipe.data.collect.hf_batches import folder_files
    from rmpipe.core.io import folder_sha256

    if source.is_dir():
        files = folder_files(source)
        return {"sha256": folder_sha256(source), "md5": None, "bytes": sum(f.stat().st_size for f in files),
                "file_md5s": {f.relative_to(source).as_posix(): _md5(f) for f in files}}
    return {"sha256": sha256_file(source), "md5": _md5(source), "bytes": source.stat().st_size}


def _model_summary(record: dict[str, Any] | None) -> dict[str, Any] | None:
    if record is None:
        return None
    return {"seq": record.get("seq"), "model": history.model_id(record), "export_md5": record["model"].get("md5"),
            "batches": sorted(record.get("batches") or {}), "metrics": record.get("metrics"),
            "promotion": record.get("promotion")}


def _latest(root: Path) -> dict[str, Any] | None:
    records = history.read(root)
    return records[-1] if records else None


def _record(root: Path, entry: dict[str, Any], own_files: list) -> None:
    """The retraction into the history chain, and what rmpipe wrote for it into git (before the rebuild:
    the model built next is then not dirty by rmpipe's own hand)."""
    history.append(root, {"time": entry["time"], "retraction": entry}, kind=history.RETRACTION)
    own_commit.commit_own(root, own_files, f"rmpipe retract {entry['id']}: {entry['kind']} {entry['target']}\n\n"
                                           f"{entry['reason']} (by {entry.get('by')})")


def _rebuild(root: Path, trigger: str) -> dict[str, Any]:
    from pipeline.flows import rebuild

    return rebuild(project=str(root), trigger=trigger)


def _finish(root: Path, entry: dict[str, Any], before: dict | None, **fields: Any) -> dict[str, Any]:
    """Write the retraction's outcome record (once; never rewritten) and return it."""
    after = _latest(root)
    if after is not None and before is not None and after.get("seq") == before.get("seq"):
        after = None  # no new model was built
    outcome = {"retraction": entry, "finished": _now(), "before": _model_summary(before),
               "after": _model_summary(after), **fields}
    if after is not None:
        outcome["promotion"] = after.get("promotion")
    history.append(root, {"time": outcome["finished"], "retraction_id": entry["id"],
                          **{k: v for k, v in outcome.items() if k not in ("retraction", "finished")}},
                   kind=history.RETRACTION_OUTCOME)
    path = root / retractions.OUTCOMES / f"{entry['id']}.json"
    if path.exists():
        path = path.with_name(f"{entry['id']}.{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}.json")
    io.write_json(path, outcome)
    outcome["record_path"] = str(path.relative_to(root))
    return outcome


def _rebuild_and_finish(root: Path, entry: dict[str, Any], before: dict | None, trigger: str, fields: dict,
                        after_rebuild=None) -> dict[str, Any]:
    """Rebuild; the outcome is recorded whether the rebuild succeeds or fails."""
    try:
        built = _rebuild(root, trigger)
    except Exception as exc:
        _finish(root, entry, before, rebuild={"error": str(exc)}, **fields)
        raise
    if after_rebuild is not None:
        fields = {**fields, **after_rebuild()}
    return _finish(root, entry, before, rebuild=built, **fields)


# --- a batch ------------------------------------------------------------------------------------
def retract_batch(root: Path, name: str, reason: str, by: str | None = None, purge: bool = False,
                  rebuild: bool = True) -> dict[str, Any]:
    from pipeline.locks import pipeline_lock

    root = Path(root)
    reason = _check_reason(reason)
    params = load_params(root / PARAMS_FILE)
    incoming = root / CollectSettings.parse(params).incoming_dir
    promoted_dir = ExportSettings.parse(params).promoted_dir
    register_ = retractions.load(root)
    earlier = next((e for e in register_ if e.get("kind") == "batch" and e["target"] == name), None)
    if earlier is not None:
        if _unfinished(root, earlier):  # registered and moved, but the rebuild never finished (killed)
            return _resume(root, earlier, purge)
        if not purge:
            raise UserError(f"batch {name} is already retracted ({retractions.describe(earlier)}); "
                            "add --purge to delete its file and cache objects")
        with pipeline_lock(root):
            return _finish(root, earlier, _latest(root), purge=purge_batch(root, earlier))
    source = incoming / name
    if "/" in name or name.startswith(".") or not source.exists():
        known = sorted(p.name for p in incoming.iterdir() if not p.name.startswith(".")) if incoming.is_dir() else []
        raise UserError(f"no batch {name!r} in {incoming.relative_to(root)}; registered batches: "
                        f"{', '.join(known) or 'none'}")

    with pipeline_lock(root):  # no rebuild or admission runs while the batch moves
        before = _latest(root)
        dest = root / retractions.RETRACTED_DIR / name
        entry = retractions.register(root, {
            "time": _now(), "kind": "batch", "target": name, **_content_hashes(source), "reason": reason, "by": _who(by),
            "kept_at": str(dest.relative_to(root))})
        _record(root, entry, [retractions.REGISTER])
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(source), dest)
        io.write_json(dest.with_name(name + ".retraction.json"), entry)
        demoted = tainted.demote_promoted(root, promoted_dir, lambda r: name in (r.get("batches") or {}))
        deprecated = tainted.deprecate_versions(root, lambda r: name in (r.get("batches") or {}),
                                        f"retraction {entry['id']}: batch {name} ({reason})")
        fields: dict[str, Any] = {"removed": {"batch": name, "sha256": entry["sha256"], "moved_to": entry["kept_at"]},
                                  "demoted": demoted, "deprecated": deprecated}
        if not rebuild:
            return _finish(root, entry, before, rebuild=None, **fields)
        # The purge runs after the rebuild: the objects the rebuilt pipeline uses are then known (kept).
        return _rebuild_and_finish(root, entry, before, f"rmpipe retract batch {name} ({entry['id']})", fields,
                                   (lambda: {"purge": purge_batch(root, entry)}) if purge else None)


# --- an annotator -------------------------------------------------------------------------------
def retract_annotator(root: Path, annotator: str, reason: str, by: str | None = None,
                      rebuild: bool = True) -> dict[str, Any]:
    from dvc.utils.serialize import modify_yaml

    from pipeline.locks import pipeline_lock

    root = Path(root)
    reason = _check_reason(reason)
    params = load_params(root / PARAMS_FILE)
    promoted_dir = ExportSettings.parse(params).promoted_dir
    excluded = list(AggregateSettings.parse(params).exclude_annotators)
    earlier = next((e for e in retractions.load(root) if e.get("kind") == "annotator" and e["target"] == annotator), None)
    if earlier is not None and annotator in excluded and _unfinished(root, earlier):
        return _resume(root, earlier, False)
    if annotator in excluded or annotator in retractions.retracted_annotators(retractions.load(root)):
        raise UserError(f"annotator {annotator} is already retracted (aggregate.exclude_annotators in params.yaml)")
    latest = _latest(root)
    known = (latest or {}).get("annotators") or {}
    if annotator not in known:
        raise UserError(f"annotator {annotator!r} has no votes in the latest recorded model; known annotators: "
                        f"{', '.join(sorted(known)) or 'none (no run history yet: run dvc repro first)'}")

    with pipeline_lock(root):
        before = _latest(root)
        params_unchanged = own_commit.unchanged(root, "params.yaml")  # else the user's own edits are in it
        entry = retractions.register(root, {
            "time": _now(), "kind": "annotator", "target": annotator, "votes": known[annotator].get("votes"),
            "reason": reason, "by": _who(by), "params": "aggregate.exclude_annotators"})
        with modify_yaml(root / PARAMS_FILE) as data:  # DVC's round-trip YAML: comments and order stay
            data["aggregate"]["exclude_annotators"] = [*excluded, annotator]
        _record(root, entry, [retractions.REGISTER, *([PARAMS_FILE] if params_unchanged else [])])

        def used(r: dict[str, Any]) -> bool:
            info = (r.get("annotators") or {}).get(annotator) or {}
            return bool(info.get("votes")) and not info.get("excluded")

        demoted = tainted.demote_promoted(root, promoted_dir, used)
        deprecated = tainted.deprecate_versions(root, used, f"retraction {entry['id']}: annotator {annotator} ({reason})")
        fields = {"removed": {"annotator": annotator, "votes": entry["votes"],
                              "params": {"aggregate.exclude_annotators": [*excluded, annotator]}},
                  "demoted": demoted, "deprecated": deprecated}
        if not rebuild:
            return _finish(root, entry, before, rebuild=None, **fields)
        return _rebuild_and_finish(root, entry, before, f"rmpipe retract annotator {annotator} ({entry['id']})",
                                   fields)


def _unfinished(root: Path, entry: dict[str, Any]) -> bool:
    return not (root / retractions.OUTCOMES / f"{entry['id']}.json").exists()


def _resume(root: Path, entry: dict[str, Any], purge: bool) -> dict[str, Any]:
    """Finish a retraction whose rebuild was interrupted: rebuild now and write its outcome."""
    from pipeline.locks import pipeline_lock

    with pipeline_lock(root):
        fields = {"removed": {entry["kind"]: entry["target"]}, "resumed": True}
        return _rebuild_and_finish(root, entry, _latest(root), f"rmpipe retract {entry['kind']} {entry['target']} "
                                   f"({entry['id']}, resumed)", fields,
                                   (lambda: {"purge": purge_batch(root, entry)}) if purge else None)


def _check_reason(reason: str | None) -> str:
    if not reason or not reason.strip():
        raise UserError("a retraction needs a reason: --reason \"...\" (it is recorded and shown on re-delivery)")
    return reason.strip()


# --- purge --------------------------------------------------------------------------------------
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


def render(outcome: dict[str, Any]) -> str:
    """The outcome as a person reads it."""
    entry = outcome["retraction"]
    lines = [retractions.describe(entry)]
    if outcome.get("demoted"):
        lines.append(f"demoted: the promoted model {outcome['demoted']['model']} was built with it")
    if isinstance(outcome.get("deprecated"), list) and outcome["deprecated"]:
        lines.append(f"deprecated in the registry: {', '.join(outcome['deprecated'])}")
    elif isinstance(outcome.get("deprecated"), str):
        lines.append(outcome["deprecated"])
    for key in ("before", "after"):
        m = outcome.get(key)
        if m is None:
            lines.append(f"{key:7} -" if key == "before" else "after   no new model was built")
            continue
        acc = (m.get("metrics") or {}).get("accuracy")
        promo = m.get("promotion") or {}
        lines.append(f"{key:7} #{m['seq']} {m['model']}  accuracy {acc if acc is None else round(acc, 4)}  "
                     f"{'PROMOTED' if promo.get('promoted') else 'not promoted'}: {promo.get('reason')}")
    if outcome.get("purge"):
        p = outcome["purge"]
        lines.append(f"purged: {p['file']} (sha256 {p['sha256'][:16]}...) and {len(p['cache_objects_removed'])} "
                     f"DVC cache objects, {p['run_cache_entries_removed']} run-cache entries")
    lines.append(f"record: {outcome.get('record_path')}")
    return "\n".join(lines)


def to_json(outcome: dict[str, Any]) -> str:
    return json.dumps(outcome, indent=2, default=str)
