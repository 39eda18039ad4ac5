"""Atomic file and folder writes: a reader sees the old output or the new one, never half of either."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

# Test hook (tests/test_reliability.py): "pause:<name>:<signal file>" stops the writer of an output named
# <name> once its new bytes are written and before they are published, touching <signal file>, so a test can
# SIGKILL the stage inside the write; "fail:<name>" raises there instead (a stage failing mid-output).
WRITE_HOOK_ENV = "RMPIPE_TEST_WRITE_HOOK"


def _before_publish(path: Path) -> None:
    hook = os.environ.get(WRITE_HOOK_ENV)
    if not hook:
        return
    action, name, *signal_file = hook.split(":", 2)
    if path.name != name:
        return
    if action == "fail":
        raise OSError(f"{WRITE_HOOK_ENV}: injected failure before publishing {path}")
    Path(signal_file[0]).touch()
    while True:  # until the test kills this process
        time.sleep(1)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it is renamed over `path` (same filesystem, so atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.chmod(0o644)  # mkstemp makes it private; the published file should read like any other
    try:
        yield tmp_path
        _before_publish(path)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def process_gone(pid: int) -> bool:
    """Whether no process has this id (one of another user's counts as there)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove_left_behind(folder: Path, pattern: re.Pattern) -> None:
    """Delete what killed runs left in `folder`: entries whose name matches `pattern`, its first group the pid
    of a process that is gone (a killed stage's temp output may hold gigabytes; no `finally` ran to clear it)."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and process_gone(int(match.group(1))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temp folder beside `path`; on success it replaces `path` whole.

    The old folder is moved aside first and deleted only after the new one is in
    place, so a crash at any point leaves either the old or the new folder. Both
    names carry this process's id: the next run deletes those a killed run left.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_left_behind(path.parent, re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.(?:[^.]+\.tmp|old)"))
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the published folder should read like any other
    try:
        yield tmp
        _before_publish(path)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.{os.getpid()}.old")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks (files here reach gigabytes)."""
    with Path(path).open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def folder_hashes(folder: str | Path, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder` (recursively, dotfiles too) but `exclude`, sorted."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in exclude)
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in files}


def folder_sha256(folder: str | Path, exclude: tuple[str, ...] = ()) -> str:
    """One digest over every file's relative path and sha256 (so a renamed file counts too)."""
    blob = "".join(f"{rel}\x1f{digest}\n" for rel, digest in folder_hashes(folder, exclude).items())
    return hashlib.sha256(blob.encode()).hexdigest()


def path_sha256(path: str | Path) -> str:
    """A file's sha256, or a folder's digest over its files (folder_sha256): one name for either layout."""
    return folder_sha256(path) if Path(path).is_dir() else sha256_file(path)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_parquet(path: str | Path, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


class ParquetChunks:
    """A parquet file written a DataFrame at a time, converted as `DataFrame.to_parquet(index=False)` does,
    one row group per non-empty chunk: a table given as one chunk gets the same bytes as write_parquet.
    An empty chunk is written only when no other came (a file needs its schema)."""

    def __init__(self, path: str | Path):
        self.path, self.rows = Path(path), 0
        self._writer: Any = None
        self._empty: pd.DataFrame | None = None

    def write(self, frame: pd.DataFrame) -> None:
        if len(frame) == 0:
            if self._writer is None and self._empty is None:
                self._empty = frame  # written at close if no row ever comes
            return
        self._append(frame)

    def _append(self, frame: pd.DataFrame) -> None:
        schema = None if self._writer is None else self._writer.schema
        table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, table.schema, compression="snappy")
        self._writer.write_table(table)
        self.rows += table.num_rows

    def close(self) -> None:
        if self._writer is None:
            if self._empty is None:
                raise ValueError(f"{self.path}: no chunk to take the schema from")
            self._append(self._empty)
        self._writer.close()

    def __enter__(self) -> ParquetChunks:
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()
        elif self._writer is not None:
            self._writer.close()


def write_parquet_chunks(path: str | Path, frames: Iterable[pd.DataFrame]) -> int:
    """write_parquet for a table that arrives in chunks (one frame in memory at a time); returns the rows written."""
    with atomic_path(path) as tmp:
        with ParquetChunks(tmp) as out:
            for frame in frames:
                out.write(frame)
    return out.rows


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        with tmp.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


def append_jsonl_locked(path: str | Path, make_record: Callable[[list[dict]], dict], *,
                        header: dict | None = None, default: Callable | None = None) -> dict:
    """Append one JSON line built from the lines already there (e.g. to number it), under an exclusive lock.

    Concurrent writers queue on the lock, so numbers never repeat; earlier bytes are never touched. `header`
    is written first when the file has no line yet.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        rows = [json.loads(line) for line in fh if line.strip()]
        record = make_record(rows)
        fh.seek(0, os.SEEK_END)
        if header is not None and not rows:
            fh.write(json.dumps(header) + "\n")
        fh.write(json.dumps(record, default=default) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return record
