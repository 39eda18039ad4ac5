"""DVC stage `validate`: the Great Expectations contract over data/split/ -> reports/validation.json + data docs.

    python -m stages.validate [--params params.yaml]

Any failed expectation is printed as one `FAIL ...` line and the stage exits 1, which
stops `dvc repro` before training. The HTML data docs are written either way.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rmpipe import io, offline
from rmpipe.errors import DataError, ValidationFailed, exits_cleanly
from rmpipe.params import load_params
from rmpipe.progress import setup_logging
from rmpipe.schema import SPLITS
from rmpipe.validate import ContractResult, contract_params, validate_splits

log = logging.getLogger("rmpipe.validate")

SPLIT_DIR = Path("data/split")
DOCS_DIR = Path("reports/data_docs")
REPORT = Path("reports/validation.json")
BATCH_ROWS = 65_536  # pairs per chunk of a split: ~160 MB of real-length text


def read_chunks(path: Path, batch_rows: int | None = None) -> Iterator[pd.DataFrame]:
    """A split file as DataFrames of at most `batch_rows` rows (one empty frame for an empty split)."""
    parquet = pq.ParquetFile(path, pre_buffer=False)
    empty = True
    for batch in parquet.iter_batches(batch_size=batch_rows or BATCH_ROWS):
        empty = False
        yield pa.Table.from_batches([batch]).to_pandas()
    if empty:
        yield parquet.schema_arrow.empty_table().to_pandas()


def read_splits(folder: Path = SPLIT_DIR) -> dict[str, Iterator[pd.DataFrame]]:
    """Each split as chunks, read as GX goes: one chunk of texts in memory at a time."""
    missing = [name for name in SPLITS if not (folder / f"{name}.parquet").exists()]
    if missing:
        raise DataError(f"{folder}/ has no {', '.join(missing)} split: run the split stage first (dvc repro split)")
    return {name: read_chunks(folder / f"{name}.parquet") for name in SPLITS}


def run(params_file: str | Path = "params.yaml") -> ContractResult:
    contract = contract_params(load_params(params_file))
    splits = read_splits()
    with io.atomic_dir(DOCS_DIR) as docs:
        outcome = validate_splits(splits, contract, docs)
        # GX links Bootstrap, bootstrap-table, jQuery... from CDNs: point the pages at local copies (offline clusters)
        for tag in offline.localize_data_docs(docs):
            log.warning("data docs still load from the network: %s", tag)
    io.write_json(REPORT, outcome.summary())
    log.info("%d expectations, %d failed; data docs: %s", outcome.n_expectations, len(outcome.failures),
             DOCS_DIR / "index.html")
    if not outcome.success:
        for line in outcome.failures:
            print(line, file=sys.stderr, flush=True)
        raise ValidationFailed(
            f"{len(outcome.failures)} of {outcome.n_expectations} expectations failed; "
            f"details in {DOCS_DIR / 'index.html'}"
        )
    return outcome


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    setup_logging()
    parser = argparse.ArgumentParser(prog="python -m stages.validate", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    run(args.params)


if __name__ == "__main__":
    main(sys.argv[1:])
