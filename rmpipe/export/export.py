"""Export a trained RewardModel as a plain Hugging Face `*ForSequenceClassification` folder, verified.

    AutoModelForSequenceClassification.from_pretrained(path)   # loads it: num_labels=1, our head as `score`

`write_export` builds the folder and swaps it in whole, along its jobs, one module each:
  * `rmpipe.export.hf`: the conversion (with a dedicated pad token when the backbone's pad can occur
    in text), loading an export back, the golden set and the parity check: the export re-loads itself
    with plain transformers and re-scores the golden set stored inside it, right- and left-padded; any
    reward more than `parity_tolerance` away from the trained model's fails the export before it
    replaces the previous one;
  * `rmpipe.export.promotion`: the promotion gate and the atomic copy to the promoted folder;
  * `rmpipe.export.card`: README.md, a Hugging Face ModelCard;
  * `rmpipe.audit.lineage`: lineage.json.
`rmpipe score` (scoring with an export) is `rmpipe.export.score`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from rmpipe.core import io
from rmpipe.core.errors import DataError, ValidationFailed
from rmpipe.evaluation.evaluate import reward_fn_of, score_token_rows
from rmpipe.export.adapter import ADAPTER_EXPORT, load_adapter, write_adapter
from rmpipe.export.hf import GOLDEN_FILE, golden_rows, parity, to_sequence_classifier
from rmpipe.audit.lineage import MANIFEST_FILE, PROMOTION_FILE, build_manifest
from rmpipe.export.card import model_card
from rmpipe.export.promotion import baseline, candidate_scores, promote, promotion_decision
from rmpipe.model.render import encode_rows
from rmpipe.core.settings import ExportSettings, ModelSettings

log = logging.getLogger("rmpipe.export")

CARD_FILE = "README.md"


# --- the export -------------------------------------------------------------------------------
def write_export(model, tokenizer, test: pd.DataFrame, battery: list[dict], metrics: dict, pathology_report: dict,
                 s: ExportSettings, m: ModelSettings, batch_size: int, lineage: dict) -> dict:
    """Build the export in a temp folder beside `s.out_dir`, verify it, then swap it in whole. Rows are cut to
    `m.max_length` as in training and scored `batch_size` (evaluate.batch_size) at a time.

    `lineage` holds what only the project knows: project_root, params, batch_ids, exclude_stages (dvc.lock),
    and `extra` (anything else to record). Returns the manifest written as lineage.json.
    """
    golden = golden_rows(test, battery, s.golden_pairs, tokenizer.eos_token)
    if not golden:
        raise DataError("no golden rows: the test split and the unit battery are both empty")
    rows, _ = encode_rows(tokenizer, [g["prompt"] for g in golden], [g["response"] for g in golden], m.max_length)
    rewards = score_token_rows(reward_fn_of(model), rows, tokenizer.pad_token_id or 0, batch_size)
    for g, r in zip(golden, rewards):
        g["reward"] = float(r)

    norm = metrics.get("normalization") or {}
    hf, hf_tokenizer = to_sequence_classifier(model, tokenizer, rows, m.trust_remote_code)
    hf.config.reward_mean = norm.get("reward_mean")
    hf.config.reward_std = norm.get("reward_std")
    hf.config.reward_stats_split = norm.get("split")
    hf_tokenizer.model_max_length = m.max_length  # with truncation_side=left: plain `tokenizer(..., truncation=True)` cuts like rmpipe
    hf_tokenizer.truncation_side = "left"
    hf_tokenizer.padding_side = "right"

    with io.atomic_dir(s.out_dir) as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        hf_tokenizer.save_pretrained(tmp)
        io.write_jsonl(tmp / GOLDEN_FILE, golden)
        check = parity(tmp, golden, m.max_length, batch_size, m.trust_remote_code)
        log.info("parity: max |reward diff| %.2e over %d golden rows (right and left padded)", check["max_abs_diff"], check["n_rows"])
        check_parity(check, s, "exported")
        if s.save_adapter:
            check["adapter"] = export_adapter(tmp, model, hf_tokenizer, golden, s, m, batch_size, lineage)
        decision = gate(model, tokenizer, test, battery, metrics, pathology_report, s, m, batch_size,
                        Path(lineage["project_root"]))
        evaluation = {k: metrics.get(k) for k in ("passed", "accuracy", "n_pairs", "bt_loss", "ece", "length_r2",
                                                  "battery_failed", "canary_max_abs_diff", "checks")}
        extra = {**lineage.get("extra", {}), "evaluation": evaluation, "parity": check, "promotion": decision,
                 "normalization": {k: norm.get(k) for k in ("reward_mean", "reward_std", "n_rows", "split")}}
        io.write_text(tmp / CARD_FILE, model_card(extra, lineage["params"], metrics, pathology_report, lineage["batch_ids"]))
        manifest = build_manifest(tmp, Path(lineage["project_root"]), lineage["params"], lineage["batch_ids"],
                                  tuple(lineage.get("exclude_stages", ())), extra, tuple(lineage.get("read_paths", ())))
        io.write_json(tmp / MANIFEST_FILE, manifest)
    if decision["promoted"]:
        promote(s.out_dir, s.promoted_dir, decision)
    elif not s.promoted_dir.exists():  # a DVC output must exist; say plainly that nothing is promoted
        with io.atomic_dir(s.promoted_dir) as empty:
            io.write_json(empty / PROMOTION_FILE, {"promoted": False, "reason": "no model has been promoted yet"})
    return manifest


def check_parity(check: dict, s: ExportSettings, what: str) -> None:
    """Refuse the export (the previous one stays) when re-scored rewards moved more than export.parity_tolerance."""
    if check["pad_in_text"] or not check["max_abs_diff"] <= s.parity_tolerance:
        raise ValidationFailed(
            f"export parity check failed: {what} rewards differ from the trained model's by up to "
            f"{check['max_abs_diff']:.3g} (tolerance {s.parity_tolerance})"
            + ("; the pad token occurs in rendered text" if check["pad_in_text"] else "")
            + f". The previous export in {s.out_dir} is left untouched."
        )


def export_adapter(folder: Path, model, hf_tokenizer, golden: list[dict], s: ExportSettings, m: ModelSettings,
                   batch_size: int, lineage: dict) -> dict:
    """`export.save_adapter`: folder/adapter/ (PEFT, on the plain backbone), re-loaded with PEFT and re-scored."""
    adapter_dir = folder / ADAPTER_EXPORT
    backbone = lineage["backbone"]
    write_adapter(adapter_dir, Path(lineage["model_dir"]), backbone, model.head.weight, hf_tokenizer,
                  m.trust_remote_code)
    check = parity(adapter_dir, golden, m.max_length, batch_size,
                   loaded=load_adapter(adapter_dir, backbone, m.trust_remote_code))
    log.info("adapter parity (PEFT on %s): max |reward diff| %.2e", backbone, check["max_abs_diff"])
    check_parity(check, s, "the adapter's")
    return {**check, "folder": ADAPTER_EXPORT, "base_model": str(backbone)}


def gate(model, tokenizer, test: pd.DataFrame, battery: list[dict], metrics: dict, pathology_report: dict,
         s: ExportSettings, m: ModelSettings, batch_size: int, root: Path) -> dict:
    """The promotion gate (rmpipe.export.promotion): the candidate against the version in prod, same pairs."""
    prod, note = None, None
    if metrics.get("passed", False):  # a candidate that failed its own evaluation is refused before any scoring
        prod, note = baseline(root, s, test, battery, batch_size, m.trust_remote_code)
    if note:
        log.info("promotion gate: %s", note)
    margins = {r["name"]: r["margin"] for r in (pathology_report.get("battery") or {}).get("results") or []}
    candidate = candidate_scores(model, tokenizer, test, margins, m.max_length, batch_size) if prod else None
    return promotion_decision(metrics, candidate, prod, s, note)
