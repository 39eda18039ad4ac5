"""The run history: one JSON line per model built, appended, never rewritten (`audit/history.jsonl`).

The export stage appends the record right after it sealed a model, so every kind of
rebuild leaves one: a plain `dvc repro`, `rmpipe rebuild`, `on-new-batch`, `rmpipe retract`.
The flows say which kind through RMPIPE_TRIGGER (a plain `dvc repro` has none). A run in
which DVC finds nothing stale builds no model and appends nothing.

The file is deliberately no DVC dep or out: a dep would make the pipeline stale after
every run, and DVC deletes an out before its stage runs. Commit it with git.

A record holds what an auditor asks about later without the workspace of that day:
trigger, git commit, the md5 of every upstream input (from dvc.lock, as the lineage
manifest has them), the export's md5 and manifest digest, the batches with their sha256
and pair counts, the annotators with their vote counts, the metrics and the promotion.
When the history is new, `backfill` first adds the models the project already had
(the on-new-batch run summaries in reports/runs/, the current export and promoted model).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from rmpipe.audit import dvc_cache
from rmpipe.core.io import append_jsonl_locked, sha256_file

HISTORY = Path("audit/history.jsonl")
TRIGGER_ENV = "RMPIPE_TRIGGER"
FORMAT = "rmpipe-history/1"
RUNS_DIR = Path("reports/runs")


def trigger_from_env() -> str:
    return os.environ.get(TRIGGER_ENV) or "dvc repro"


def read(root: Path = Path(".")) -> list[dict[str, Any]]:
    path = Path(root) / HISTORY
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            records.append(json.loads(line))
    return records


def append(root: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Append one record under an exclusive lock (numbered in order); earlier bytes are never touched."""
    return append_jsonl_locked(Path(root) / HISTORY,
                               lambda rows: {"format": FORMAT, "seq": len(rows) + 1, **record}, default=str)


# --- what a record holds ------------------------------------------------------------------------
def _incoming_listing(root: Path, inputs: dict[str, Any]) -> dict[str, str]:
    """{batch file name: md5} from the data/incoming folder object recorded in the lineage inputs."""
    entry = inputs.get("data/incoming") or {}
    return dvc_cache.dir_listing(root, entry.get("md5", "")) if entry else {}


def batch_hashes(root: Path, names: list[str], inputs: dict[str, Any], incoming_dir: Path) -> dict[str, dict]:
    """{name: {md5, sha256}}: sha256 from the cached object (the exact bytes built), else the file if its md5 matches."""
    import hashlib

    listing = _incoming_listing(root, inputs)
    out = {}
    for name in names:
        md5 = listing.get(name)
        sha = None
        cached = dvc_cache.file_in_output(root, md5) if md5 else None
        if cached is not None:
            sha = sha256_file(cached)
        else:
            path = Path(root) / incoming_dir / name
            if path.is_dir():  # a dataset folder batch: the digest collect computes
                from rmpipe.core.io import folder_sha256

                sha = folder_sha256(path)
            elif path.is_file():
                with path.open("rb") as fh:
                    file_md5 = hashlib.file_digest(fh, "md5").hexdigest()
                if md5 is None or file_md5 == md5:
                    md5, sha = file_md5, sha256_file(path)
        out[name] = {"md5": md5, "sha256": sha}
    return out


def _pair_counts(split_dir: Path) -> tuple[dict[str, dict[str, int]], int]:
    """Per batch, how many pairs of each split its votes fed; and the number of training pairs."""
    counts: dict[str, dict[str, int]] = {}
    n_train = 0
    for split in ("train", "val", "test"):
        path = split_dir / f"{split}.parquet"
        if not path.exists():
            continue
        column = pd.read_parquet(path, columns=["batch_ids"])["batch_ids"]
        if split == "train":
            n_train = len(column)
        for ids in column:
            for b in ids:
                counts.setdefault(str(b), {"train": 0, "val": 0, "test": 0})[split] += 1
    return counts, n_train


def _annotators(report_path: Path) -> dict[str, dict[str, Any]]:
    if not report_path.exists():
        return {}
    report = json.loads(report_path.read_text(encoding="utf-8"))
    return {a: {"votes": s.get("votes"), "flagged": s.get("flagged"), "excluded": s.get("excluded")}
            for a, s in (report.get("annotators") or {}).items()}


def model_record(root: Path, manifest: dict[str, Any], export_dir: Path, promoted_dir: Path | None,
                 trigger: str, *, split_dir: Path | None = None, annotators_report: Path | None = None,
                 backfilled_from: str | None = None) -> dict[str, Any]:
    """The record of one exported model, from its lineage manifest plus what the workspace still shows."""
    from rmpipe.audit.lineage import dvc_md5, manifest_sha256

    root = Path(root)
    inputs = manifest.get("inputs") or {}
    params = manifest.get("params") or {}
    batch_names = sorted({b for ids in (manifest.get("batch_ids") or {}).values() for b in ids})
    incoming_dir = Path((params.get("collect") or {}).get("incoming_dir", "data/incoming"))
    counts, n_train = _pair_counts(split_dir) if split_dir is not None else ({}, None)
    batches = batch_hashes(root, batch_names, inputs, incoming_dir)
    for name, info in batches.items():
        info["pairs"] = counts.get(name)
    promo = manifest.get("promotion") or {}
    promoted = None
    if promo.get("promoted") and promoted_dir is not None and (root / promoted_dir / "config.json").exists():
        promoted = {"path": str(promoted_dir), "md5": dvc_md5(root / promoted_dir)}
    evaluation = manifest.get("evaluation") or {}
    return {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "trigger": trigger,
        **({"backfilled_from": backfilled_from} if backfilled_from else {}),
        "git": manifest.get("git"),
        "model": {"path": str(export_dir), "md5": dvc_md5(root / export_dir),
                  "manifest_sha256": manifest_sha256(root / export_dir), "created_at": manifest.get("created_at"),
                  "backbone": (manifest.get("model") or {}).get("backbone")},
        # dvc.lock as the export stage saw it: every upstream stage recorded, export's own entry still to come
        "dvc_lock_sha256": sha256_file(root / "dvc.lock") if (root / "dvc.lock").exists() and not backfilled_from else None,
        "upstream_lock_md5": {path: info.get("md5") for path, info in inputs.items()},
        "batches": batches,
        "n_train_pairs": n_train,
        "annotators": _annotators(annotators_report) if annotators_report is not None else {},
        "aggregate_params": params.get("aggregate"),
        "split_params": params.get("split"),
        "metrics": {k: evaluation.get(k) for k in ("passed", "accuracy", "n_pairs", "bt_loss", "ece", "length_r2",
                                                   "battery_failed")},
        "promotion": {k: promo.get(k) for k in ("promoted", "reason", "accuracy", "previous_accuracy")},
        "promoted_model": promoted,
    }


# --- backfill -----------------------------------------------------------------------------------
def backfill(root: Path, export_dir: Path, promoted_dir: Path | None) -> list[dict[str, Any]]:
    """When the history is new: one record per model the project already shows; returns those appended.

    Sources, oldest first: on-new-batch run summaries (reports/runs/*.json, which name the
    export's manifest digest, metrics and promotion), then the promoted and the current export
    (their lineage.json). A model already recorded (same manifest digest) is not repeated.
    """
    from rmpipe.audit.lineage import MANIFEST_FILE, manifest_sha256

    root = Path(root)
    if read(root):
        return []
    added: list[dict[str, Any]] = []
    seen: set[str] = set()
    for path in sorted((root / RUNS_DIR).glob("*.json")) if (root / RUNS_DIR).is_dir() else []:
        try:
            run = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        gate = run.get("promotion") or {}
        digest = gate.get("manifest_sha256")
        if run.get("outcome") != "accepted" or not digest or digest in seen:
            continue
        seen.add(digest)
        eval_metrics = (run.get("metrics") or {}).get("metrics/eval.json") or {}
        added.append(append(root, {
            "time": run.get("finished"), "trigger": f"on-new-batch {run.get('batch_id')}",
            "backfilled_from": str(path.relative_to(root)),
            "model": {"path": gate.get("export_path"), "md5": None, "manifest_sha256": digest},
            "upstream_lock_md5": {}, "batches": {b: {"md5": None, "sha256": None} for b in gate.get("batch_ids") or []},
            "metrics": {k: eval_metrics.get(k) for k in ("passed", "accuracy", "n_pairs", "bt_loss", "ece")},
            "promotion": {"promoted": gate.get("promoted"), "reason": gate.get("reason")},
            "promoted_model": None,
        }))
    for folder in [d for d in (promoted_dir, export_dir) if d is not None]:
        if not (root / folder / MANIFEST_FILE).exists():
            continue
        digest = manifest_sha256(root / folder)
        if digest in seen:
            continue
        seen.add(digest)
        manifest = json.loads((root / folder / MANIFEST_FILE).read_text(encoding="utf-8"))
        record = model_record(root, manifest, folder, promoted_dir if folder == export_dir else None,
                              "backfill", backfilled_from=str(folder / MANIFEST_FILE))
        record["time"] = manifest.get("created_at")
        added.append(append(root, record))
    return added


# --- reading it back ----------------------------------------------------------------------------
def model_id(record: dict[str, Any]) -> str:
    """A short name for a recorded model: the first 12 hex digits of its manifest digest."""
    digest = (record.get("model") or {}).get("manifest_sha256") or ""
    return digest[:12] or f"#{record.get('seq')}"

