"""The promotion gate: whether a fresh export replaces the promoted model, and the atomic copy that does it.

    decision = promotion_decision(metrics, promoted_dir, test, settings, batch_size)
    if decision["promoted"]: promote(export_dir, promoted_dir, decision)
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from rmpipe.core import io
from rmpipe.evaluation.evaluate import score_pairs_grouped
from rmpipe.export.hf import load_exported
from rmpipe.audit.lineage import PROMOTION_FILE
from rmpipe.core.settings import ExportSettings

log = logging.getLogger("rmpipe.export")


def promotion_decision(metrics: dict, promoted_dir: Path, test: pd.DataFrame, s: ExportSettings, batch_size: int,
                       trust_remote_code: bool = False) -> dict:
    """Promote when evaluation passed and test accuracy is not lower than the promoted model's by > tolerance.

    The promoted model is re-scored on *this* test split (`batch_size` rows at a time, with the backbone's own
    code when `trust_remote_code`), so both accuracies are measured on the same pairs.
    """
    accuracy = float(metrics["accuracy"])
    decision: dict[str, Any] = {"accuracy": accuracy, "tolerance": s.promotion_tolerance, "previous_accuracy": None}
    if not metrics.get("passed", False):
        failed = [k for k, ok in metrics.get("checks", {}).items() if not ok]
        return {**decision, "promoted": False, "reason": f"evaluation failed: {', '.join(failed) or 'see metrics'}"}
    if not (promoted_dir / "config.json").exists():
        return {**decision, "promoted": True, "reason": "passed; no previously promoted model"}
    previous = accuracy_of_export(promoted_dir, test, batch_size, trust_remote_code)
    decision["previous_accuracy"] = previous
    if accuracy < previous - s.promotion_tolerance:
        return {**decision, "promoted": False,
                "reason": f"accuracy {accuracy:.4f} is more than {s.promotion_tolerance} below the promoted model's {previous:.4f}"}
    return {**decision, "promoted": True, "reason": f"passed; accuracy {accuracy:.4f} vs promoted {previous:.4f}"}


def accuracy_of_export(export_dir: Path, test: pd.DataFrame, batch_size: int, trust_remote_code: bool = False) -> float:
    hf, tokenizer, max_length = load_exported(export_dir, trust_remote_code)  # scored the way that model was exported to be used
    r_c, r_r, _ = score_pairs_grouped(hf, tokenizer, test, max_length, batch_size)  # each prompt once
    return float((r_c > r_r).mean())


def promote(export_dir: Path, promoted_dir: Path, decision: dict) -> None:
    """Copy the export to the promoted folder, atomically (a reader sees the old or the new model)."""
    with io.atomic_dir(promoted_dir) as tmp:
        for item in Path(export_dir).iterdir():
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        io.write_json(tmp / PROMOTION_FILE, decision)
    log.info("promoted %s -> %s (%s)", export_dir, promoted_dir, decision["reason"])
