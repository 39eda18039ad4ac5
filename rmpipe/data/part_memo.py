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

Part hashes come from the file-hash ledger the stages share (`FileHashes`): a part is hashed once, by
the stage that writes it or the first that meets it, not again by every stage after it just to be named.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rmpipe.core import codedeps
from rmpipe.core.io import sha256_file, write_text

SEAL = "seal.json"

log = logging.getLogger("rmpipe.memo")


def seal_problems(folder: Path, files: Sequence[str] | None = None,
                  sha_of: Callable[[Path], str] = sha256_file) -> list[str]:
    """What is wrong with the sealed entry `folder`: the files (of `files`, or every file, and then the seal
    must name exactly the folder's files) whose sha256 (`sha_of`: a memo passes its ledger's) is not the
    seal's; [] where it is sound."""
    try:
        seal = json.loads((folder / SEAL).read_text(encoding="utf-8"))
        if files is not None:
            return [name for name in files if sha_of(folder / name) != seal.get(name)]
        present = sorted(p.name for p in folder.iterdir() if p.name != SEAL)
        bad = [name for name in sorted(set(present) | set(seal)) if name not in seal or name not in present
               or sha_of(folder / name) != seal[name]]
        return bad or ([] if seal else ["empty"])
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        return [f"{SEAL} ({exc})"]


def write_sealed(final: Path, write: Callable[[Path], None], files: Sequence[str] | None = None,
                 hashes: FileHashes | None = None) -> Path:
    """`write(folder)` fills a fresh folder; the sha256 of `files` (or of every file it wrote) go into its
    seal, written last, and the folder is renamed into place as `final`: an entry is whole or absent. The
    hashes are recorded in `hashes` (the ledger) too."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        write(tmp)
        names = files if files is not None else sorted(p.name for p in tmp.iterdir())
        hashed_at = time.time_ns()
        seal = {name: sha256_file(tmp / name) for name in names}
        (tmp / SEAL).write_text(json.dumps(seal), encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if hashes is not None:
        for name, sha in seal.items():
            hashes.record(final / name, sha, hashed_at)
    return final


def sealed_sha(folder: Path, name: str) -> str:
    """The sha256 the seal of entry `folder` holds for its file `name` (checked when the entry was opened)."""
    return json.loads((folder / SEAL).read_text(encoding="utf-8"))[name]


def prune_entries(entries: Path, used: set[str]) -> None:
    """Drop the entries a run did not use (their settings, code or inputs changed)."""
    if entries.is_dir():
        for folder in entries.iterdir():
            if folder.name not in used:
                shutil.rmtree(folder, ignore_errors=True)


LEDGER = "file-hashes.json"  # beside the stages' memo folders: one ledger they all share
RACY_NS = 2_000_000_000  # a hash taken this soon after the file's mtime is not trusted (coarse-clock file systems)


class FileHashes:
    """Files' content sha256, remembered in one ledger the stages share (`.rmpipe/memo/file-hashes.json`), so a
    part is hashed once, by whoever meets it first, and not again by every stage that reads it after.

    A record holds the file's (size, mtime_ns, inode), the signature DVC's own hash cache trusts, the time
    its bytes were known to have that sha256, and the sha256; it is used while the file still shows the
    signature. A stage that writes or places a file records its hash (`record`): collect's votes parts and
    aggregate's pairs parts are hard links to memo files, and split's parts are copies given their memo
    file's mtime, so the next stage finds them known although DVC deleted them and the stage made them again.

    A record whose hash was taken less than RACY_NS after the file's mtime is not trusted (git's "racy clean"
    rule): a later write within the same clock tick would leave the signature as it was. So `save`, at the
    end of the stage that wrote the files, hashes its racy records again once they are old enough: the next
    run trusts them instead of reading every part a full run wrote. `save` merges this run's records into the
    ledger and drops those of files gone or changed."""

    def __init__(self, ledger: Path):
        self.ledger = Path(ledger)
        self._mine: dict[str, list] = {}
        self._known = _json_dict(self.ledger)
        self._placed: list[tuple[Path, str, int]] = []

    def sha_of(self, path: Path) -> str:
        """The file's content sha256: from the ledger while its signature holds, else read and recorded."""
        name, signature = _signature(path)
        for records in (self._mine, self._known):
            known = records.get(name)
            if _trusted(known, signature):
                return known[4]
        hashed_at = time.time_ns()
        sha = sha256_file(path)
        self._mine[name] = [*signature, hashed_at, sha]
        return sha

    def record(self, path: Path, sha: str, hashed_at: int | None = None) -> None:
        """`path` holds bytes whose sha256 is `sha`, known since `hashed_at` (default: now). Signed when saved,
        where the file is then (`moved`): a write in between shows as a newer mtime, never trusted."""
        self._placed.append((Path(path), sha, hashed_at or time.time_ns()))

    def moved(self, old: Path, new: Path) -> None:
        """The folder `old`, where files were recorded, is now `new` (an output published by renaming)."""
        self._placed = [(new / path.relative_to(old) if path.is_relative_to(old) else path, sha, at)
                        for path, sha, at in self._placed]

    def save(self) -> None:
        """This run's records (racy ones hashed again where they are old enough now) merged into the ledger, read
        again first (another stage may have saved since); records of files gone or changed are dropped."""
        for path, sha, hashed_at in self._placed:
            try:
                name, signature = _signature(path)
            except OSError:
                continue
            self._mine[name] = [*signature, hashed_at, sha]
        self._placed = []
        self._settle()
        merged = {**_json_dict(self.ledger), **self._mine}
        kept = {}
        for name, record in sorted(merged.items()):
            try:
                if _signature(Path(name))[1] == record[:3]:
                    kept[name] = record
            except (OSError, TypeError):
                continue
        write_text(self.ledger, json.dumps(kept))

    def _settle(self) -> None:
        """Hash again this run's racy records whose files are now older than RACY_NS (a hard link and its memo
        file, one inode, once), so they are trusted from now on."""
        done: dict[tuple, tuple[int, str]] = {}
        for name, record in self._mine.items():
            if record[3] - record[1] >= RACY_NS:
                continue
            try:
                st = os.stat(name)
            except OSError:
                continue
            if time.time_ns() - st.st_mtime_ns < RACY_NS:
                continue  # too young still: the next run hashes it
            inode = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if inode not in done:
                hashed_at = time.time_ns()
                done[inode] = (hashed_at, sha256_file(name))
            self._mine[name] = [st.st_size, st.st_mtime_ns, st.st_ino, *done[inode]]


def _signature(path: Path) -> tuple[str, list[int]]:
    st = Path(path).stat()
    return str(Path(path).absolute()), [st.st_size, st.st_mtime_ns, st.st_ino]


def _trusted(record: Any, signature: list[int]) -> bool:
    return (isinstance(record, list) and len(record) == 5 and record[:3] == signature
            and isinstance(record[3], int) and record[3] - signature[1] >= RACY_NS)


def _json_dict(path: Path) -> dict:
    """A JSON object kept beside the memos (the ledger, the code hashes); {} where it is missing or unreadable."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return records if isinstance(records, dict) else {}


CODE_HASHES = "code-hashes.json"  # beside the ledger: each stage's code hash and what it was computed from


def stage_code(entry: str, memo_root: Path, root: Path = codedeps.ROOT) -> str:
    """`codedeps.code_hash(entry)`, the code term of a memo's keys, without walking the imports each run: kept
    beside the memos with the signature of every file the walk read and of every package folder (a module
    added to one can join the closure with no walked file changed), and used while all still show it."""
    store = Path(memo_root).parent / CODE_HASHES
    records = _json_dict(store)
    name = f"{Path(root).absolute()}::{entry}"
    known = records.get(name)
    if isinstance(known, dict) and isinstance(known.get("signature"), dict) and isinstance(known.get("hash"), str):
        try:
            if _code_signature(known["signature"], root) == known["signature"] and known.get("trusted"):
                return known["hash"]
        except OSError:  # a file of the walk is gone: walked again
            pass
    walked = sorted(p.relative_to(root).as_posix() for p in codedeps.walk(entry, root))
    folders = sorted(str(Path(d).relative_to(root)) + "/" for package in codedeps.PACKAGES
                     for d, _, _ in os.walk(Path(root) / package) if "__pycache__" not in Path(d).parts)
    signature = _code_signature(dict.fromkeys(walked + folders), root)
    digest = codedeps.code_hash(entry, root)
    newest = max((mtime for _size, mtime, _ino in signature.values()), default=0)
    records[name] = {"hash": digest, "signature": signature, "trusted": time.time_ns() - newest >= RACY_NS}
    write_text(store, json.dumps(records))
    return digest


def _code_signature(names: dict, root: Path) -> dict[str, list[int]]:
    """(size, mtime_ns, inode) of each root-relative file or folder (a folder: size 0)."""
    out = {}
    for name in names:
        st = (Path(root) / name).stat()
        out[name] = [0 if name.endswith("/") else st.st_size, st.st_mtime_ns, st.st_ino]
    return out


class LedgerMemo:
    """What every stage's memo (collect's, aggregate's, `PartMemo`) shares: its folder `root` and the file-hash
    ledger beside it, through which it names files and records the outputs it places."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._hashes = FileHashes(self.root.parent / LEDGER)

    def sha_of(self, path: Path) -> str:
        """A file's content sha256, read only where the ledger does not know it (`FileHashes`)."""
        return self._hashes.sha_of(path)

    def record(self, path: Path, sha256: str) -> None:
        """`path` now holds bytes of this sha256 (an output placed from a sealed memo file)."""
        self._hashes.record(path, sha256)

    def moved(self, old: Path, new: Path) -> None:
        """Files placed under `old` are now under `new` (the output folder published by renaming)."""
        self._hashes.moved(old, new)


class PartMemo(LedgerMemo):
    """One run's memo for a stage: settings and code fixed, entries looked up by a part's content sha256."""

    def __init__(self, root: Path, context: dict[str, Any]):
        super().__init__(root)
        self.context = context
        self.used: set[str] = set()
        self.hits = self.misses = 0

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
        bad = seal_problems(folder, sha_of=self.sha_of)
        if bad:
            log.warning("memo entry for %s is damaged (%s): deleted, the part is worked again", what, ", ".join(bad))
            shutil.rmtree(folder, ignore_errors=True)
            return None
        self.used.add(key)
        self.hits += 1
        return folder

    def store(self, key: str, write: Callable[[Path], None]) -> Path:
        """`write(folder)` fills a fresh folder, which is sealed and renamed into place as the entry."""
        final = write_sealed(self._folder(key), write, hashes=self._hashes)
        self.used.add(key)
        self.misses += 1
        return final

    def place(self, entry: Path, name: str, target: Path) -> None:
        """The entry's file `name` copied to `target` (`place`), its hash recorded for the next stage to find."""
        place(entry / name, target)
        self.record(target, sealed_sha(entry, name))

    def finish(self, stage: str) -> None:
        """After a run: drop entries it did not use (settings, code or parts changed); save the file hashes."""
        prune_entries(self.root / "entries", self.used)
        self._hashes.save()
        log.info("%s memo: %d entries reused, %d made (%s)", stage, self.hits, self.misses, self.root)


def place(source: Path, target: Path) -> None:
    """`source` (a sealed memo file) copied to `target` (in the kernel where it can). Not a hard link: the
    output and the DVC cache object made from it would share the memo's bytes, and a damaged memo file
    would damage them too. The copy keeps the memo file's mtime: its ledger record stays trusted (`RACY_NS`),
    and any later write to the output still changes its signature."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    st = source.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
