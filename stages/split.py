"""DVC stage `split`: aggregated pairs -> data/split/{train,val,test}/<pairs part>.parquet + reports/split.json.

    python -m stages.split [--params params.yaml]

Each part of the aggregated pairs is split on its own (a pair's split is a pure function of its prompt
hash): its rows go to `data/split/<split>/<part name>`, one file per split, empty files included, so a
split is its parts' rows in name order. What a part becomes is memoized under `.rmpipe/memo/split/`
(rmpipe.data.part_memo: keyed by its content sha256, the split settings and this stage's code closure,
sealed, checked on use): an unchanged part's files are copied back byte for byte, and only a new or
changed part is read. The report counts pairs and distinct prompts over every part, as a run without
the memo does. Streams: a part is read a record batch at a time, so memory holds one batch of texts.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from functools import partial
from pathlib import Path

import pyarrow.parquet as pq

from rmpipe.core import io
from rmpipe.core.errors import DataError
from rmpipe.core.params import PARAMS_FILE, load_params
from rmpipe.core.paths import ProjectPaths, pair_parts, read_chunks
from rmpipe.core.schema import SPLITS
from rmpipe.core.settings import SplitSettings
from rmpipe.core.stage import stage_main
from rmpipe.data.part_memo import PartMemo, stage_code
from rmpipe.data.split import SplitTally, check_not_empty, split_frames, split_pairs

log = logging.getLogger("rmpipe.split")

BATCH_ROWS = 32_768  # pairs per chunk: ~80 MB of real-length text
MEMO_DIR = Path(".rmpipe/memo/split")
FORMAT = "rmpipe-split-memo/1"


def split_part(part: Path, folder: Path, *, salt: str, fractions: dict) -> None:
    """One pairs part's rows -> `folder`/<split>.parquet for each split (empty ones keep the columns)."""
    with contextlib.ExitStack() as files:
        out = {name: files.enter_context(io.ParquetChunks(folder / f"{name}.parquet")) for name in SPLITS}
        for chunk in read_chunks(part, BATCH_ROWS, "aggregate"):
            for name, frame in split_frames(split_pairs(chunk, salt, fractions)).items():
                out[name].write(frame)


def run(params_file: str | Path = PARAMS_FILE, paths: ProjectPaths = ProjectPaths(),
        memo_dir: Path = MEMO_DIR) -> dict:
    settings = SplitSettings.parse(load_params(params_file))
    salt, fractions = settings.salt, settings.fractions
    parts = pair_parts(paths)
    if not parts:
        raise DataError(f"{paths.pairs} not found: run the aggregate stage first (dvc repro aggregate)")
    memo = PartMemo(memo_dir, {"format": FORMAT, "salt": salt, "fractions": dict(fractions),
                               "batch_rows": BATCH_ROWS, "code": stage_code("stages/split.py", memo_dir)})  # rows: row groups
    tally = SplitTally()
    with io.atomic_dir(paths.split_dir) as tmp:
        for part in parts:
            key = memo.key(memo.sha_of(part))
            entry = memo.load(key, str(part)) or memo.store(key, partial(split_part, part, salt=salt, fractions=fractions))
            for name in SPLITS:
                memo.place(entry, f"{name}.parquet", tmp / name / part.name)
                tally.add(pq.read_table(entry / f"{name}.parquet", columns=["split", "prompt_hash"]).to_pandas())
    memo.moved(tmp, paths.split_dir)
    memo.finish("split")
    report = tally.report(fractions)
    io.write_json(paths.split_report, report)

    for name in fractions:
        part = report[name]
        log.info("%-5s %7d pairs  %6d prompts  (%.3f of prompts, target %.3f)",
                 name, part["pairs"], part["prompts"], part["prompt_fraction"], part["target_fraction"])
    check_not_empty(report)  # after the report, so it can be read
    return report


main = stage_main("split", run, __doc__)

if __name__ == "__main__":
    main(sys.argv[1:])
