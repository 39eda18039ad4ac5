"""The run history: one record per model built (and per retraction), appended to a hash chain, never rewritten.

The chain lives outside the work tree (rmpipe.audit.chain): in git, the ref `refs/rmpipe/audit`,
which no checkout, stash, branch switch or `dvc checkout`/`dvc exp` touches and which the team
shares by pushing it; without git, `.rmpipe/history.jsonl`. Each record carries the sha256 of
the one before it, so `rmpipe history --verify` names the first record that was altered, removed
or reordered. Records are numbered `seq` 1, 2, ... across every kind; two writers at once (the
service and a manual `dvc repro`) get distinct numbers and lose nothing.

The export stage appends a `model` record right after it sealed a model, so every kind of
rebuild leaves one: a plain `dvc repro`, `rmpipe rebuild`, `on-new-batch`, `rmpipe retract`.
The flows say which kind through RMPIPE_TRIGGER (a plain `dvc repro` has none). A run in
which DVC finds nothing stale builds no model and appends nothing. `rmpipe retract` appends a
`retraction` record (what, why, by whom) before it rebuilds, and a `retraction-outcome` after.

A model record holds what an auditor asks about later without the workspace of that day:
trigger, git commit, the md5 of every upstream input (from dvc.lock, as the lineage
manifest has them), the export's md5 and manifest digest, the batches with their sha256
and pair counts, the annotators with their vote counts, the metrics, the promotion, and
`version` (the registry's version of the model, None until a registry names one).
When the history is new, an old `audit/history.jsonl` (the tracked file this replaced) is
imported once, then `backfill` adds the models the project already had.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from rmpipe.audit import chain as chain_
from rmpipe.audit import dvc_cache
from rmpipe.core.errors import DataError
from rmpipe.core.io import sha256_file
from rmpipe.core.paths import parts_in, read_parts

LEGACY = Path("audit/history.jsonl")  # the tracked file of earlier versions: imported once, never written
TRIGGER_ENV = "RMPIPE_TRIGGER"
FORMAT = "rmpipe-history/2"
RUNS_DIR = Path("reports/runs")
MODEL, RETRACTION, RETRACTION_OUTCOME = "model", "retraction", "retraction-outcome"


def trigger_from_env() -> str:
    return os.environ.get(TRIGGER_ENV) or "dvc repro"


def location(root: Path = Path(".")) -> str:
    """Where the history of the project at `root` lives, in words (`git ref refs/rmpipe/audit`, or the file)."""
    return chain_.open_chain(Path(root)).where


def records(root: Path = Path("."), kinds: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Every record of the chain (of `kinds`, when given), oldest first; unreadable ones are left out
    (`verify` names them)."""
    found = [r for r in chain_.open_chain(Path(root)).records() if isinstance(r, dict)]
    return [r for r in found if kinds is None or r.get("kind", MODEL) in kinds]


def read(root: Path = Path(".")) -> list[dict[str, Any]]:
    """The model records, oldest first (`seq` is the record's number in the whole chain)."""
    return records(root, (MODEL,))


def append(root: Path, record: dict[str, Any], kind: str = MODEL) -> dict[str, Any]:
    """Append one record of `kind` (numbered, chained to the previous one) and return it as stored."""
    chain = chain_.open_chain(Path(root))
    import_legacy(Path(root), chain)
    return chain.append(lambda last: chain_.seal({"format": FORMAT, "kind": kind, **record}, last))


def verify(root: Path = Path(".")) -> tuple[int, str | None, str]:
    """(number of records, the first altered/removed/reordered record in one line or None, where it lives)."""
    chain = chain_.open_chain(Path(root))
    n, problem = chain_.verify(chain)
    return n, problem, chain.where


def import_legacy(root: Path, chain=None) -> int:
    """Once, into an empty chain: the records of `audit/history.jsonl` (and, now that git is here, of a
    `.rmpipe/history.jsonl` kept while there was none), in order; returns how many went in."""
    import filelock

    chain = chain or chain_.open_chain(Path(root))
    base = chain.root
    sources = [LEGACY] + ([chain_.FILE] if isinstance(chain, chain_.GitChain) else [])
    sources = [s for s in sources if (base / s).is_file() and (base / s).stat().st_size]
    if not sources or chain.records():
        return 0
    (base / chain_.FILE).parent.mkdir(parents=True, exist_ok=True)
    try:
        with filelock.FileLock(str(base / chain_.FILE) + ".import.lock", timeout=chain_.LOCK_TIMEOUT_S):
            if chain.records():
                return 0
            n = 0
            for source in sources:
                for row in chain_.FileChain(base).records() if source == chain_.FILE else _jsonl(base / source):
                    payload = {k: v for k, v in row.items() if k not in ("seq", "prev", "sha256", "format")}
                    payload = {"kind": MODEL, **payload, "imported_from": str(source), "imported_seq": row.get("seq")}
                    chain.append(lambda last, p=payload: chain_.seal({"format": FORMAT, **p}, last))
                    n += 1
    except filelock.Timeout:
        raise DataError(f"another rmpipe has been importing {sources[0]} into the history for "
                               f"{chain_.LOCK_TIMEOUT_S:.0f} s; if none runs, delete {chain_.FILE}.import.lock") from None
    return n


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [row for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
            and isinstance(row := json.loads(line), dict)]


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
        parts = parts_in(split_dir / split)  # its parts, or the one file data/split/<split>.parquet
        if not parts:
            continue
        column = read_parts(parts, columns=["batch_ids"])["batch_ids"]
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
                 backfilled_from: str | None = None, version: str | None = None) -> dict[str, Any]:
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
        "version": version,  # the model registry's version of this model (e.g. reward-model@v1.4.0), if any
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
    import_legacy(root)
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



def describe(record: dict[str, Any]) -> str:
    """One line per record, as `rmpipe history` prints it."""
    kind, head = record.get("kind", MODEL), f"#{record.get('seq')}  {record.get('time') or '-':25}"
    if kind == MODEL:
        metrics, promo = record.get("metrics") or {}, record.get("promotion") or {}
        acc = metrics.get("accuracy")
        return (f"{head} model {model_id(record)}  accuracy {'-' if acc is None else f'{acc:.4f}'}  "
                f"{'PROMOTED' if promo.get('promoted') else 'not promoted'}"
                f"{'  ' + record['version'] if record.get('version') else ''}  [{record.get('trigger')}]")
    if kind == RETRACTION:
        entry = record.get("retraction") or {}
        return (f"{head} retraction {entry.get('id')} of {entry.get('kind')} {entry.get('target')} "
                f"by {entry.get('by')}: {entry.get('reason')}")
    if kind == RETRACTION_OUTCOME:
        after = record.get("after") or {}
        return (f"{head} outcome of {record.get('retraction_id')}: "
                + (f"model {after.get('model')} (#{after.get('seq')})" if after else "no new model")
                + ("; purged" if record.get("purge") else ""))
    return f"{head} {kind}"
