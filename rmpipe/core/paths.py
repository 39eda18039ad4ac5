"""Where every stage's files live (dvc.yaml's deps and outs, spelled once), and the one split reader.

    paths = ProjectPaths()              # relative to the working folder, as `dvc repro` runs stages
    paths = ProjectPaths.at(tmp)        # a project copied elsewhere (tests)
    frames = read_splits(paths, ("train", "val"))

The votes (`data/collected/votes/`) and the aggregated pairs (`data/aggregated/pairs/`) are folders of
parquet parts, one per accepted batch, named for it (`part_name`): a new batch adds a part and leaves the
others' bytes alone. Their order is the batches' (file-name) order, read back from the part names
(`vote_parts`, `pair_parts`), not the part files' own sort. A single parquet file is taken where one is given.

A split is a folder of parquet parts, `data/split/<split>/<pairs part>.parquet`, one per part of the
aggregated pairs (so a new batch adds parts and leaves the others' bytes alone); its rows are the parts'
rows in batch order (`parts_in`). A project made by hand may hold a split as one file, `data/split/<split>.parquet`:
every reader here takes either.

dvc.yaml names the same files; `tests/test_paths.py` checks each path here is one it declares.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable, Iterator, Sequence
from urllib.parse import quote, unquote

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
    votes: Path = Path("data/collected/votes")  # one parquet part per accepted batch (`part_name`)
    quarantine: Path = Path("data/collected/quarantine.jsonl")
    collect_report: Path = Path("reports/collect.json")
    pairs: Path = Path("data/aggregated/pairs")  # parts named as the votes part a pair is first seen in
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


PART_SUFFIX = ".parquet"
_LONG_NAME = 200  # bytes of an encoded batch name kept whole in a part name (file names end at 255)


def part_name(batch_id: str) -> str:
    """The votes part of batch `batch_id` (a file name in data/incoming/): the name, %-escaped but for
    letters, digits and "-._", plus ".parquet". A name too long to keep whole is cut and given a hash,
    after "~" (never produced by the escaping). Stable whatever other batches come or go."""
    stem = quote(batch_id, safe="-._")
    if len(stem) > _LONG_NAME:
        stem = f"{stem[:_LONG_NAME - 40].rstrip('%0123456789ABCDEF')}~{hashlib.sha256(batch_id.encode()).hexdigest()[:32]}"
    return stem + PART_SUFFIX


def part_order(part: Path) -> tuple[str, str]:
    """Where a part stands: its batch name (the order collect reads batches in), decoded from its name; a cut
    long name by its kept head, then its hash."""
    stem = part.name[: -len(PART_SUFFIX)]
    head, _, digest = stem.partition("~")
    return unquote(head), digest


def parts_in(location: Path) -> list[Path]:
    """The parquet parts of a parts folder in batch order (`part_order`); a single parquet file as itself,
    also where the folder is absent and `<folder>.parquet` is there (a table made by hand, or an older
    project); [] where there is nothing."""
    location = Path(location)
    if location.is_file():
        return [location]
    if not location.is_dir():
        single = location.with_name(location.name + PART_SUFFIX)
        return [single] if location.suffix != PART_SUFFIX and single.is_file() else []
    return sorted((p for p in location.iterdir() if p.name.endswith(PART_SUFFIX) and p.is_file()
                   and not p.name.startswith(".")), key=part_order)


def vote_parts(paths: ProjectPaths) -> list[Path]:
    """The collected votes' parts in batch order: the vote table is their rows in that order."""
    return parts_in(paths.votes)


def pair_parts(paths: ProjectPaths) -> list[Path]:
    """The aggregated pairs' parts in batch order (the pairs table is their rows in that order)."""
    return parts_in(paths.pairs)


def _require_splits(paths: ProjectPaths, names: Sequence[str]) -> None:
    missing = [name for name in names if not parts_in(paths.split(name))]
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
    return {name: read_parts(parts_in(paths.split(name)), columns) for name in names}


def split_files(paths: ProjectPaths, names: Sequence[str] = SPLITS) -> dict[str, list[Path]]:
    """The named splits' parquet parts, for a reader that goes a part and a chunk at a time; a missing split
    is a DataError."""
    _require_splits(paths, names)
    return {name: parts_in(paths.split(name)) for name in names}


def split_sha256(paths: ProjectPaths, name: str) -> str:
    """One digest of a split's content (its parts' names and bytes), for caches keyed by what they were built from."""
    return path_sha256(paths.split(name))


DVC_LOCK = "dvc.lock"  # the lineage: every stage's inputs, params and outputs, by hash
CHUNK_ROWS = 16_384  # rows read at a time: one chunk of real-length texts (~40 MB at a few KB a row)


def read_chunks(path: Path, batch_rows: int, made_by: str) -> Iterator[pd.DataFrame]:
    """A parquet file, or a folder of parts (`parts_in`, in order), as DataFrames of at most `batch_rows` rows
    (one empty frame when there is no row); a missing or unreadable one is a DataError naming stage `made_by`."""
    parts = parts_in(path)
    if not parts:
        raise DataError(f"{path} not found: run the {made_by} stage first (dvc repro {made_by})")
    empty = None
    for part in parts:
        try:
            parquet = pq.ParquetFile(part, pre_buffer=False)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{part} is not a readable parquet file ({exc}): re-run the {made_by} stage") from None
        for batch in parquet.iter_batches(batch_size=batch_rows):
            empty = False
            yield pa.Table.from_batches([batch]).to_pandas()
        if empty is None:
            empty = parquet.schema_arrow
    if empty is not False:
        yield empty.empty_table().to_pandas()


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
