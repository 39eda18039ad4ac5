"""Aggregate does the text work of what changed only: a content-addressed memo under `.rmpipe/memo/aggregate/`.

Two things cost aggregate its time, and both are functions of one votes part (one batch) and little else:
  - orienting its votes (normalizing both responses of every vote to find the canonical order and the
    text lengths): a function of the part's bytes, kept as three small per-vote arrays (~9 bytes a vote);
  - writing a pairs part: its rows' texts come from the part holding each pair's representative vote, and
    everything else from the pair's computed columns (`PairColumns.digest`), kept as the part file itself.
The integer work over all votes (codes, counts, labels, annotator figures, alpha, the report) is redone
whole every run: it is cheap, and with Dawid-Skene or exclude_flagged every label may depend on every vote.
An entry is used only when its key matches:

    facts:  sha256(format, code, votes part sha256)
    pairs:  sha256(format, code, aggregate settings, votes part sha256, sha256 of the part's pair columns)

where code is the code_hash of stages/aggregate.py's import closure (what `rmpipe deps` writes in dvc.yaml).
An entry is a folder written whole and renamed into place, with `seal.json` (the sha256 of its files) last;
every use checks the seal (file hashes from the ledger the stages share, `part_memo.FileHashes`), and a
damaged entry is deleted and rebuilt. Entries a run did not use are pruned
after it; deleting the memo changes nothing but time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from rmpipe.data.part_memo import (
    LedgerMemo,
    prune_entries,
    seal_problems,
    sealed_sha,
    stage_code,
    write_sealed,
)

MEMO_DIR = Path(".rmpipe/memo/aggregate")
FORMAT = "rmpipe-aggregate-memo/1"
STAGE_ENTRY = "stages/aggregate.py"
FACTS = ("label.npy", "len_first.npy", "len_second.npy")
PART = "pairs.parquet"

log = logging.getLogger("rmpipe.aggregate")


class AggregateMemo(LedgerMemo):
    """The memo of one aggregate run: settings and code fixed; entries keyed as the module says."""

    def __init__(self, root: Path, settings: Any, code: str | None = None):
        super().__init__(root)
        self.code = code or stage_code(STAGE_ENTRY, self.root)
        self.settings = {k: str(v) for k, v in sorted(settings.model_dump().items())}
        self.used: set[str] = set()
        self.hits = {"facts": 0, "pairs": 0}
        self.misses = {"facts": 0, "pairs": 0}

    def linked(self, sealed: Path, target: Path) -> None:
        """`target` now holds the sealed pairs part `sealed`: its hash recorded for split to find."""
        self.record(target, sealed_sha(sealed.parent, sealed.name))

    def _key(self, **what: Any) -> str:
        blob = json.dumps({"format": FORMAT, "code": self.code, **what}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def facts_key(self, part_sha: str) -> str:
        return self._key(kind="facts", part=part_sha)

    def pairs_key(self, part_sha: str, columns_sha: str) -> str:
        return self._key(kind="pairs", settings=self.settings, part=part_sha, columns=columns_sha)

    # --- sealed entries ------------------------------------------------------------------------------
    def _open(self, key: str, files: tuple[str, ...], what: str) -> Path | None:
        """The entry's folder once its seal holds, else None (a damaged entry deleted, with a warning)."""
        folder = self.root / "entries" / key
        kind = "facts" if files == FACTS else "pairs"
        if not folder.is_dir():
            self.misses[kind] += 1
            return None
        bad = seal_problems(folder, files, self.sha_of)
        if bad:
            log.warning("aggregate memo entry for %s is damaged (%s): deleted, made again", what, ", ".join(bad))
            shutil.rmtree(folder, ignore_errors=True)
            self.misses[kind] += 1
            return None
        self.used.add(key)
        self.hits[kind] += 1
        return folder

    def _seal(self, key: str, write: Any, files: tuple[str, ...]) -> Path:
        """Make an entry: `write(folder)` fills a temp folder with `files`; sealed, then renamed into place."""
        final = write_sealed(self.root / "entries" / key, write, files, self._hashes)
        self.used.add(key)
        return final

    # --- the two kinds ---------------------------------------------------------------------------------
    def load_facts(self, part_sha: str, what: str) -> tuple[np.ndarray, ...] | None:
        folder = self._open(self.facts_key(part_sha), FACTS, what)
        return None if folder is None else tuple(np.load(folder / name) for name in FACTS)

    def store_facts(self, part_sha: str, arrays: tuple[np.ndarray, ...]) -> None:
        def write(folder: Path) -> None:
            for name, values in zip(FACTS, arrays):
                np.save(folder / name, values)

        self._seal(self.facts_key(part_sha), write, FACTS)

    def load_part(self, key: str, what: str) -> Path | None:
        folder = self._open(key, (PART,), what)
        return None if folder is None else folder / PART

    def store_part(self, key: str, write: Any) -> Path:
        """`write(path)` writes the pairs part; kept sealed, its path returned (to be linked into the output)."""
        return self._seal(key, lambda folder: write(folder / PART), (PART,)) / PART

    def finish(self) -> None:
        """After a run: drop the entries it did not use (other batches, settings or code)."""
        prune_entries(self.root / "entries", self.used)
        self._hashes.save()
        log.info("aggregate memo: orientation of %d part(s) reused, %d computed; %d pairs part(s) reused, %d written",
                 self.hits["facts"], self.misses["facts"], self.hits["pairs"], self.misses["pairs"])
