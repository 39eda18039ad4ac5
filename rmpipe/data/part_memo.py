"""A content-addressed memo of what a stage made of one part of its input, under `.rmpipe/memo/<stage>/`.

Split and validate work a part at a time (a pairs part, a split part): what a part becomes is a function
of its bytes, the stage's settings and the stage's code, so it is kept keyed by

    sha256(format, settings, code_hash of the stage module, the part's content sha256)

(the code hash is the import closure `rmpipe deps` writes into dvc.yaml). The house pattern of the collect
memo: an entry is a folder written whole and renamed into place, `seal.json` (written last) holds the
sha256 of each of its files and is checked on every use, so a damaged or half-written entry is deleted
and the part worked again, never trusted. Entries a run did not use are pruned after it. Deleting the
memo changes nothing but time.

Part hashes are remembered by (size, mtime_ns, ctime_ns, inode), the signals DVC's own hash cache trusts,
so an unchanged part is not read again just to be named.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rmpipe.core.io import sha256_file

SEAL = "seal.json"

log = logging.getLogger("rmpipe.memo")


class PartMemo:
    """One run's memo for a stage: settings and code fixed, entries looked up by a part's content sha256."""

    def __init__(self, root: Path, context: dict[str, Any]):
        self.root = Path(root)
        self.context = context
        self.used: set[str] = set()
        self.hits = self.misses = 0
        self._hashed: set[str] = set()
        self._hashes_file = self.root / "file-hashes.json"
        self._hashes = self._load_hashes()

    def _load_hashes(self) -> dict[str, list]:
        try:
            hashes = json.loads(self._hashes_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return hashes if isinstance(hashes, dict) else {}

    def sha_of(self, path: Path) -> str:
        """A file's content sha256, read again only when its stat signature changed."""
        st = Path(path).stat()
        signature = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        name = str(Path(path).absolute())
        self._hashed.add(name)
        known = self._hashes.get(name)
        if isinstance(known, list) and known[:4] == signature:
            return known[4]
        sha = sha256_file(path)
        self._hashes[name] = [*signature, sha]
        return sha

    def key(self, sha256: str) -> str:
        blob = json.dumps({**self.context, "sha256": sha256}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _folder(self, key: str) -> Path:
        return self.root / "entries" / key

    def has(self, key: str) -> bool:
        """Whether an entry is there (not yet whether it is sound: `load` checks that)."""
        return self._folder(key).is_dir()

    def load(self, key: str, what: str) -> Path | None:
        """The entry's folder, every file checked against its seal; None where there is none or it was damaged
        (then deleted, so the part is worked again). `what` names the part in the warning."""
        folder = self._folder(key)
        if not folder.is_dir():
            return None
        try:
            seal = json.loads((folder / SEAL).read_text(encoding="utf-8"))
            files = sorted(p.name for p in folder.iterdir() if p.name != SEAL)
            bad = [name for name in sorted(set(files) | set(seal)) if name not in seal or name not in files
                   or sha256_file(folder / name) != seal[name]]
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            bad = [f"{SEAL} ({exc})"]
        if bad or not seal:
            log.warning("memo entry for %s is damaged (%s): deleted, the part is worked again", what,
                        ", ".join(bad) or "empty")
            shutil.rmtree(folder, ignore_errors=True)
            return None
        self.used.add(key)
        self.hits += 1
        return folder

    def store(self, key: str, write: Callable[[Path], None]) -> Path:
        """`write(folder)` fills a fresh folder, which is sealed and renamed into place as the entry."""
        final = self._folder(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
        try:
            write(tmp)
            seal = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
            (tmp / SEAL).write_text(json.dumps(seal), encoding="utf-8")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.used.add(key)
        self.misses += 1
        return final

    def finish(self, stage: str) -> None:
        """After a run: drop entries it did not use (settings, code or parts changed); save the part hashes."""
        entries = self.root / "entries"
        if entries.is_dir():
            for folder in entries.iterdir():
                if folder.name not in self.used:
                    shutil.rmtree(folder, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self._hashes_file.with_suffix(".tmp")
        kept = {name: self._hashes[name] for name in sorted(self._hashed & set(self._hashes))}
        tmp.write_text(json.dumps(kept), encoding="utf-8")
        os.replace(tmp, self._hashes_file)
        log.info("%s memo: %d entries reused, %d made (%s)", stage, self.hits, self.misses, self.root)


def place(source: Path, target: Path) -> None:
    """`source` (a sealed memo file) copied to `target` (in the kernel where it can). Not a hard link: the
    output and the DVC cache object made from it would share the memo's bytes, and a damaged memo file
    would damage them too."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
