"""Where every stage's files live (dvc.yaml's deps and outs, spelled once), and the one split reader.

    paths = ProjectPaths()              # relative to the working folder, as `dvc repro` runs stages
    paths = ProjectPaths.at(tmp)        # a project copied elsewhere (tests)
    frames = read_splits(paths, ("train", "val"))

A split is a folder of parquet parts, `data/split/<split>/<pairs part>.parquet`, one per part of the
aggregated pairs (so a new batch adds parts and leaves the others' bytes alone); its rows are the parts'
rows in name order. A project made by hand may hold a split as one file, `data/split/<split>.parquet`:
every reader here takes either.

dvc.yaml names the same files; `tests/test_paths.py` checks each path here is one it declares.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rmpipe.core.errors import DataError
from rmpipe.core.io import path_sha256

SPLITS = ("train", "val", "test")  # = rmpipe.core.schema.SPLITS


@dataclass(frozen=True)
class ProjectPaths:
    """Each file or folder a stage reads or writes, relative to the project root (`ProjectPaths.at(root)`)."""

    # collect / aggregate
    votes: Path = Path("data/collected/votes.parquet")
    quarantine: Path = Path("data/collected/quarantine.jsonl")
    collect_report: Path = Path("reports/collect.json")
    pairs: Path = Path("data/aggregated/pairs.parquet")
    annotators_json: Path = Path("reports/annotators.json")
    annotators_md: Path = Path("reports/annotators.md")
    # split / validate
    split_dir: Path = Path("data/split")
    split_report: Path = Path("reports/split.json")
    data_docs: Path = Path("reports/data_docs")
    validation_report: Path = Path("reports/validation.json")
    # backbone / tokenize / train
    backbone: Path = Path("models/backbone")
    tokenized: Path = Path("data/tokenized")
    checkpoints: Path = Path("checkpoints/train")  # not a DVC output: a killed run resumes from it
    model_dir: Path = Path("models/reward_model")
    train_metrics: Path = Path("metrics/train.json")
    live_dir: Path = Path("dvclive/train")
    # evaluate
    eval_metrics: Path = Path("metrics/eval.json")  # the headline figures runs are compared by
    eval_report: Path = Path("reports/eval.json")  # the whole evaluation record (what export and the audit read)
    pathology: Path = Path("reports/pathology.json")
    eval_summary: Path = Path("reports/eval.md")
    eval_plots: Path = Path("plots/eval")

    @classmethod
    def at(cls, root: str | Path) -> "ProjectPaths":
        """Every path under `root` (a project copied elsewhere, as tests do)."""
        return cls(**{f.name: Path(root) / f.default for f in fields(cls)})

    def split(self, name: str) -> Path:
        """The split's folder of parts; a split written by hand as one file, where that is what exists."""
        folder = self.split_dir / name
        single = self.split_dir / f"{name}.parquet"
        return single if not folder.is_dir() and single.is_file() else folder

    @property
    def train_split(self) -> Path:
        return self.split("train")

    @property
    def val_split(self) -> Path:
        return self.split("val")

    @property
    def training_record(self) -> Path:
        return self.model_dir / "training.json"


def pair_parts(paths: ProjectPaths) -> list[Path]:
    """The aggregated pairs' parquet parts in name order (the pairs table is their rows in that order);
    one file where the pairs are one file. TEMPORARY: the aggregate-parts branch owns this function."""
    if paths.pairs.is_file():
        return [paths.pairs]
    if paths.pairs.is_dir():
        return sorted(p for p in paths.pairs.iterdir() if p.suffix == ".parquet" and p.is_file())
    return []


def parts_of(location: Path) -> list[Path]:
    """A split's parquet parts in name order: the files of its folder, or the one file."""
    if location.is_dir():
        return sorted(p for p in location.iterdir() if p.suffix == ".parquet" and p.is_file())
    return [location] if location.is_file() else []


def _require_splits(paths: ProjectPaths, names: Sequence[str]) -> None:
    missing = [name for name in names if not parts_of(paths.split(name))]
    if missing:
        raise DataError(f"{paths.split_dir}/ has no {', '.join(missing)} split ({paths.split(missing[0])} not found): "
                        "run the split stage first (dvc repro split)")


def read_parts(parts: Sequence[Path], columns: Iterable[str] | None = None) -> pd.DataFrame:
    """The rows of parquet `parts`, in order, as one frame (all columns, or `columns`)."""
    wanted = list(columns) if columns is not None else None
    tables = [pq.read_table(part, columns=wanted) for part in parts]
    try:
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataError(f"the parts of {Path(parts[0]).parent} disagree on their columns ({exc}): "
                        "rebuild them with `dvc repro split`") from None
    return table.to_pandas()


def read_splits(paths: ProjectPaths, names: Sequence[str] = SPLITS,
                columns: Iterable[str] | None = None) -> dict[str, pd.DataFrame]:
    """The named splits as frames (all columns, or `columns`); a missing one is a DataError saying how to build it."""
    _require_splits(paths, names)
    return {name: read_parts(parts_of(paths.split(name)), columns) for name in names}


def split_files(paths: ProjectPaths, names: Sequence[str] = SPLITS) -> dict[str, list[Path]]:
    """The named splits' parquet parts, for a reader that goes a part and a chunk at a time; a missing split
    is a DataError."""
    _require_splits(paths, names)
    return {name: parts_of(paths.split(name)) for name in names}


def split_sha256(paths: ProjectPaths, name: str) -> str:
    """One digest of a split's content (its parts' names and bytes), for caches keyed by what they were built from."""
    return path_sha256(paths.split(name))


DVC_LOCK = "dvc.lock"  # the lineage: every stage's inputs, params and outputs, by hash
CHUNK_ROWS = 16_384  # rows read at a time: one chunk of real-length texts (~40 MB at a few KB a row)


def read_chunks(path: Path, batch_rows: int, made_by: str) -> Iterator[pd.DataFrame]:
    """A parquet file as DataFrames of at most `batch_rows` rows (one empty frame for an empty file);
    a missing or unreadable file is a DataError naming stage `made_by`, which writes it."""
    if not Path(path).exists():
        raise DataError(f"{path} not found: run the {made_by} stage first (dvc repro {made_by})")
    try:
        parquet = pq.ParquetFile(path, pre_buffer=False)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path} is not a readable parquet file ({exc}): re-run the {made_by} stage") from None
    empty = True
    for batch in parquet.iter_batches(batch_size=batch_rows):
        empty = False
        yield pa.Table.from_batches([batch]).to_pandas()
    if empty:
        yield parquet.schema_arrow.empty_table().to_pandas()


PAIR_FIELDS = ("prompt", "chosen", "rejected", "margin", "soft_label")  # what tokenizing a pair reads


def training_splits(paths: ProjectPaths) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, val) for tokenizing and training: each with the pair fields, and train not empty."""
    frames = read_splits(paths, ("train", "val"))
    for name, frame in frames.items():
        missing = [c for c in PAIR_FIELDS if c not in frame.columns]
        if missing:
            raise DataError(f"{paths.split(name)} lacks column(s) {missing}: rebuild it with `dvc repro split`")
    if frames["train"].empty:
        raise DataError(f"{paths.train_split} holds no pairs: add preference batches to data/incoming/ and run "
                        "`dvc repro`")
    return frames["train"], frames["val"]
