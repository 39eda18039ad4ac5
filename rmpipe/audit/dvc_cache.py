"""Reading (and, for a purge, deleting) objects in the project's DVC cache by the md5s dvc.lock records.

DVC 3 keeps a file output as one object named by its md5, and a folder output as a
`<md5>.dir` object (a JSON list of {relpath, md5}) plus one object per file. The run
cache (`.dvc/cache/runs/`) keeps, per stage run, the md5s of its deps and outs: that is
how a purge finds every output a batch flowed into, including runs that never reached
an export.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

import yaml


def cache_root(root: Path) -> Path:
    """The cache folder (`cache.dir` from DVC's config, else .dvc/cache)."""
    # The config files are plain INI; reading them through dvc.repo.Repo costs about a second.
    import configparser

    for name in ("config.local", "config"):
        path = Path(root) / ".dvc" / name
        if path.exists():
            parser = configparser.ConfigParser()
            parser.read(path)
            if parser.has_option("cache", "dir"):
                configured_dir = Path(parser.get("cache", "dir"))
                return configured_dir if configured_dir.is_absolute() else (path.parent / configured_dir).resolve()
    return Path(root) / ".dvc" / "cache"


def object_path(root: Path, md5: str) -> Path:
    return cache_root(root) / "files" / "md5" / md5[:2] / md5[2:]


def dir_listing(root: Path, md5_dir: str) -> dict[str, str]:
    """{relpath: md5} of a `<md5>.dir` folder object; {} when the object is not in the cache."""
    path = object_path(root, md5_dir)
    if not md5_dir.endswith(".dir") or not path.exists():
        return {}
    return {entry["relpath"]: entry["md5"] for entry in json.loads(path.read_text(encoding="utf-8"))}


def objects_of(root: Path, md5: str) -> set[str]:
    """The md5 itself plus, for a folder object, every file object it lists."""
    return {md5, *dir_listing(root, md5).values()}


def file_in_output(root: Path, md5: str, relpath: str | None = None) -> Path | None:
    """The cached bytes of an output (a file, or `relpath` inside a folder output), or None if not cached."""
    if relpath is not None:
        md5 = dir_listing(root, md5).get(relpath)
        if md5 is None:
            return None
    path = object_path(root, md5)
    return path if path.exists() else None


class DamagedObject(Exception):
    """A cache object whose bytes do not hash to its name (a flipped bit, a truncated copy)."""

    def __init__(self, path: Path, md5: str, actual: str):
        super().__init__(f"{path} should hash to md5 {md5} but hashes to {actual}")
        self.path, self.md5, self.actual = path, md5, actual


def verified(path: Path, md5: str) -> Path:
    """`path` (the object named `md5`) once its bytes are checked against its name; `DamagedObject` if not.
    A file object's name is the md5 of its bytes (DVC 3; a binary file is hashed the same by the legacy
    md5-dos2unix). A folder's `.dir` listing is checked by the objects it lists, each verified when read."""
    if md5.endswith(".dir"):
        return path
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != md5:
        raise DamagedObject(path, md5, digest.hexdigest())
    return path


def run_cache_entries(root: Path) -> Iterator[tuple[Path, set[str], set[str]]]:
    """(entry file, dep md5s, out md5s) for every stage run DVC has cached."""
    runs = cache_root(root) / "runs"
    if not runs.is_dir():
        return
    for entry in runs.glob("*/*/*"):
        if not entry.is_file():
            continue
        try:
            data = yaml.safe_load(entry.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError):
            continue
        deps = {d["md5"] for d in data.get("deps") or [] if isinstance(d, dict) and d.get("md5")}
        outs = {o["md5"] for o in data.get("outs") or [] if isinstance(o, dict) and o.get("md5")}
        yield entry, deps, outs


def lock_md5s(root: Path) -> set[str]:
    """Every dep/out md5 the current dvc.lock names (what the workspace's pipeline needs)."""
    lock = Path(root) / "dvc.lock"
    if not lock.exists():
        return set()
    data = yaml.safe_load(lock.read_text(encoding="utf-8")) or {}
    found = set()
    for entry in (data.get("stages") or {}).values():
        for item in (entry.get("deps") or []) + (entry.get("outs") or []):
            if item.get("md5"):
                found.add(item["md5"])
    return found
