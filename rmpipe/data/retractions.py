"""The retraction register (`audit/retractions.jsonl`) and the one check every delivery path calls.

One JSON line per retraction, appended by `rmpipe retract` before it rebuilds: what was
taken out (a batch with its sha256, or an annotator), why, by whom, when. The collect
stage reads it (it is a dep of that stage in dvc.yaml), and so does the admission of a new
delivery (the quick check in the on-new-batch flow): both call `refusal`, so a retracted
batch put back into data/incoming or delivered again is refused with the retraction as
the reason. The outcome of each retraction (before/after models, purge) is written beside
it under audit/retractions/, which nothing reads back into the pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rmpipe.core.io import append_jsonl_locked

REGISTER = Path("audit/retractions.jsonl")
OUTCOMES = Path("audit/retractions")
RETRACTED_DIR = Path("data/retracted")  # retracted batches, each with <name>.retraction.json beside it


# The register's first line (DVC warns about an empty dep file, and the register is collect's dep).
HEADER = {"format": "rmpipe-retractions/1", "note": "one retraction per line below, appended by rmpipe retract"}


def load(root: Path = Path(".")) -> list[dict[str, Any]]:
    """Every retraction, oldest first ([] when there is no register yet); the header line is not one."""
    path = Path(root) / REGISTER
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [row for row in rows if "id" in row]


def register(root: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Append a retraction (numbered R1, R2, ... in order) under an exclusive lock."""
    def numbered(rows: list[dict]) -> dict[str, Any]:
        return {"id": f"R{sum(1 for row in rows if 'id' in row) + 1}", **entry}
    return append_jsonl_locked(Path(root) / REGISTER, numbered, header=HEADER)


def describe(entry: dict[str, Any]) -> str:
    return (f"retraction {entry['id']} of {entry['kind']} {entry['target']} on {entry['time']} "
            f"by {entry.get('by') or 'unknown'}: {entry['reason']}")


def refusal(register_: list[dict[str, Any]], batch_id: str, sha256: str | None) -> str | None:
    """Why a delivered batch file must be refused, or None: its content, or its batch id, was retracted."""
    for entry in register_:
        if entry.get("kind") != "batch":
            continue
        if sha256 and entry.get("sha256") == sha256:
            same = "this content" if entry["target"] == batch_id else f"this content (as {entry['target']})"
            return f"{batch_id}: {same} was retracted ({describe(entry)}); it cannot be delivered again"
        if entry["target"] == batch_id:
            return (f"{batch_id}: a batch with this id was retracted ({describe(entry)}); deliver corrected "
                    "data under a new file name")
    return None


def retracted_annotators(register_: list[dict[str, Any]]) -> list[str]:
    return sorted({e["target"] for e in register_ if e.get("kind") == "annotator"})
