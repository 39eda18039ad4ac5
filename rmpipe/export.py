"""Export a trained RewardModel as a plain Hugging Face `*ForSequenceClassification` folder, verified.

    AutoModelForSequenceClassification.from_pretrained(path)   # loads it: num_labels=1, our head as `score`

Plain transformers finds the scored token as the last one that is not `pad_token_id`.
That equals our attention-mask pooling only if the pad token never occurs in rendered
text, so a tokenizer whose pad is its EOS / end-of-turn token (SmolLM2) gets a new,
dedicated pad token (embeddings resized; the new row is never attended to). The export
then re-loads itself with plain transformers and re-scores a golden set stored inside it,
right- and left-padded: any reward more than `parity_tolerance` away from the trained
model's fails the export before it replaces the previous one.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from rmpipe import io
from rmpipe.errors import ConfigError, DataError, ValidationFailed
from rmpipe.evaluate import encode_rows, reward_fn_of, score_pairs_grouped, score_token_rows
from rmpipe.lineage import MANIFEST_FILE, PROMOTION_FILE, build_manifest
from rmpipe.params import get, section

log = logging.getLogger("rmpipe.export")

EXPORT_PAD = "<|rm_pad|>"
GOLDEN_FILE = "golden.jsonl"
CARD_FILE = "README.md"


@dataclass(frozen=True)
class ExportSettings:
    out_dir: Path
    promoted_dir: Path
    parity_tolerance: float
    golden_pairs: int
    promotion_tolerance: float
    max_length: int
    batch_size: int
    trust_remote_code: bool = False  # model.trust_remote_code: the backbone's own code builds the classifier

    @classmethod
    def from_params(cls, params: dict) -> "ExportSettings":
        cfg, where = section(params, "export"), "export"
        settings = cls(
            out_dir=Path(get(cfg, "out_dir", str, where)),
            promoted_dir=Path(get(cfg, "promoted_dir", str, where)),
            parity_tolerance=float(get(cfg, "parity_tolerance", float, where)),
            golden_pairs=get(cfg, "golden_pairs", int, where),
            promotion_tolerance=float(get(cfg, "promotion_tolerance", float, where)),
            max_length=get(section(params, "model"), "max_length", int, "model"),
            batch_size=get(section(params, "evaluate"), "batch_size", int, "evaluate"),
            trust_remote_code=get(section(params, "model"), "trust_remote_code", bool, "model"),
        )
        if settings.parity_tolerance <= 0 or settings.golden_pairs < 1 or settings.promotion_tolerance < 0:
            raise ConfigError("params.yaml: 'export.parity_tolerance' must be > 0, 'export.golden_pairs' >= 1 "
                              "and 'export.promotion_tolerance' >= 0")
        if settings.out_dir.resolve() == settings.promoted_dir.resolve():
            raise ConfigError("params.yaml: 'export.out_dir' and 'export.promoted_dir' must differ")
        return settings


# --- RewardModel -> *ForSequenceClassification ------------------------------------------------
def pad_is_safe(tokenizer, sample_rows: list[list[int]]) -> bool:
    """A pad id is safe for pad-id pooling when it is set, is no eos/bos, and never appears in rendered rows."""
    pad = tokenizer.pad_token_id
    if pad is None or pad in {tokenizer.eos_token_id, tokenizer.bos_token_id}:
        return False
    return all(pad not in row for row in sample_rows)


def to_sequence_classifier(model, tokenizer, sample_rows: list[list[int]], trust_remote_code: bool = False):
    """(hf_model, tokenizer): our backbone + head as `AutoModelForSequenceClassification`, num_labels=1.

    Works on copies; `sample_rows` (rendered golden rows) prove whether the current pad token is safe.
    """
    from transformers import AutoModelForSequenceClassification

    tokenizer = copy.deepcopy(tokenizer)
    if not pad_is_safe(tokenizer, sample_rows):
        log.info("pad token %r is not safe for pad-id pooling (it is eos/bos or occurs in rendered text): "
                 "adding dedicated pad %r", tokenizer.pad_token, EXPORT_PAD)
        tokenizer.add_special_tokens({"pad_token": EXPORT_PAD})
    config = copy.deepcopy(model.backbone.config)
    config.num_labels = 1
    config.architectures = None  # filled in by save_pretrained from the class
    hf = AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)  # config's own pad id: in range until resized
    score = getattr(hf, "score", None)
    if not isinstance(score, torch.nn.Linear) or score.bias is not None:
        raise DataError(f"{type(hf).__name__} has no bias-free `score` head: this architecture cannot be exported")
    hf.base_model.load_state_dict(model.backbone.state_dict(), strict=True)
    with torch.no_grad():
        score.weight.copy_(model.head.weight)
    rows = hf.get_input_embeddings().num_embeddings
    if tokenizer.pad_token_id >= rows:
        hf.resize_token_embeddings(tokenizer.pad_token_id + 1, mean_resizing=False)
        with torch.no_grad():  # the pad row is never attended to; zero keeps the file deterministic
            hf.get_input_embeddings().weight[tokenizer.pad_token_id].zero_()
    hf.config.pad_token_id = tokenizer.pad_token_id  # what plain transformers pools by
    return hf.float().eval(), tokenizer


def exported_tokenizer(export_dir: Path, trust_remote_code: bool = False):
    """(tokenizer, max_length) of an export. rmpipe encodes whole rows then left-truncates to max_length,
    so the tokenizer's own limit is lifted here to keep it from warning about rows it never truncates."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export_dir, trust_remote_code=trust_remote_code)
    max_length = int(tokenizer.model_max_length)
    tokenizer.model_max_length = int(1e30)
    return tokenizer, max_length


def load_exported(export_dir: Path, trust_remote_code: bool = False):
    """(model, tokenizer, max_length) of an export with plain transformers: what any downstream user would run."""
    from transformers import AutoModelForSequenceClassification

    export_dir = Path(export_dir)
    if not (export_dir / "config.json").exists():
        raise DataError(f"{export_dir} is not an exported model (no config.json): run the export stage first")
    hf = AutoModelForSequenceClassification.from_pretrained(export_dir, dtype=torch.float32, use_safetensors=True,
                                                            trust_remote_code=trust_remote_code).eval()
    return (hf, *exported_tokenizer(export_dir, trust_remote_code))


# --- golden set -------------------------------------------------------------------------------
def golden_rows(test: pd.DataFrame, battery: list[dict], n_pairs: int, eos_token: str | None) -> list[dict]:
    """Prompt/response rows the export must score like the trained model: test pairs, battery, an eos-in-text row."""
    rows = []
    for source, frame in (("test", test.head(n_pairs)), ("battery", pd.DataFrame(battery))):
        for pair in frame.itertuples(index=False):
            rows.append({"source": source, "prompt": pair.prompt, "response": pair.chosen})
            rows.append({"source": source, "prompt": pair.prompt, "response": pair.rejected})
    if eos_token and rows:  # the pad == eos trap: eos inside the text must not end the scored sequence early
        rows.append({"source": "eos_in_text", "prompt": rows[0]["prompt"],
                     "response": f"First part.{eos_token}\nSecond part after the end-of-turn token."})
    return rows


def parity(export_dir: Path, golden: list[dict], max_length: int, batch_size: int,
           trust_remote_code: bool = False) -> dict:
    """Re-load the export with plain transformers and re-score `golden`, right- and left-padded."""
    hf, tokenizer, _ = load_exported(export_dir, trust_remote_code)
    rows, _ = encode_rows(tokenizer, [g["prompt"] for g in golden], [g["response"] for g in golden], max_length)
    expected = np.array([g["reward"] for g in golden])
    diffs = {}
    for side in ("right", "left"):
        got = score_token_rows(reward_fn_of(hf), rows, tokenizer.pad_token_id, batch_size, side)
        diffs[side] = float(np.max(np.abs(got - expected)))
    return {"n_rows": len(golden), "max_abs_diff": max(diffs.values()), "by_padding_side": diffs,
            "pad_token": tokenizer.pad_token, "pad_in_text": any(tokenizer.pad_token_id in r for r in rows)}


# --- promotion gate ---------------------------------------------------------------------------
def promotion_decision(metrics: dict, promoted_dir: Path, test: pd.DataFrame, s: ExportSettings) -> dict:
    """Promote when evaluation passed and test accuracy is not lower than the promoted model's by > tolerance.

    The promoted model is re-scored on *this* test split, so both accuracies are measured on the same pairs.
    """
    accuracy = float(metrics["accuracy"])
    decision: dict[str, Any] = {"accuracy": accuracy, "tolerance": s.promotion_tolerance, "previous_accuracy": None}
    if not metrics.get("passed", False):
        failed = [k for k, ok in metrics.get("checks", {}).items() if not ok]
        return {**decision, "promoted": False, "reason": f"evaluation failed: {', '.join(failed) or 'see metrics'}"}
    if not (promoted_dir / "config.json").exists():
        return {**decision, "promoted": True, "reason": "passed; no previously promoted model"}
    previous = accuracy_of_export(promoted_dir, test, s)
    decision["previous_accuracy"] = previous
    if accuracy < previous - s.promotion_tolerance:
        return {**decision, "promoted": False,
                "reason": f"accuracy {accuracy:.4f} is more than {s.promotion_tolerance} below the promoted model's {previous:.4f}"}
    return {**decision, "promoted": True, "reason": f"passed; accuracy {accuracy:.4f} vs promoted {previous:.4f}"}


def accuracy_of_export(export_dir: Path, test: pd.DataFrame, s: ExportSettings) -> float:
    hf, tokenizer, max_length = load_exported(export_dir, s.trust_remote_code)  # scored the way that model was exported to be used
    r_c, r_r, _ = score_pairs_grouped(hf, tokenizer, test, max_length, s.batch_size)  # each prompt once
    return float((r_c > r_r).mean())


# --- the export -------------------------------------------------------------------------------
def write_export(
    model,
    tokenizer,
    test: pd.DataFrame,
    battery: list[dict],
    metrics: dict,
    pathology_report: dict,
    s: ExportSettings,
    lineage: dict,
) -> dict:
    """Build the export in a temp folder beside `s.out_dir`, verify it, then swap it in whole.

    `lineage` holds what only the project knows: project_root, params, batch_ids, exclude_stages (dvc.lock),
    and `extra` (anything else to record). Returns the manifest written as lineage.json.
    """
    golden = golden_rows(test, battery, s.golden_pairs, tokenizer.eos_token)
    if not golden:
        raise DataError("no golden rows: the test split and the unit battery are both empty")
    rows, _ = encode_rows(tokenizer, [g["prompt"] for g in golden], [g["response"] for g in golden], s.max_length)
    rewards = score_token_rows(reward_fn_of(model), rows, tokenizer.pad_token_id or 0, s.batch_size)
    for g, r in zip(golden, rewards):
        g["reward"] = float(r)

    norm = metrics.get("normalization") or {}
    hf, hf_tokenizer = to_sequence_classifier(model, tokenizer, rows, s.trust_remote_code)
    hf.config.reward_mean = norm.get("reward_mean")
    hf.config.reward_std = norm.get("reward_std")
    hf.config.reward_stats_split = norm.get("split")
    hf_tokenizer.model_max_length = s.max_length  # with truncation_side=left: plain `tokenizer(..., truncation=True)` cuts like rmpipe
    hf_tokenizer.truncation_side = "left"
    hf_tokenizer.padding_side = "right"

    with io.atomic_dir(s.out_dir) as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        hf_tokenizer.save_pretrained(tmp)
        io.write_jsonl(tmp / GOLDEN_FILE, golden)
        check = parity(tmp, golden, s.max_length, s.batch_size, s.trust_remote_code)
        log.info("parity: max |reward diff| %.2e over %d golden rows (right and left padded)", check["max_abs_diff"], check["n_rows"])
        if check["pad_in_text"] or not check["max_abs_diff"] <= s.parity_tolerance:
            raise ValidationFailed(
                f"export parity check failed: exported rewards differ from the trained model's by up to "
                f"{check['max_abs_diff']:.3g} (tolerance {s.parity_tolerance})"
                + ("; the pad token occurs in rendered text" if check["pad_in_text"] else "")
                + f". The previous export in {s.out_dir} is left untouched."
            )
        decision = promotion_decision(metrics, s.promoted_dir, test, s)
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


def promote(export_dir: Path, promoted_dir: Path, decision: dict) -> None:
    """Copy the export to the promoted folder, atomically (a reader sees the old or the new model)."""
    with io.atomic_dir(promoted_dir) as tmp:
        for item in Path(export_dir).iterdir():
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        io.write_json(tmp / PROMOTION_FILE, decision)
    log.info("promoted %s -> %s (%s)", export_dir, promoted_dir, decision["reason"])


def load_golden(export_dir: Path) -> list[dict]:
    path = Path(export_dir) / GOLDEN_FILE
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --- scoring with an export (the `rmpipe score` command) ------------------------------------
def read_score_input(path: Path) -> list[dict]:
    """JSONL rows with `prompt` and either `response` or `chosen` + `rejected`; a bad row names its line."""
    from rmpipe.schema import PromptError, canonical_prompt

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} not found")
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = canonical_prompt(row["prompt"])
        except (json.JSONDecodeError, TypeError, KeyError, PromptError) as exc:
            raise DataError(f"{path}:{line_no}: need a JSON object with a prompt ({type(exc).__name__}: {exc})") from None
        keys = ("response",) if "response" in row else ("chosen", "rejected")
        if not all(isinstance(row.get(k), str) for k in keys):
            raise DataError(f"{path}:{line_no}: need string 'response', or 'chosen' and 'rejected'")
        rows.append({**row, "_canonical": prompt, "_keys": keys})  # the prompt is echoed back as given
    return rows


def score_file(export_dir: Path, input_path: Path, batch_size: int = 16) -> list[dict]:
    """Each input row with `reward` (or `reward_chosen`, `reward_rejected`, `margin`) from the exported model."""
    hf, tokenizer, max_length = load_exported(export_dir)
    rows = read_score_input(input_path)
    prompts, responses, where = [], [], []
    for i, row in enumerate(rows):
        for key in row["_keys"]:
            prompts.append(row["_canonical"])
            responses.append(row[key])
            where.append((i, key))
    tokens, truncated = encode_rows(tokenizer, prompts, responses, max_length)
    if truncated:
        log.warning("%d responses longer than %d tokens were left-truncated", truncated, max_length)
    rewards = score_token_rows(reward_fn_of(hf), tokens, tokenizer.pad_token_id, batch_size)
    out = [{k: v for k, v in row.items() if k not in ("_keys", "_canonical")} for row in rows]
    for (i, key), reward in zip(where, rewards):
        out[i]["reward" if key == "response" else f"reward_{key}"] = float(reward)
    for row in out:
        if "reward_chosen" in row:
            row["margin"] = row["reward_chosen"] - row["reward_rejected"]
    return out


# --- model card -------------------------------------------------------------------------------
def model_card(record: dict, params: dict, metrics: dict, pathology_report: dict, batch_ids: dict) -> str:
    """README.md of the export: what it is, how to load it, data, params, metrics, pathology, intended use, limits."""
    ev, promo, norm, par = record["evaluation"], record["promotion"], record["normalization"], record["parity"]
    battery = pathology_report.get("battery", {})
    length = pathology_report.get("length_bias", {})
    model_cfg = params.get("model", {})
    n_batches = len({b for ids in batch_ids.values() for b in ids})
    return "\n".join([
        "---",
        "library_name: transformers",
        "pipeline_tag: text-classification",
        "tags: [reward-model, rlhf, rmpipe]",
        "---",
        "",
        "# Reward model (rmpipe)",
        "",
        "A scalar reward model for RLHF: the backbone with a bias-free linear head (`score`, `num_labels=1`) read at "
        "the last real token of the chat-template rendering of (prompt, response).",
        "",
        "```python",
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
        "model = AutoModelForSequenceClassification.from_pretrained(path)",
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        "text = tokenizer.apply_chat_template(messages + [{'role': 'assistant', 'content': response}], tokenize=False)",
        "batch = tokenizer(text, add_special_tokens=False, truncation=True, return_tensors='pt')",
        "reward = model(**batch).logits[:, 0]",
        "```",
        "",
        f"Rewards are centred with `config.reward_mean` = {norm.get('reward_mean')} and `config.reward_std` = "
        f"{norm.get('reward_std')} (measured on the {norm.get('split')} split, {norm.get('n_rows')} responses).",
        "Or run `rmpipe score PATH --input rows.jsonl`.",
        "",
        "## Verdict",
        f"- evaluation: **{'passed' if ev.get('passed') else 'FAILED'}** ({', '.join(k for k, ok in (ev.get('checks') or {}).items() if not ok) or 'all checks passed'})",
        f"- promotion: **{'promoted' if promo['promoted'] else 'not promoted'}**: {promo['reason']}",
        f"- export parity: max |reward difference| {par['max_abs_diff']:.2e} vs the trained model on {par['n_rows']} golden rows "
        "(stored in `golden.jsonl`), right- and left-padded",
        "",
        "## Data",
        f"- {n_batches} preference batches: {', '.join(sorted({b for ids in batch_ids.values() for b in ids}))}",
        "- held-out test split by prompt hash: no test prompt was seen in training or model selection",
        "- exact input hashes, params, code version and packages: `lineage.json` (`rmpipe lineage PATH`, `rmpipe verify PATH`)",
        "",
        "## Training",
        f"- backbone `{model_cfg.get('backbone')}`, max length {model_cfg.get('max_length')} tokens (longer inputs are left-truncated)",
        f"- train params: `{json.dumps(params.get('train', {}), sort_keys=True)}`",
        "",
        "## Metrics (held-out test split)",
        f"- accuracy (strict, a tie is wrong): {metrics['accuracy']:.4f} on {metrics['n_pairs']} pairs",
        f"- Bradley-Terry loss: {metrics['bt_loss']:.4f}; median margin {metrics['margin']['p50']:.3f}",
        f"- calibration ECE: {metrics['ece']:.4f}",
        f"- by annotator agreement: " + "; ".join(f"{k}: {v['accuracy']:.3f} (n={v['n']})" for k, v in metrics["accuracy_by_agreement"].items()),
        f"- by response length: " + "; ".join(f"{k}: {v['accuracy']:.3f} (n={v['n']})" for k, v in metrics["accuracy_by_length"].items()),
        "",
        "## Pathology checks",
        f"- length bias: R^2 of reward vs length {length.get('r2', float('nan')):.3f} (flag above {length.get('max_r2')}); "
        f"accuracy where chosen is shorter: {length.get('accuracy_chosen_shorter')}",
        f"- unit battery: {battery.get('n', 0) - battery.get('n_failed', 0)}/{battery.get('n', 0)} pairs with margin >= {battery.get('min_margin')}"
        + (f"; failed: {', '.join(battery.get('failures', []))}" if battery.get("failures") else ""),
        f"- padding canary: max score change {metrics['canary_max_abs_diff']:.2e} when batched with other rows or padded left/right",
        "",
        "## Intended use",
        "Scoring candidate responses during PPO / best-of-n for prompts like those in the training batches, "
        "rendered with the stored chat template.",
        "",
        "## Limits",
        "- A reward model is a proxy: optimise against it with a KL penalty, and watch for reward hacking.",
        "- It knows only the preferences in its batches; out-of-domain prompts, other languages and long "
        "conversations beyond the max length are unmeasured.",
        "- Scores are not comparable across exports; centre with this export's stats.",
        "",
    ])
