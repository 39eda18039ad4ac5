"""DVC stage `export`: trained reward model -> verified Hugging Face folder + model card + lineage manifest.

    python -m stages.export [--params params.yaml]

Writes `export.out_dir` (default models/export) atomically: the new folder replaces the
old one only after plain transformers re-loaded it and re-scored its golden set within
`export.parity_tolerance`. When evaluation passed and accuracy holds up against the
promoted model, the export is also copied to `export.promoted_dir`.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from rmpipe.audit import history
from rmpipe.core.errors import DataError
from rmpipe.evaluation.evaluate import load_checkpoint
from rmpipe.export.export import write_export
from rmpipe.model.backbones import resolve_backbone
from rmpipe.core.params import PARAMS_FILE, load_params
from rmpipe.core.paths import ProjectPaths, read_splits
from rmpipe.evaluation.pathology import load_battery
from rmpipe.core.settings import EvalSettings, ExportSettings, ModelSettings
from rmpipe.core.stage import stage_main

log = logging.getLogger("rmpipe.export")


def read_json(path: Path, stage: str) -> dict:
    if not path.exists():
        raise DataError(f"{path} not found: run the {stage} stage first (dvc repro {stage})")
    return json.loads(path.read_text(encoding="utf-8"))


def split_batch_ids(paths: ProjectPaths) -> dict[str, list[str]]:
    """Per split, the sorted batch ids whose votes fed its pairs."""
    frames = read_splits(paths, columns=["batch_ids"])
    return {name: sorted({str(b) for batch in frame["batch_ids"] for b in batch}) for name, frame in frames.items()}


def split_composition(paths: ProjectPaths) -> dict[str, dict[str, int]]:
    """Per split: pairs, and how many are pre-judged (pair rows / ranked groups, exempt from min_votes)."""
    out = {}
    for name, frame in read_splits(paths).items():
        prejudged = int(frame["prejudged"].sum()) if "prejudged" in frame.columns else 0
        out[name] = {"pairs": len(frame), "prejudged": prejudged, "vote_built": len(frame) - prejudged}
    return out


def batch_sources(batch_ids: dict[str, list[str]], collect_report: Path) -> dict[str, dict]:
    """For each batch that fed the splits: its format and content hash as collect read it, and where
    `rmpipe import` got it (dataset id, split, revision, file hashes) when it came that way."""
    if not collect_report.exists():
        return {}
    wanted = {b for ids in batch_ids.values() for b in ids}
    entries = json.loads(collect_report.read_text(encoding="utf-8")).get("batches", [])
    return {e["batch_id"]: {k: e[k] for k in ("format", "sha256", "rows_read", "shapes", "source") if k in e}
            for e in entries if e["batch_id"] in wanted}


def run(params_file: str | Path = PARAMS_FILE, paths: ProjectPaths = ProjectPaths()) -> dict:
    params = load_params(params_file)
    settings, model_settings = ExportSettings.parse(params), ModelSettings.parse(params)
    evaluation = EvalSettings.parse(params)  # the battery, and the batch size scores are computed in
    metrics, pathology_report = read_json(paths.eval_report, "evaluate"), read_json(paths.pathology, "evaluate")
    battery = load_battery(evaluation.battery_file)
    test = read_splits(paths, ("test",))["test"]
    model, tokenizer = load_checkpoint(paths.model_dir, model_settings.trust_remote_code)

    extra = {"model": {"backbone": model_settings.backbone, "trained_in": str(paths.model_dir)}}
    if paths.training_record.exists():
        extra["training"] = json.loads(paths.training_record.read_text(encoding="utf-8"))
    batch_ids = split_batch_ids(paths)
    extra["data"] = {"splits": split_composition(paths), "batches": batch_sources(batch_ids, paths.collect_report)}
    backbone = resolve_backbone(model_settings, Path(".")) if settings.save_adapter else None  # the adapter's base
    lineage = {"project_root": Path("."), "params": params, "batch_ids": batch_ids,
               "model_dir": paths.model_dir, "backbone": backbone,
               "exclude_stages": ("export",), "extra": extra,
               "read_paths": (str(paths.split_dir), str(paths.model_dir))}  # the batch ids and the model come from these

    history.backfill(Path("."), settings.out_dir, settings.promoted_dir)  # a new history first records what exists
    manifest = write_export(model, tokenizer, test, battery, metrics, pathology_report, settings, model_settings,
                            evaluation.batch_size, lineage)
    record = history.append(Path("."), history.model_record(
        Path("."), manifest, settings.out_dir, settings.promoted_dir, history.trigger_from_env(),
        split_dir=paths.split_dir, annotators_report=paths.annotators_json))  # vote counts for the record only
    log.info("history: model %s recorded as #%d in %s", history.model_id(record), record["seq"],
             history.location(Path(".")))
    promo = manifest["promotion"]
    log.info("exported to %s (parity max diff %.2e); %s: %s", settings.out_dir, manifest["parity"]["max_abs_diff"],
             "PROMOTED" if promo["promoted"] else "not promoted", promo["reason"])
    return manifest

main = stage_main("export", run, __doc__)

if __name__ == "__main__":
    main(sys.argv[1:])
