"""Hugging Face datasets as batches: `save_to_disk` folders, hub-style shard folders, and `rmpipe import`.

A folder in the incoming folder is a batch when `datasets` can read it:
  hf_disk    written by `Dataset.save_to_disk` (state.json) or `DatasetDict.save_to_disk`
             (dataset_dict.json; `collect.hf_split` picks the split, default train)
  hf_shards  data files the hub's layout rules split by name (data/train-00000-of-00002.parquet,
             *.jsonl, ...), read with `datasets.load_dataset(folder, split=collect.hf_split)`
The folder's name is the batch id; its content hash is over every file (relative path + sha256).
`datasets` is imported only when such a folder (or an import) is there: plain-file batches never pay for it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from rmpipe.core.errors import DataError
from rmpipe.core.io import atomic_path, sha256_file, write_json

DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv", ".arrow")
SOURCE_SUFFIX = ".source.json"  # `rmpipe import`'s sidecar: <batch file>.source.json


class UnreadableDataset(ValueError):
    """`datasets` could not read the folder (collect rejects the batch with this message)."""


def folder_kind(path: Path) -> str | None:
    """"hf_disk", "hf_shards" or None (not a dataset folder)."""
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return "hf_disk"
    if any(p.suffix.lower() in DATA_SUFFIXES for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        return "hf_shards"
    return None


def folder_files(path: Path) -> list[Path]:
    """Every file under the folder (dotfiles included: they are bytes DVC hashes too), sorted."""
    return sorted(p for p in path.rglob("*") if p.is_file() or p.is_symlink())


def _datasets():
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # a batch is read from disk; never reach for the hub
    import datasets

    datasets.disable_progress_bars()
    return datasets


def read_rows(path: Path, kind: str, split: str) -> Iterator[tuple[int, dict, dict]]:
    """(row number, record, raw) for each row of the chosen split; UnreadableDataset if `datasets` refuses."""
    datasets = _datasets()
    with tempfile.TemporaryDirectory(prefix="rmpipe-hf-") as cache:  # datasets' locks stay out of ~/.cache
        try:
            if kind == "hf_disk":
                loaded = datasets.load_from_disk(str(path))
                if isinstance(loaded, datasets.DatasetDict):
                    if split not in loaded:
                        raise UnreadableDataset(f"has no split {split!r} (it has {', '.join(loaded)}): "
                                                "set collect.hf_split")
                    loaded = loaded[split]
                rows = loaded.iter(batch_size=4096)
            else:
                loaded = datasets.load_dataset(str(path.resolve()), split=split, streaming=True, cache_dir=cache)
                rows = loaded.iter(batch_size=4096)
            number = 0
            for batch in rows:
                names = list(batch)
                for values in zip(*(batch[n] for n in names)):
                    number += 1
                    rec = dict(zip(names, values))
                    yield number, rec, rec
        except UnreadableDataset:
            raise
        except Exception as exc:  # datasets raises many kinds (ValueError, FileNotFoundError, its own): one message
            raise UnreadableDataset(f"datasets cannot read it: {type(exc).__name__}: {exc}"[:1000]) from None


# ------------------------------------------------------------------------------ rmpipe import


def import_dataset(dataset_id: str, split: str, revision: str | None, out_dir: str | Path,
                   name: str | None = None) -> tuple[Path, dict[str, Any]]:
    """`rmpipe import`: one split of a hub dataset (or a local dataset folder) -> a parquet batch in
    `out_dir` plus its sidecar `<batch>.source.json` (id, split, revision, file hashes) for the lineage."""
    datasets = _datasets() if Path(dataset_id).exists() else _online_datasets()
    try:
        data = datasets.load_dataset(dataset_id, split=split, revision=revision)
    except Exception as exc:
        raise DataError(f"cannot load {dataset_id!r} split {split!r}"
                        f"{f' at revision {revision!r}' if revision else ''}: {type(exc).__name__}: {exc}"[:1000]) from None
    stem = name or f"{dataset_id.strip('/').replace('/', '__')}-{split}"
    out = Path(out_dir) / f"{stem}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        raise DataError(f"{out} exists already: remove it, or pass --name for another batch id")
    with atomic_path(out) as tmp:
        data.to_parquet(str(tmp))
    source = {
        "dataset_id": dataset_id,
        "split": split,
        "revision": revision,
        "resolved_revision": _resolved_revision(dataset_id, revision),
        "rows": data.num_rows,
        "features": {k: str(v) for k, v in data.features.items()},
        "source_files": _source_files(dataset_id, data),
        "batch_file": out.name,
        "batch_sha256": sha256_file(out),
        "datasets_version": datasets.__version__,
    }
    write_json(out.with_name(out.name + SOURCE_SUFFIX), source)
    return out, source


def _online_datasets():
    import datasets

    datasets.disable_progress_bars()
    return datasets


def _source_files(dataset_id: str, data) -> dict[str, str]:
    """sha256 of what was read: the data files of a local folder; else the hub's recorded checksums."""
    local = Path(dataset_id)
    if local.is_dir():
        return {p.relative_to(local).as_posix(): sha256_file(p) for p in folder_files(local)
                if p.suffix.lower() in DATA_SUFFIXES}
    checksums = getattr(data.info, "download_checksums", None) or {}
    return {url: str(item.get("checksum")) for url, item in checksums.items()}


def _resolved_revision(dataset_id: str, revision: str | None) -> str | None:
    """The hub commit a revision name resolved to (best effort: None for local folders or without network)."""
    if Path(dataset_id).exists():
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(dataset_id, revision=revision).sha
    except Exception:  # offline, or no hub client: the requested revision is what we can record
        return None


def sidecar_source(batch: Path) -> dict[str, Any] | None:
    """What `rmpipe import` recorded for `batch` (its <name>.source.json), or None when there is none.
    A name too long for a sidecar has none (the batch itself is refused for its name, see `collect.batch`)."""
    sidecar = batch.with_name(batch.name + SOURCE_SUFFIX)
    try:
        present = sidecar.is_file()
    except OSError:  # ENAMETOOLONG: the sidecar's name cannot exist on this file system
        return None
    return read_source(sidecar) if present else None


def read_source(path: Path) -> dict[str, Any]:
    """A sidecar's content; {'error': ...} when it is not readable JSON (recorded, never fatal)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeError, json.JSONDecodeError) as exc:
        return {"error": f"unreadable {path.name}: {exc}"}
    return value if isinstance(value, dict) else {"error": f"{path.name} is not a JSON object"}
