"""Collect: normalize every annotation batch in `collect.incoming_dir` into one vote table.

Every row of every batch ends in exactly one place: the vote table (columns
`schema.VOTE_COLUMNS`) or the quarantine, with its batch, line and a reason a person
can act on. Per batch the report counts where the rows went and why, and gives the
batch's status (accepted, rejected, refused, duplicate_of:<b>; see `collect.batch`).

`on_rejected_batch` decides what a rejected/refused batch does to the run: `fail`
stops it (`raise_for_rejected`), `skip` drops the batch with a warning. Either way
its good rows never reach the vote table.

The work is split by job: `collect.read` reads a batch in chunks, `collect.fast` checks and
normalizes whole columns of a chunk, `collect.rows` is the per-row path (every rule and reason),
`collect.batch` puts one batch together (`collect.batch.collect_batch`, a function of one file
that can run in any process), and this module runs the batches of the folder in file-name order
and writes each accepted batch as its part of data/collected/votes/ (`collect.parts`). Memory is that of a
batch's votes up to HOLD_MB (beyond, they wait in a part on disk), a 16-byte key per vote and a
capped cache of text fingerprints; the output does not depend on the chunk size or on the fast path.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Mapping

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rmpipe.core.errors import DataError
from rmpipe.core.io import atomic_dir
from rmpipe.core.paths import CHUNK_ROWS, part_name, parts_in
from rmpipe.core.settings import CollectSettings
from rmpipe.data.collect import hf_batches
from rmpipe.data.collect.batch import (
    FORMATS,
    POLICIES,
    BatchResult,
    collect_batch,
    read_files,
    votes_frame,
)
from rmpipe.data.collect.fast import VOTES_SCHEMA
from rmpipe.data.collect.fields import RAW_MAX_CHARS, REASONS, Bad
from rmpipe.data.collect.key_sets import SeenVotes
from rmpipe.data.collect.memo import CollectMemo, memoized
from rmpipe.data.collect.parts import ROWS_PER_GROUP, PartsFolder
from rmpipe.data.collect.rows import Normalizer
from rmpipe.data.engine import BatchRunner

__all__ = ["FORMATS", "POLICIES", "RAW_MAX_CHARS", "REASONS", "BatchResult", "CollectSettings", "as_settings",
           "check_batch", "collect_dir", "collect_to", "incoming_snapshot", "raise_for_rejected", "raise_if_changed", "write_votes"]
_Normalizer, _Bad = Normalizer, Bad  # the per-row path, under the names tests have used
HOLD_MB = 512  # a batch's votes up to this size wait in memory for the merge, not in a part on disk

log = logging.getLogger("rmpipe.collect")


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Collect builds millions of small objects and no reference cycles: without this the cycle
    collector rescans them all, again and again."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def as_settings(cfg: Mapping[str, Any] | CollectSettings) -> CollectSettings:
    """The `collect:` section as CollectSettings (parsed here when a caller hands the raw mapping)."""
    return cfg if isinstance(cfg, CollectSettings) else CollectSettings.from_section(cfg)


def check_batch(path: str | Path, cfg: Mapping[str, Any] | CollectSettings,
                retracted: list[dict] | None = None) -> BatchResult:
    """Check one batch file on its own (e.g. before registering a new delivery).

    Same rules as the collect stage, minus what needs the other batches (duplicate
    files, duplicate votes across batches). `retracted`: the project's retraction register.
    """
    conf = as_settings(cfg)
    with _gc_paused():
        result = collect_batch(Path(path), conf, retracted=retracted or [])
    _log_batch(result.report)
    return result



def _batch_files(incoming_dir: Path) -> tuple[list[Path], list[dict]]:
    """Candidate batches (files and dataset folders, sorted by name) and the entries skipped with a
    reason. Dotfiles and `rmpipe import` sidecars (<batch>.source.json) are not batches."""
    if not incoming_dir.is_dir():
        raise DataError(f"collect.incoming_dir '{incoming_dir}' is not a folder: create it and put batch files "
                        "(.jsonl, .csv, .parquet) in it, or run `rmpipe sample-data`")
    files, skipped = [], []
    names = sorted(os.listdir(incoming_dir))
    for name in names:
        if name.startswith("."):
            continue
        path = incoming_dir / name
        if name.endswith(hf_batches.SOURCE_SUFFIX):
            if name[: -len(hf_batches.SOURCE_SUFFIX)] not in names:
                skipped.append({"file": name, "reason": "is the import record of a batch that is not here"})
        elif path.suffix.lower() in FORMATS:
            files.append(path)
        elif path.is_dir():
            if path.is_symlink() or hf_batches.folder_kind(path):
                files.append(path)  # a symlinked folder is refused with its reason, like a symlinked file
            else:
                skipped.append({"file": name, "reason": "is a folder, but no dataset: neither a save_to_disk folder nor "
                                                        "data files (.parquet, .jsonl, .json, .csv) inside"})
        else:
            skipped.append({"file": name, "reason": f"extension {path.suffix or '(none)'!r} is not one of "
                                                    f"{', '.join(FORMATS)}"})
    return files, skipped


def _log_batch(entry: dict) -> None:
    status = entry["status"]
    if status == "accepted":
        log.info("%s: %d rows read, %d normalized, %d quarantined -> accepted", entry["batch_id"],
                 entry["rows_read"], entry["rows_normalized"], entry["rows_quarantined"])
    elif status.startswith("duplicate_of:"):
        log.warning("%s", entry["message"])
    else:
        log.warning("%s %s: %s", status.upper(), entry["batch_id"], entry["message"])


class IncomingChanged(DataError):
    """The incoming folder changed while collect read it: its outputs must not be recorded against it."""


Snapshot = dict[str, tuple[int, int, int]]


def incoming_snapshot(incoming_dir: str | Path) -> Snapshot:
    """{relative path: (size, mtime_ns, inode)} of every file under `incoming_dir`, dotfiles included:
    everything DVC hashes as the stage's dependency. A replaced, added, removed or rewritten file
    changes it (the same signals DVC's own hash cache trusts)."""
    root = Path(incoming_dir)
    snap: Snapshot = {}
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            snap[path.relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return snap


def raise_if_changed(incoming_dir: str | Path, before: Snapshot) -> None:
    """Fail when `incoming_dir` no longer matches the snapshot taken before reading it.

    DVC releases its repo lock while a stage runs and hashes the stage's dependencies
    after the command exits: a batch added meanwhile would be recorded in dvc.lock as
    read when it was not. Failing here keeps dvc.lock unchanged, so the next
    `dvc repro` runs collect again on what is there.
    """
    after = incoming_snapshot(incoming_dir)
    if after == before:
        return
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(n for n in set(before) & set(after) if before[n] != after[n])
    parts = [f"{what}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
             for what, names in (("added", added), ("removed", removed), ("rewritten", changed)) if names]
    raise IncomingChanged(f"{incoming_dir} changed while collect read it ({'; '.join(parts)}); nothing is recorded "
                          "for this run: run `dvc repro` again to collect what is there now")


def collect_to(incoming_dir: str | Path, cfg: Mapping[str, Any] | CollectSettings, votes_dir: str | Path,
               retracted: list[dict] | None = None, *, fast: bool = True, chunk_rows: int = CHUNK_ROWS,
               hold_mb: float = HOLD_MB, ahead: BatchRunner | None = None,
               memo: CollectMemo | None = None) -> tuple[list[dict], dict]:
    """Collect every batch in `incoming_dir` into the folder `votes_dir`, one parquet part per accepted batch
    (`collect.parts`): (quarantine rows, report).

    Votes of accepted batches only, in file-name then line order. Rejected batches never raise
    here: call `raise_for_rejected(report, cfg)` after writing the report and quarantine, so the
    user can read why. `fast`, `chunk_rows` and `hold_mb` as in `collect.batch.collect_batch`. `ahead`
    (rmpipe.data.engine.batch_runner) collects every batch at once elsewhere; see `_reuse`. `memo`
    (collect.memo, local engine only) reads a batch once across runs: same outputs, less time.
    """
    conf = as_settings(cfg)
    files, skipped = _batch_files(Path(incoming_dir))
    for item in skipped:
        log.warning("skipped %s: %s", item["file"], item["reason"])
    accepted, seen_files = SeenVotes(), {}
    quarantine, entries = [], []
    table = PartsFolder(Path(votes_dir))
    with tempfile.TemporaryDirectory(prefix=".collect-parts-", dir=table.folder.parent) as tmp, _gc_paused():
        futures = (ahead(files, conf, retracted or [], Path(tmp), fast=fast, chunk_rows=chunk_rows) if ahead
                   else [None] * len(files))
        for number, path in enumerate(files):
            options = {"retracted": retracted or [], "votes_to": Path(tmp) / f"{number:06d}.parquet",
                       "hold_mb": hold_mb, "fast": fast, "chunk_rows": chunk_rows}
            kept = None
            if memo is not None and ahead is None:
                result, kept = memoized(path, conf, memo, accepted, seen_files, options)
            else:
                result = _reuse(futures[number], accepted, seen_files) or collect_batch(
                    path, conf, earlier=accepted, seen_files=seen_files, **options)
            if read_files(result.report):
                seen_files[result.report["sha256"]] = result.batch_id
            if (source := hf_batches.sidecar_source(path)) is not None:  # lineage reads `rmpipe import`'s record
                result.report["source"] = source
            _log_batch(result.report)
            entries.append(result.report)
            quarantine.extend(result.quarantine)
            if result.accepted:
                accepted.add(result.batch_id, result.keys)
                if kept is None:
                    table.add(result.batch_id, result.part or result.table)
                else:
                    table.add_sealed(result.batch_id, kept.part, kept.counts)
                    memo.record(table.path_of(result.batch_id), kept.sha256)
            elif result.part is not None:
                result.part.unlink(missing_ok=True)
            result.table = None  # held votes are freed batch by batch
        del accepted
    return quarantine, _report(entries, skipped, table.close(), conf)


def _reuse(future: Any, accepted: SeenVotes, seen_files: Mapping[str, str]) -> BatchResult | None:
    """A batch collected ahead (by the engine, knowing no earlier batch), where that is what collect_batch
    gives here too: accepted, its bytes not read before, none of its votes already in the table.
    Otherwise None (its part deleted): the caller collects it again knowing the earlier batches."""
    if future is None:
        return None
    result = future.result()
    if result.accepted and result.report["sha256"] not in seen_files and not accepted.any_of(result.keys):
        return result
    if result.part is not None:
        result.part.unlink(missing_ok=True)
    return None


def collect_dir(incoming_dir: str | Path, cfg: Mapping[str, Any] | CollectSettings, retracted: list[dict] | None = None,
                **options: Any) -> tuple[pd.DataFrame, list[dict], dict]:
    """`collect_to` with the votes returned as a DataFrame: (votes, quarantine rows, report). For tests
    and small folders; the stage streams to disk with `collect_to`."""
    with tempfile.TemporaryDirectory(prefix="rmpipe-collect-") as tmp:
        folder = Path(tmp) / "votes"
        quarantine, report = collect_to(incoming_dir, cfg, folder, retracted, **options)
        votes = votes_frame(read_votes_table(folder))
    return votes, quarantine, report


def read_votes_table(location: str | Path) -> pa.Table:
    """A votes folder's parts (or one parquet file) as one Arrow table, in batch order."""
    parts = parts_in(Path(location))
    if not parts:
        return VOTES_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(part) for part in parts])


def _report(entries: list[dict], skipped: list[dict], counts: dict[str, int], conf: CollectSettings) -> dict:
    def total(key: str) -> int:
        return int(sum(e[key] for e in entries))

    statuses = Counter(e["status"].split(":")[0] for e in entries)
    return {
        "totals": {
            "batches": len(entries),
            "accepted": statuses["accepted"],
            "rejected": statuses["rejected"],
            "refused": statuses["refused"],
            "duplicate_files": statuses["duplicate_of"],
            "skipped_files": len(skipped),
            "rows_read": total("rows_read"),
            "rows_normalized": total("rows_normalized"),
            "rows_quarantined": total("rows_quarantined"),
            "rows_excluded_with_batch": total("rows_excluded_with_batch"),
            "votes": counts["votes"],
            "pairs": counts["pairs"],
            "annotators": counts["annotators"],
        },
        "policy": {"max_bad_share": conf.max_bad_share, "on_rejected_batch": conf.on_rejected_batch},
        "batches": entries,
        "skipped_files": skipped,
    }


def raise_for_rejected(report: dict, cfg: Mapping[str, Any] | CollectSettings) -> None:
    """Stop the run (DataError) when a batch was rejected or refused under `on_rejected_batch: fail`,
    or when nothing at all was collected. Under `skip`, warn loudly and go on."""
    conf = as_settings(cfg)
    bad = [e for e in report["batches"] if e["status"] in ("rejected", "refused")]
    if bad and conf.on_rejected_batch == "fail":
        more = f" (and {len(bad) - 1} more batch(es), see reports/collect.json)" if len(bad) > 1 else ""
        fix = ("Fix the rows listed in data/collected/quarantine.jsonl" if bad[0]["rows_quarantined"] else
               f"Remove {bad[0]['batch_id']} from {conf.incoming_dir}")
        raise DataError(f"batch {bad[0]['status']}: {bad[0]['message']}{more}. {fix}, or set "
                        "collect.on_rejected_batch: skip to go on without it")
    for entry in bad:
        log.warning("!!! %s %s and SKIPPED (collect.on_rejected_batch=skip): %d good rows left out with it",
                    entry["batch_id"], entry["status"].upper(), entry["rows_excluded_with_batch"])
    if report["totals"]["votes"] == 0:
        raise DataError("no votes collected: every batch is empty, rejected, refused or a duplicate "
                        "(see reports/collect.json)" if report["batches"] else
                        "no batch files (.jsonl, .csv, .parquet) in the incoming folder: add some or run `rmpipe sample-data`")



def write_votes(folder: str | Path, votes: pd.DataFrame, rows_per_group: int = ROWS_PER_GROUP) -> None:
    """Write a vote table held as a DataFrame as a votes folder, as collect writes it: one part per batch_id
    (batch order), each holding that batch's rows in the frame's order. Replaces the folder whole."""
    from rmpipe.data.collect.parts import write_part

    with atomic_dir(folder) as tmp:
        table = pa.Table.from_pandas(votes.reset_index(drop=True), schema=VOTES_SCHEMA, preserve_index=False)
        ids = table["batch_id"].to_numpy(zero_copy_only=False)
        for batch_id in sorted(set(ids), key=str):
            rows = table.filter(pa.array(ids == batch_id))
            write_part(tmp / part_name(str(batch_id)), rows, rows_per_group)
