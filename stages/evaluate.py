"""DVC stage `evaluate`: trained reward model + held-out test split -> metrics, pathology report, plots.

    python -m stages.evaluate [--params params.yaml]

Writes metrics/eval.json (DVC metrics), reports/pathology.json, reports/eval.md and
plots/eval/*.csv. The verdict (`passed`) is recorded either way; the export stage's
promotion gate reads it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from rmpipe import io
from rmpipe.errors import DataError, exits_cleanly
from rmpipe.evaluate import EvalSettings, evaluate_model, load_checkpoint
from rmpipe.params import get, load_params, section
from rmpipe.pathology import load_battery
from rmpipe.progress import setup_logging

log = logging.getLogger("rmpipe.evaluate")

MODEL_DIR = Path("models/reward_model")
SPLIT_DIR = Path("data/split")
METRICS = Path("metrics/eval.json")
PATHOLOGY = Path("reports/pathology.json")
SUMMARY = Path("reports/eval.md")
PLOTS_DIR = Path("plots/eval")


def read_split(name: str) -> pd.DataFrame:
    path = SPLIT_DIR / f"{name}.parquet"
    if not path.exists():
        raise DataError(f"{path} not found: run the split stage first (dvc repro split)")
    return pd.read_parquet(path)


def run(params_file: str | Path = "params.yaml") -> dict:
    params = load_params(params_file)
    settings = EvalSettings.from_params(params)
    trust = get(section(params, "model"), "trust_remote_code", bool, "model")  # the code training ran with
    test, val = read_split("test"), read_split("val")
    if test.empty:
        raise DataError(f"{SPLIT_DIR / 'test.parquet'} has no pairs: nothing held out to evaluate on")
    battery = load_battery(settings.battery_file)
    model, tokenizer = load_checkpoint(MODEL_DIR, trust)

    result = evaluate_model(model, tokenizer, test, val, battery, settings)

    io.write_json(METRICS, result.metrics)
    io.write_json(PATHOLOGY, result.pathology)
    io.write_text(SUMMARY, result.summary)
    for name, table in result.plots.items():
        with io.atomic_path(PLOTS_DIR / f"{name}.csv") as tmp:
            table.to_csv(tmp, index=False)

    m = result.metrics
    log.info("accuracy %.4f on %d test pairs, BT loss %.4f, ECE %.4f, length R^2 %.3f",
             m["accuracy"], m["n_pairs"], m["bt_loss"], m["ece"], m["length_r2"])
    for name in result.pathology["battery"]["failures"]:
        log.warning("battery pair failed: %s", name)
    failed = [name for name, ok in m["checks"].items() if not ok]
    log.info("verdict: %s%s", "PASSED" if m["passed"] else "FAILED", f" ({', '.join(failed)})" if failed else "")
    return m


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    setup_logging()
    parser = argparse.ArgumentParser(prog="python -m stages.evaluate", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    run(args.params)


if __name__ == "__main__":
    main(sys.argv[1:])
