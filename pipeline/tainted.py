"""What a retraction takes out of service before the rebuild: the promoted model and every registered
version built with the retracted batch or annotator (`tainted(record)` says which history records are)."""

from __future__ import annotations

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


def demote_promoted(root: Path, promoted_dir: Path, tainted) -> dict[str, Any] | None:
    """Remove the promoted model when `tainted(record)` says it was built with what is retracted."""
    record = promoted_record(root, promoted_dir)
    if record is None or not tainted(record):
        return None
    shutil.rmtree(root / promoted_dir)
    return {"model": history.model_id(record), "seq": record.get("seq"), "path": str(promoted_dir)}


def deprecate_versions(root: Path, tainted, reason: str) -> list[str] | str:
    """Deprecate (GTO deregister) every registered version built with what is retracted, before the rebuild,
    so the gate never measures the rebuilt model against one of them; the registry's note without git."""
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
            done.append(registry.deprecate(root, version["version"], reason))
    return done
