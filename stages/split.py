"""DVC stage `split`: aggregated pairs -> data/split/{train,val,test}.parquet + reports/split.json.

    python -m stages.split [--params params.yaml]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from rmpipe import io
from rmpipe.errors import DataError, exits_cleanly
from rmpipe.params import get, load_params, section
from rmpipe.progress import setup_logging
from rmpipe.split import check_fractions, check_not_empty, split_frames, split_pairs, split_report

log = logging.getLogger("rmpipe.split")

PAIRS = Path("data/aggregated/pairs.parquet")
OUT_DIR = Path("data/split")
REPORT = Path("reports/split.json")


def run(params_file: str | Path = "params.yaml") -> dict:
    cfg = section(load_params(params_file), "split")
    salt = get(cfg, "salt", str, "split")
    fractions = check_fractions(get(cfg, "fractions", dict, "split"))
    if not PAIRS.exists():
        raise DataError(f"{PAIRS} not found: run the aggregate stage first (dvc repro aggregate)")

    table = split_pairs(pd.read_parquet(PAIRS), salt, fractions)
    with io.atomic_dir(OUT_DIR) as tmp:
        for name, frame in split_frames(table).items():
            frame.to_parquet(tmp / f"{name}.parquet", index=False)
    report = split_report(table, fractions)
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
