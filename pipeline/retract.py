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

`--purge` (batches only, now or later; `pipeline.purge`) deletes the quarantined file and every DVC cache
object the batch flowed into: the outputs of every recorded model built with it and of
every cached stage run downstream of it (the run cache), except objects the current
pipeline or a model built without the batch still uses. Their md5s are recorded.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import signal
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline import own_commit, tainted
from pipeline.purge import purge_batch
from rmpipe.audit import history
from rmpipe.core import io
from rmpipe.data import retractions
from rmpipe.core.errors import UserError
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


KILL_AT = "RMPIPE_TEST_KILL_AT"  # tests only: SIGKILL this process at the named step (a real kill -9)


def _reached(step: str) -> None:
    """A step of a retraction is done; tests kill the process here to prove a re-run finishes it right."""
    if os.environ.get(KILL_AT) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def _uses(entry: dict[str, Any]):
    """`used(record)`: was this model built with what `entry` retracts (the batch, the annotator's votes)?"""
    if entry["kind"] == "batch":
        return lambda r: entry["target"] in (r.get("batches") or {})

    def used(r: dict[str, Any]) -> bool:
        info = (r.get("annotators") or {}).get(entry["target"]) or {}
        return bool(info.get("votes")) and not info.get("excluded")
    return used


def _trained_with(root: Path, entry: dict[str, Any]) -> dict[str, Any] | None:
    """The model 'before' a retraction: the latest recorded model built with what it retracts (None: none was),
    whatever was built since (a retraction re-run after a kill, another batch delivered meanwhile)."""
    used = _uses(entry)
    return next((r for r in reversed(history.read(root)) if used(r)), None)


def _built_without(root: Path, entry: dict[str, Any]) -> dict[str, Any] | None:
    """The model 'after' a retraction: the latest model recorded after the retraction and built without what it
    retracts (a rebuild that found nothing stale leaves the one an interleaved rebuild made), or None."""
    mark = next((r.get("seq") for r in history.records(root, (history.RETRACTION,))
                 if (r.get("retraction") or {}).get("id") == entry["id"]), None)
    used = _uses(entry)
    return next((r for r in reversed(history.read(root))
                 if mark is not None and (r.get("seq") or 0) > mark and not used(r)), None)


def _recorded(root: Path, entry: dict[str, Any]) -> bool:
    return any((r.get("retraction") or {}).get("id") == entry["id"]
               for r in history.records(root, (history.RETRACTION,)))


def _outcome_recorded(root: Path, entry: dict[str, Any]) -> bool:
    return any(r.get("retraction_id") == entry["id"] for r in history.records(root, (history.RETRACTION_OUTCOME,)))


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
    """Write the retraction's outcome record (once; never rewritten) and return it. `after`: the model built
    without what was retracted (`_built_without`); None only when no rebuild made one."""
    after = _built_without(root, entry)
    outcome = {"retraction": entry, "finished": _now(), "before": _model_summary(before),
               "after": _model_summary(after), **fields}
    if after is not None:
        outcome["promotion"] = after.get("promotion")
    if not (fields.get("resumed") and _outcome_recorded(root, entry)):  # killed after it: one history record
        history.append(root, {"time": outcome["finished"], "retraction_id": entry["id"],
                              **{k: v for k, v in outcome.items() if k not in ("retraction", "finished")}},
                       kind=history.RETRACTION_OUTCOME)
    _reached("outcome")
    path = root / retractions.OUTCOMES / f"{entry['id']}.json"
    if path.exists():
        path = path.with_name(f"{entry['id']}.{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}.json")
    io.write_json(path, outcome)
    outcome["record_path"] = str(path.relative_to(root))
    return outcome


def _rebuild_and_finish(root: Path, entry: dict[str, Any], before: dict | None, trigger: str, fields: dict,
                        after_rebuild=None) -> dict[str, Any]:
    """Rebuild; the outcome is recorded whether the rebuild succeeds or fails."""
    _reached("rebuild")
    try:
        built = _rebuild(root, trigger)
    except Exception as exc:
        _finish(root, entry, before, rebuild={"error": str(exc)}, **fields)
        raise
    _reached("rebuilt")
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
            return _finish(root, earlier, _trained_with(root, earlier), purge=purge_batch(root, earlier))
    source = incoming / name
    if "/" in name or name.startswith(".") or not source.exists():
        known = sorted(p.name for p in incoming.iterdir() if not p.name.startswith(".")) if incoming.is_dir() else []
        raise UserError(f"no batch {name!r} in {incoming.relative_to(root)}; registered batches: "
                        f"{', '.join(known) or 'none'}")

    with pipeline_lock(root):  # no rebuild or admission runs while the batch moves
        dest = root / retractions.RETRACTED_DIR / name
        entry = retractions.register(root, {
            "time": _now(), "kind": "batch", "target": name, **_content_hashes(source), "reason": reason, "by": _who(by),
            "kept_at": str(dest.relative_to(root))})
        _reached("registered")
        fields = _take_batch_out(root, entry, incoming, promoted_dir)
        before = _trained_with(root, entry)
        if not rebuild:
            return _finish(root, entry, before, rebuild=None, **fields)
        # The purge runs after the rebuild: the objects the rebuilt pipeline uses are then known (kept).
        return _rebuild_and_finish(root, entry, before, f"rmpipe retract batch {name} ({entry['id']})", fields,
                                   (lambda: {"purge": purge_batch(root, entry)}) if purge else None)


def _take_batch_out(root: Path, entry: dict[str, Any], incoming: Path, promoted_dir: Path) -> dict[str, Any]:
    """Every step between the register and the rebuild, each done only if not done yet, so a retraction killed
    anywhere is finished by running it again: the history record (and rmpipe's commit), the file moved out of
    data/incoming, its .retraction.json, the tainted promoted model and versions out of service, and the batch's
    delivery records marked retracted. Returns the outcome's fields."""
    from pipeline import records as delivery

    name = entry["target"]
    if not _recorded(root, entry):
        _record(root, entry, [retractions.REGISTER])
    _reached("recorded")
    source, dest = incoming / name, root / entry["kept_at"]
    if source.exists() or source.is_symlink():
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists() and not source.is_dir() and _content_hashes(source)["sha256"] == entry["sha256"]:
            source.unlink()  # a move that copied, then was killed before removing the source
        else:
            shutil.move(str(source), dest)
    _reached("moved")
    io.write_json(dest.with_name(name + ".retraction.json"), entry)
    out = tainted.take_out_of_service(root, promoted_dir, _uses(entry), f"retraction {entry['id']}: batch {name} "
                                      f"({entry['reason']})", entry["id"])
    delivery.mark_retracted(root, name, entry)
    _reached("taken-out")
    return {"removed": {"batch": name, "sha256": entry["sha256"], "moved_to": entry["kept_at"]}, **out}


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
    if earlier is not None and _unfinished(root, earlier):  # killed before its outcome: finish it
        return _resume(root, earlier, False)
    if annotator in excluded or annotator in retractions.retracted_annotators(retractions.load(root)):
        raise UserError(f"annotator {annotator} is already retracted (aggregate.exclude_annotators in params.yaml)")
    latest = _latest(root)
    known = (latest or {}).get("annotators") or {}
    if annotator not in known:
        raise UserError(f"annotator {annotator!r} has no votes in the latest recorded model; known annotators: "
                        f"{', '.join(sorted(known)) or 'none (no run history yet: run dvc repro first)'}")

    with pipeline_lock(root):
        params_unchanged = own_commit.unchanged(root, "params.yaml")  # else the user's own edits are in it
        entry = retractions.register(root, {
            "time": _now(), "kind": "annotator", "target": annotator, "votes": known[annotator].get("votes"),
            "reason": reason, "by": _who(by), "params": "aggregate.exclude_annotators"})
        with modify_yaml(root / PARAMS_FILE) as data:  # DVC's round-trip YAML: comments and order stay
            data["aggregate"]["exclude_annotators"] = [*excluded, annotator]
        _record(root, entry, [retractions.REGISTER, *([PARAMS_FILE] if params_unchanged else [])])
        used = _uses(entry)
        before = _trained_with(root, entry)
        fields = {"removed": {"annotator": annotator, "votes": entry["votes"],
                              "params": {"aggregate.exclude_annotators": [*excluded, annotator]}},
                  **tainted.take_out_of_service(root, promoted_dir, used, f"retraction {entry['id']}: annotator "
                                                f"{annotator} ({reason})", entry["id"])}
        if not rebuild:
            return _finish(root, entry, before, rebuild=None, **fields)
        return _rebuild_and_finish(root, entry, before, f"rmpipe retract annotator {annotator} ({entry['id']})",
                                   fields)


def _unfinished(root: Path, entry: dict[str, Any]) -> bool:
    return not (root / retractions.OUTCOMES / f"{entry['id']}.json").exists()


def _resume(root: Path, entry: dict[str, Any], purge: bool) -> dict[str, Any]:
    """Finish a retraction that was interrupted (killed anywhere after its register entry): redo each step not
    done yet, rebuild and write its outcome, naming the model built with what it retracts and the one without."""
    from pipeline.locks import pipeline_lock

    with pipeline_lock(root):
        if entry["kind"] == "batch":
            params = load_params(root / PARAMS_FILE)
            fields = _take_batch_out(root, entry, root / CollectSettings.parse(params).incoming_dir,
                                     ExportSettings.parse(params).promoted_dir)
        else:
            fields = _exclude_annotator(root, entry)
            fields.update(tainted.take_out_of_service(  # noted before each removal: what the first run did
                root, ExportSettings.parse(load_params(root / PARAMS_FILE)).promoted_dir, _uses(entry),
                f"retraction {entry['id']}: annotator {entry['target']} ({entry['reason']})", entry["id"]))
        fields["resumed"] = True
        return _rebuild_and_finish(root, entry, _trained_with(root, entry), f"rmpipe retract {entry['kind']} "
                                   f"{entry['target']} ({entry['id']}, resumed)", fields,
                                   (lambda: {"purge": purge_batch(root, entry)}) if purge else None)


def _exclude_annotator(root: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """An annotator's retraction killed after its register entry: the params edit and the history record,
    each if not done yet. Returns the outcome's fields."""
    from dvc.utils.serialize import modify_yaml

    excluded = list(AggregateSettings.parse(load_params(root / PARAMS_FILE)).exclude_annotators)
    if entry["target"] not in excluded:
        excluded.append(entry["target"])
        with modify_yaml(root / PARAMS_FILE) as data:
            data["aggregate"]["exclude_annotators"] = excluded
    if not _recorded(root, entry):
        _record(root, entry, [retractions.REGISTER, PARAMS_FILE])
    return {"removed": {"annotator": entry["target"], "votes": entry.get("votes"),
                        "params": {"aggregate.exclude_annotators": excluded}}}


def _check_reason(reason: str | None) -> str:
    if not reason or not reason.strip():
        raise UserError("a retraction needs a reason: --reason \"...\" (it is recorded and shown on re-delivery)")
    return reason.strip()


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
