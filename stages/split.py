"""DVC stage `split`: aggregated pairs -> data/split/{train,val,test}.parquet + reports/split.json.

    python -m stages.split [--params params.yaml]

Streams: pairs.parquet is read a record batch at a time and each batch's rows are appended to the
split their prompt hash picks, so memory holds one batch of texts whatever the number of pairs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path
from typing import Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rmpipe import io
from rmpipe.errors import DataError, exits_cleanly
from rmpipe.params import get, load_params, section
from rmpipe.progress import setup_logging
from rmpipe.schema import SPLITS
from rmpipe.split import SplitTally, check_fractions, check_not_empty, split_frames, split_pairs

log = logging.getLogger("rmpipe.split")

PAIRS = Path("data/aggregated/pairs.parquet")
OUT_DIR = Path("data/split")
REPORT = Path("reports/split.json")
BATCH_ROWS = 32_768  # pairs per chunk: ~80 MB of real-length text


def read_chunks(path: Path, batch_rows: int | None = None) -> Iterator[pd.DataFrame]:
    """pairs.parquet as DataFrames of at most `batch_rows` rows (one empty frame for an empty file)."""
    if not path.exists():
        raise DataError(f"{path} not found: run the aggregate stage first (dvc repro aggregate)")
    try:
        parquet = pq.ParquetFile(path, pre_buffer=False)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path} is not a readable parquet file ({exc}): re-run the aggregate stage") from None
    empty = True
    for batch in parquet.iter_batches(batch_size=batch_rows or BATCH_ROWS):
        empty = False
        yield pa.Table.from_batches([batch]).to_pandas()
    if empty:
        yield parquet.schema_arrow.empty_table().to_pandas()


def run(params_file: str | Path = "params.yaml") -> dict:
    cfg = section(load_params(params_file), "split")
    salt = get(cfg, "salt", str, "split")
    fractions = check_fractions(get(cfg, "fractions", dict, "split"))

    tally = SplitTally()
    with io.atomic_dir(OUT_DIR) as tmp, contextlib.ExitStack() as files:
        out = {name: files.enter_context(io.ParquetChunks(tmp / f"{name}.parquet")) for name in SPLITS}
        for chunk in read_chunks(PAIRS):
            table = split_pairs(chunk, salt, fractions)
            tally.add(table)
            for name, frame in split_frames(table).items():
                out[name].write(frame)
    report = tally.report(fractions)
    io.write_json(REPORT, report)

    for name in fractions:
        part = report[name]
        log.info("%-5s %7d pairs  %6d prompts  (%.3f of prompts, target %.3f)",
                 name, part["pairs"], part["prompts"], part["prompt_fraction"], part["target_fraction"])
    check_not_empty(report)  # after the report, so it can be read
    return report


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    setup_logging()
    parser = argparse.ArgumentParser(prog="python -m stages.split", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    run(args.params)


if __name__ == "__main__":
    main(sys.argv[1:])
