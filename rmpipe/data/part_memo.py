"""A content-addressed memo of what a stage made of one part of its input, under `.rmpipe/memo/<stage>/`.

Split and validate work a part at a time (a pairs part, a split part): what a part becomes is a function
of its bytes, the stage's settings and the stage's code, so it is kept keyed by

    sha256(format, settings, code_hash of the stage module, the part's content sha256)

(the code hash is the import closure `rmpipe deps` writes into dvc.yaml). The house pattern of the collect
memo: an entry is a folder written whole and renamed into place, `seal.json` (written last) holds the
sha256 of each of its files and is checked on every use, so a damaged or half-written entry is deleted
and the part worked again, never trusted. Entries a run did not use are pruned after it. Deleting the
memo changes nothing but time.

The sealed entries (`seal_problems`, `write_sealed`, `prune_entries`) and the file-hash cache (`FileHashes`)
are also what collect's and aggregate's memos are made of.

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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rmpipe.core.io import sha256_file

SEAL = "seal.json"

log = logging.getLogger("rmpipe.memo")


def seal_problems(folder: Path, files: Sequence[str] | None = None) -> list[str]:
    """What is wrong with the sealed entry `folder`: the files (of `files`, or every file, and then the seal
    must name exactly the folder's files) whose sha256 is not the seal's; [] where it is sound."""
    try:
        seal = json.loads((folder / SEAL).read_text(encoding="utf-8"))
        if files is not None:
            return [name for name in files if sha256_file(folder / name) != seal.get(name)]
        present = sorted(p.name for p in folder.iterdir() if p.name != SEAL)
        bad = [name for name in sorted(set(present) | set(seal)) if name not in seal or name not in present
               or sha256_file(folder / name) != seal[name]]
        return bad or ([] if seal else ["empty"])
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        return [f"{SEAL} ({exc})"]


def write_sealed(final: Path, write: Callable[[Path], None], files: Sequence[str] | None = None) -> Path:
    """`write(folder)` fills a fresh folder; the sha256 of `files` (or of every file it wrote) go into its
    seal, written last, and the folder is renamed into place as `final`: an entry is whole or absent."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        write(tmp)
        names = files if files is not None else sorted(p.name for p in tmp.iterdir())
        seal = {name: sha256_file(tmp / name) for name in names}
        (tmp / SEAL).write_text(json.dumps(seal), encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def prune_entries(entries: Path, used: set[str]) -> None:
    """Drop the entries a run did not use (their settings, code or inputs changed)."""
    if entries.is_dir():
        for folder in entries.iterdir():
            if folder.name not in used:
                shutil.rmtree(folder, ignore_errors=True)


class FileHashes:
    """Files' content sha256, kept in `<root>/file-hashes.json` by (size, mtime_ns, ctime_ns, inode) and read
    again only when that signature changed; `save` keeps the files this run asked about, no others."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._file = self.root / "file-hashes.json"
        self._asked: set[str] = set()
        try:
            hashes = json.loads(self._file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            hashes = {}
        self._hashes: dict[str, list] = hashes if isinstance(hashes, dict) else {}

    def sha_of(self, path: Path) -> str:
        st = Path(path).stat()
        signature = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        name = str(Path(path).absolute())
        self._asked.add(name)
        known = self._hashes.get(name)
        if isinstance(known, list) and known[:4] == signature:
            return known[4]
        sha = sha256_file(path)
        self._hashes[name] = [*signature, sha]
        return sha

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self._file.with_suffix(".tmp")
        kept = {name: self._hashes[name] for name in sorted(self._asked & set(self._hashes))}
        tmp.write_text(json.dumps(kept), encoding="utf-8")
        os.replace(tmp, self._file)


class PartMemo:
    """One run's memo for a stage: settings and code fixed, entries looked up by a part's content sha256."""

    def __init__(self, root: Path, context: dict[str, Any]):
        self.root = Path(root)
        self.context = context
        self.used: set[str] = set()
        self.hits = self.misses = 0
        self._hashes = FileHashes(self.root)

    def sha_of(self, path: Path) -> str:
        """A file's content sha256, read again only when its stat signature changed."""
        return self._hashes.sha_of(path)

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
        bad = seal_problems(folder)
        if bad:
            log.warning("memo entry for %s is damaged (%s): deleted, the part is worked again", what, ", ".join(bad))
            shutil.rmtree(folder, ignore_errors=True)
            return None
        self.used.add(key)
        self.hits += 1
        return folder

    def store(self, key: str, write: Callable[[Path], None]) -> Path:
        """`write(folder)` fills a fresh folder, which is sealed and renamed into place as the entry."""
        final = write_sealed(self._folder(key), write)
        self.used.add(key)
        self.misses += 1
        return final

    def finish(self, stage: str) -> None:
        """After a run: drop entries it did not use (settings, code or parts changed); save the part hashes."""
        prune_entries(self.root / "entries", self.used)
        self._hashes.save()
        log.info("%s memo: %d entries reused, %d made (%s)", stage, self.hits, self.misses, self.root)


def place(source: Path, target: Path) -> None:
    """`source` (a sealed memo file) copied to `target` (in the kernel where it can). Not a hard link: the
    output and the DVC cache object made from it would share the memo's bytes, and a damaged memo file
    would damage them too."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
