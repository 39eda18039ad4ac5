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

import pandas as pd

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


def read_splits(folder: Path = SPLIT_DIR) -> dict[str, pd.DataFrame]:
    missing = [name for name in SPLITS if not (folder / f"{name}.parquet").exists()]
    if missing:
        raise DataError(f"{folder}/ has no {', '.join(missing)} split: run the split stage first (dvc repro split)")
    return {name: pd.read_parquet(folder / f"{name}.parquet") for name in SPLITS}


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
