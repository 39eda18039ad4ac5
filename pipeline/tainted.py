"""What a retraction takes out of service before the rebuild: the promoted model and every registered
version built with the retracted batch or annotator (`tainted(record)` says which history records are)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from rmpipe.audit import history


def promoted_record(root: Path, promoted_dir: Path) -> dict[str, Any] | None:
    """The history record of the model now in the promoted folder (matched by its manifest digest)."""
    from rmpipe.audit.lineage import MANIFEST_FILE, manifest_sha256

    if not (root / promoted_dir / MANIFEST_FILE).exists():
        return None
    digest = manifest_sha256(root / promoted_dir)
    return next((r for r in reversed(history.read(root)) if r["model"].get("manifest_sha256") == digest), None)


def deprecate_versions(root: Path, tainted, reason: str, before_each=lambda version: None) -> list[str] | str:
    """Deprecate (GTO deregister) every registered version built with what is retracted, before the rebuild,
    so the gate never measures the rebuilt model against one of them; the registry's note without git.
    `before_each(version)` runs before each one is deprecated (the note a re-run reads back)."""
    from rmpipe.audit import registry

    why_not = registry.unavailable_reason(root)
    if why_not is not None:
        return why_not
    by_digest = {(r.get("model") or {}).get("manifest_sha256"): r for r in history.read(root)}
    done = []
    for version in registry.versions(root):
        body = version["body"]
        record = by_digest.get(body.get("manifest_sha256")) or {"batches": dict.fromkeys(body.get("batches") or [])}
        if not version["deprecated"] and tainted(record):
            before_each(version["version"])
            done.append(registry.deprecate(root, version["version"], reason))
    return done


NOTES = Path(".rmpipe/retractions")  # what each retraction took out of service (rmpipe's own state)


def take_out_of_service(root: Path, promoted_dir: Path, tainted, reason: str, retraction_id: str) -> dict[str, Any]:
    """Demote the promoted model and deprecate the versions built with what is retracted, noting each one in
    .rmpipe/retractions/<id>.taken-out.json BEFORE it is removed: a re-run after a kill (which finds them already
    gone) reports what the first run took out. Returns {demoted, deprecated}."""
    from rmpipe.audit import registry
    from rmpipe.core import io

    note = root / NOTES / f"{retraction_id}.taken-out.json"
    done = json.loads(note.read_text()) if note.exists() else {"demoted": None, "deprecated": []}
    record = promoted_record(root, promoted_dir)
    if record is not None and tainted(record):
        done["demoted"] = {"model": history.model_id(record), "seq": record.get("seq"), "path": str(promoted_dir)}
        io.write_json(note, done)
        shutil.rmtree(root / promoted_dir)

    def noted(version: str) -> None:
        tag = registry.tag_of_deprecated(version)
        if tag not in done["deprecated"]:
            done["deprecated"].append(tag)
        io.write_json(note, done)
    now = deprecate_versions(root, tainted, reason, noted)
    return {"demoted": done["demoted"], "deprecated": done["deprecated"] if isinstance(now, list) else now}
