"""Collect reads each batch once: a content-addressed memo of a batch's outcome, under `.rmpipe/memo/collect/`.

What a batch becomes (its votes, quarantine, report entry and vote keys) is a function of its name, its
bytes, the collect settings and the collect stage's code, plus two things it takes from earlier batches:
whether its bytes were already read (a duplicate file) and whether any of its votes is already in the
table (a duplicate vote). The memo holds the outcome computed knowing *no* earlier batch, keyed by

    sha256(name, content sha256, every collect setting but the folder, code_hash of stages/collect.py)

(the code hash is the same import closure `rmpipe deps` writes into dvc.yaml). It is taken as the
outcome here only where the earlier batches could not have changed it, the rule the Dask engine already
relies on: the batch was accepted, its bytes were not read before (checked before the memo is asked),
and none of its vote keys is among the accepted votes (a search over the keys, no text read). Anything
else is collected again in order, as without a memo.

An entry's votes are the batch's votes part itself (`collect.parts`: its bytes depend on the batch's votes
only), so a reused batch is hard-linked into data/collected/votes/ without being decoded or written again
(DVC deletes a stage's outputs before it runs it: this puts them back at the cost of a link).

An entry is a folder written whole and renamed into place; `seal.json`, written last, holds the sha256
of its files, which are checked on every use: a damaged or half-written entry is deleted and the batch
read again. Deleting the memo changes nothing but time. Entries no batch of a run used are pruned after it.

File hashes come from the ledger the stages share (`part_memo.FileHashes`, by size, mtime and inode, the
signature DVC's own hash cache trusts): an unchanged 280 MB batch is not hashed again each run, nor an
entry's votes part to check its seal, and the part linked into the votes folder is recorded there, so
aggregate finds its hash too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rmpipe.core.settings import CollectSettings
from rmpipe.data.collect.batch import BatchResult, collect_batch, screen
from rmpipe.data.collect.fast import VOTES_SCHEMA
from rmpipe.data.collect.key_sets import KeyLines, Packed, SeenVotes
from rmpipe.data.collect.parts import PartCounts, write_part
from rmpipe.data.part_memo import (
    LedgerMemo,
    prune_entries,
    seal_problems,
    sealed_sha,
    stage_code,
    write_sealed,
)

MEMO_DIR = Path(".rmpipe/memo/collect")
FORMAT = "rmpipe-collect-memo/2"
PART = "votes.parquet"  # the batch's votes part, byte for byte what data/collected/votes/ holds
FILES = (PART, "keys.bin", "lines.npy", "pairs.bin", "result.json")
STAGE_ENTRY = "stages/collect.py"

log = logging.getLogger("rmpipe.collect")


def settings_key(conf: CollectSettings) -> dict[str, Any]:
    """Every collect setting that can change a batch's outcome: all of them but where the folder is."""
    return {name: str(value) for name, value in sorted(conf.model_dump().items()) if name != "incoming_dir"}


class CollectMemo(LedgerMemo):
    """The memo of one collect run: its settings and code fixed, entries looked up by batch name and content."""

    def __init__(self, root: Path, conf: CollectSettings, code: str | None = None):
        super().__init__(root)
        self.context = {"format": FORMAT, "settings": settings_key(conf), "code": code or stage_code(STAGE_ENTRY, self.root)}
        self.used: set[str] = set()
        self.hits = self.misses = 0

    # --- entries -----------------------------------------------------------------------------------
    def key(self, batch_id: str, sha256: str) -> str:
        blob = json.dumps({**self.context, "batch": batch_id, "sha256": sha256}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _folder(self, key: str) -> Path:
        return self.root / "entries" / key

    def load(self, batch_id: str, sha256: str) -> tuple[BatchResult, Sealed] | None:
        """The outcome stored for this batch (knowing no earlier batch) and its sealed votes part, verified;
        or None."""
        key = self.key(batch_id, sha256)
        folder = self._folder(key)
        if not folder.is_dir():
            return None
        bad = seal_problems(folder, FILES, self.sha_of)
        if bad:
            log.warning("collect memo entry for %s is damaged (%s): deleted, the batch is read again",
                        batch_id, ", ".join(bad))
            shutil.rmtree(folder, ignore_errors=True)
            return None
        stored = json.loads((folder / "result.json").read_text(encoding="utf-8"))
        keyed = KeyLines(Packed.from_bytes((folder / "keys.bin").read_bytes()), np.load(folder / "lines.npy"))
        self.used.add(key)
        counts = PartCounts(stored["votes"], Packed.from_bytes((folder / "pairs.bin").read_bytes()), stored["annotators"])
        return (BatchResult(batch_id, stored["report"], stored["quarantine"], keys=keyed),
                Sealed(folder / PART, counts, sealed_sha(folder, PART)))

    def store(self, result: BatchResult) -> Sealed:
        """Keep an accepted batch's outcome computed knowing no earlier batch, its votes as the very part the
        votes folder holds for it (`collect.parts.write_part`), so a later run links it in unread."""
        key = self.key(result.batch_id, result.report["sha256"])
        written: list[PartCounts] = []

        def write(tmp: Path) -> None:
            votes = result.part if result.part is not None else result.table
            counts = write_part(tmp / PART, votes if votes is not None else VOTES_SCHEMA.empty_table())
            (tmp / "keys.bin").write_bytes(b"".join(result.keys))
            np.save(tmp / "lines.npy", np.fromiter(result.keys.values(), np.int64, len(result.keys)))
            (tmp / "pairs.bin").write_bytes(counts.pairs.to_bytes())
            (tmp / "result.json").write_text(json.dumps({"report": result.report, "quarantine": result.quarantine,
                                                         "votes": counts.votes, "annotators": counts.annotators},
                                                        ensure_ascii=False, default=str), encoding="utf-8")
            written.append(counts)

        final = write_sealed(self._folder(key), write, FILES, self._hashes)
        self.used.add(key)
        return Sealed(final / PART, written[0], sealed_sha(final, PART))

    def reusable(self, result: BatchResult, accepted: SeenVotes) -> bool:
        """Whether a no-earlier-batch outcome is this batch's outcome here: accepted, no vote already in the table."""
        return result.accepted and not accepted.any_of(result.keys)

    def finish(self) -> None:
        """After a run: drop entries no batch used (settings, code or batches changed) and save the file hashes."""
        prune_entries(self.root / "entries", self.used)
        self._hashes.save()
        log.info("collect memo: %d batch(es) reused, %d read (%s)", self.hits, self.misses, self.root)


def memoized(path: Path, conf: CollectSettings, memo: CollectMemo, accepted: SeenVotes,
              seen_files: Mapping[str, str], options: dict) -> tuple[BatchResult, Sealed | None]:
    """A batch's result through the memo: (result, the memo's sealed part when its votes are the memo's)

    Screened first (refusals and duplicate files need no rows). Then the memo's outcome, where no vote of
    it is already in the table; else the batch read knowing no earlier batch (what the memo keeps) and
    taken if earlier batches could not have changed it; else read again knowing them, as without a memo."""
    entry, settled = screen(path, conf, seen_files, options["retracted"], memo.sha_of)
    if settled:
        return BatchResult(path.name, entry), None
    stored = memo.load(path.name, entry["sha256"])
    if stored is not None and memo.reusable(stored[0], accepted):
        memo.hits += 1
        return stored
    memo.misses += 1
    if stored is None:
        alone = collect_batch(path, conf, sha_of=memo.sha_of, **options)
        sealed = memo.store(alone) if alone.accepted else None
        if alone.part is not None:
            alone.part.unlink(missing_ok=True)
            alone.part = None
        alone.table = None  # the votes are in the sealed part now (or were not accepted)
        if not seen_files or memo.reusable(alone, accepted):  # nothing read before it, or nothing it repeats
            return alone, sealed
    return collect_batch(path, conf, earlier=accepted, seen_files=seen_files, sha_of=memo.sha_of, **options), None


@dataclass
class Sealed:
    """A memoized batch's votes part (inside its sealed memo entry), its counts and sha256, known without reading it."""

    part: Path
    counts: PartCounts
    sha256: str

