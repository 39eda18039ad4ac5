"""DVC stage `export`: trained reward model -> verified Hugging Face folder + model card + lineage manifest.

    python -m stages.export [--params params.yaml]

Writes `export.out_dir` (default models/export) atomically: the new folder replaces the
old one only after plain transformers re-loaded it and re-scored its golden set within
`export.parity_tolerance`. When evaluation passed and accuracy holds up against the
promoted model, the export is also copied to `export.promoted_dir`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import pandas as pd

from rmpipe import history
from rmpipe.errors import DataError, exits_cleanly
from rmpipe.evaluate import load_checkpoint
from rmpipe.export import ExportSettings, write_export
from rmpipe.params import get, load_params, section
from rmpipe.pathology import load_battery
from rmpipe.progress import setup_logging

log = logging.getLogger("rmpipe.export")

MODEL_DIR = Path("models/reward_model")
TRAINING_RECORD = MODEL_DIR / "training.json"
SPLIT_DIR = Path("data/split")
METRICS = Path("metrics/eval.json")
PATHOLOGY = Path("reports/pathology.json")
COLLECT_REPORT = Path("reports/collect.json")
ANNOTATORS = Path("reports/annotators.json")  # vote counts for the history record only (not in the export)


def read_json(path: Path, stage: str) -> dict:
    if not path.exists():
        raise DataError(f"{path} not found: run the {stage} stage first (dvc repro {stage})")
    return json.loads(path.read_text(encoding="utf-8"))


def split_batch_ids() -> dict[str, list[str]]:
    """Per split, the sorted batch ids whose votes fed its pairs."""
    ids = {}
    for name in ("train", "val", "test"):
        path = SPLIT_DIR / f"{name}.parquet"
        if not path.exists():
            raise DataError(f"{path} not found: run the split stage first (dvc repro split)")
        column = pd.read_parquet(path, columns=["batch_ids"])["batch_ids"]
        ids[name] = sorted({str(b) for batch in column for b in batch})
    return ids


def split_composition() -> dict[str, dict[str, int]]:
    """Per split: pairs, and how many are pre-judged (pair rows / ranked groups, exempt from min_votes)."""
    out = {}
    for name in ("train", "val", "test"):
        frame = pd.read_parquet(SPLIT_DIR / f"{name}.parquet", columns=None)
        prejudged = int(frame["prejudged"].sum()) if "prejudged" in frame.columns else 0
        out[name] = {"pairs": len(frame), "prejudged": prejudged, "vote_built": len(frame) - prejudged}
    return out


def batch_sources(batch_ids: dict[str, list[str]]) -> dict[str, dict]:
    """For each batch that fed the splits: its format and content hash as collect read it, and where
    `rmpipe import` got it (dataset id, split, revision, file hashes) when it came that way."""
    if not COLLECT_REPORT.exists():
        return {}
    wanted = {b for ids in batch_ids.values() for b in ids}
    entries = json.loads(COLLECT_REPORT.read_text(encoding="utf-8")).get("batches", [])
    return {e["batch_id"]: {k: e[k] for k in ("format", "sha256", "rows_read", "shapes", "source") if k in e}
            for e in entries if e["batch_id"] in wanted}


def run(params_file: str | Path = "params.yaml") -> dict:
    params = load_params(params_file)
    settings = ExportSettings.from_params(params)
    metrics, pathology_report = read_json(METRICS, "evaluate"), read_json(PATHOLOGY, "evaluate")
    battery = load_battery(get(section(params, "evaluate"), "battery_file", str, "evaluate"))
    test = pd.read_parquet(SPLIT_DIR / "test.parquet")
    model, tokenizer = load_checkpoint(MODEL_DIR, settings.trust_remote_code)

    extra = {"model": {"backbone": params.get("model", {}).get("backbone"), "trained_in": str(MODEL_DIR)}}
    if TRAINING_RECORD.exists():
        extra["training"] = json.loads(TRAINING_RECORD.read_text(encoding="utf-8"))
    batch_ids = split_batch_ids()
    extra["data"] = {"splits": split_composition(), "batches": batch_sources(batch_ids)}
    lineage = {"project_root": Path("."), "params": params, "batch_ids": batch_ids,
               "exclude_stages": ("export",), "extra": extra,
               "read_paths": (str(SPLIT_DIR), str(MODEL_DIR))}  # the batch ids and the model come from these

    history.backfill(Path("."), settings.out_dir, settings.promoted_dir)  # a new history first records what exists
    manifest = write_export(model, tokenizer, test, battery, metrics, pathology_report, settings, lineage)
    record = history.append(Path("."), history.model_record(
        Path("."), manifest, settings.out_dir, settings.promoted_dir, history.trigger_from_env(),
        split_dir=SPLIT_DIR, annotators_report=ANNOTATORS))
    log.info("history: model %s recorded as #%d in %s", history.model_id(record), record["seq"], history.HISTORY)
    promo = manifest["promotion"]
    log.info("exported to %s (parity max diff %.2e); %s: %s", settings.out_dir, manifest["parity"]["max_abs_diff"],
             "PROMOTED" if promo["promoted"] else "not promoted", promo["reason"])
    return manifest


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    setup_logging()
    parser = argparse.ArgumentParser(prog="python -m stages.export", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    run(args.params)


if __name__ == "__main__":
    main(sys.argv[1:])
