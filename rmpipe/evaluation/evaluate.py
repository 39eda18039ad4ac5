"""Held-out evaluation: score pairs with a reward model and turn the scores into metrics.

Every score goes through `rmpipe.model.render.encode` (the chat template), left-truncated
to `max_length` tokens (the end of a conversation is what the reward reads), and
a model seen only as a `RewardFn`: (input_ids, attention_mask) -> (B,) rewards.
The same path scores our `RewardModel` and the exported plain-transformers model,
which is what makes the export parity check meaningful.

Held-out splits are scored grouped by prompt (`score_pairs_grouped`): each prompt once, each distinct
response once, in the `groups` layout training uses, where that layout is exact for the model
(measured first, as training does). The battery, the padding canary and the export's golden-set
parity stay on the plain padded path on purpose: they test that path.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from rmpipe.model.batching import plan_batches
from rmpipe.core.errors import DataError
from rmpipe.model.render import encode_rows, tokenize_pairs
from rmpipe.core.settings import EvalSettings

log = logging.getLogger("rmpipe.evaluate")

RewardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TokenRows = Sequence[Sequence[int]]


# --- model access -----------------------------------------------------------------------------
def load_checkpoint(model_dir: str | Path, trust_remote_code: bool = False):
    """(RewardModel, tokenizer) from a train-stage folder (RewardModel.save_pretrained + tokenizer).
    `trust_remote_code` (model.trust_remote_code) must be what training ran with: the backbone's own code."""
    from transformers import AutoTokenizer

    from rmpipe.model.reward_model import CONFIG_FILE, RewardModel

    model_dir = Path(model_dir)
    if not (model_dir / CONFIG_FILE).exists():
        raise DataError(f"{model_dir} holds no reward model ({CONFIG_FILE} missing): run the train stage first")
    model = RewardModel.from_pretrained(model_dir, trust_remote_code=trust_remote_code).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    return model, tokenizer


def reward_fn_of(model) -> RewardFn:
    """A `RewardFn` for our RewardModel or for a transformers *ForSequenceClassification (num_labels=1)."""
    from rmpipe.model.reward_model import RewardModel

    if isinstance(model, RewardModel):
        return model
    return lambda input_ids, attention_mask: model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]


# --- tokens -> batches -> scores --------------------------------------------------------------
def pad_batch(rows: TokenRows, pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token rows into (B, T) ids and attention mask, on the right or the left."""
    if side not in ("right", "left"):
        raise ValueError(f"padding side must be 'right' or 'left', got {side!r}")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def batch_scorer(reward_fn: RewardFn, pad_id: int) -> Callable[[TokenRows, str], np.ndarray]:
    """`score(rows, side)`: rewards of `rows` scored as ONE padded batch (what the padding canary probes)."""

    @torch.inference_mode()
    def score(rows: TokenRows, side: str = "right") -> np.ndarray:
        ids, mask = pad_batch(rows, pad_id, side)
        return reward_fn(ids, mask).float().cpu().numpy().astype(np.float64)

    return score


def score_token_rows(reward_fn: RewardFn, rows: TokenRows, pad_id: int, batch_size: int = 16, side: str = "right") -> np.ndarray:
    """Rewards of many token rows, batched by length (less padding) and returned in input order."""
    score = batch_scorer(reward_fn, pad_id)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = np.empty(len(rows), dtype=np.float64)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        out[chunk] = score([rows[i] for i in chunk], side)
    return out


def pad_id_of(tokenizer) -> int:
    """Any id works for our mask-pooled model; use the tokenizer's pad (or eos) so batches look familiar."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if value is not None:
            return int(value)
    return 0


def score_pairs(reward_fn: RewardFn, tokenizer, pairs: pd.DataFrame, max_length: int, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray, int]:
    """(r_chosen, r_rejected, n_truncated_rows) for a pairs frame with prompt/chosen/rejected."""
    prompts = list(pairs["prompt"]) * 2
    responses = list(pairs["chosen"]) + list(pairs["rejected"])
    rows, truncated = encode_rows(tokenizer, prompts, responses, max_length)
    rewards = score_token_rows(reward_fn, rows, pad_id_of(tokenizer), batch_size)
    n = len(pairs)
    return rewards[:n], rewards[n:], truncated


def packed_reward_model(model):
    """Our RewardModel, or the same (backbone, bias-free head) view of a transformers sequence classifier;
    None when the model has no such parts (it is then scored on the plain path)."""
    from rmpipe.model.reward_model import RewardModel

    if isinstance(model, RewardModel):
        return model
    backbone, head = getattr(model, "base_model", None), getattr(model, "score", None)
    if backbone is None or backbone is model or not isinstance(head, torch.nn.Linear) or head.out_features != 1 \
            or head.bias is not None:
        return None
    return RewardModel(backbone, head)


def score_pairs_grouped(model, tokenizer, pairs: pd.DataFrame, max_length: int, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray, int]:
    """`score_pairs`, but each prompt's pairs scored as one group (prompt once, each response once).

    Batches hold up to `batch_size x max_length` computed tokens (what one plain batch may hold). Falls
    back to `score_pairs` for a model without packed scoring or where the packed layout is not exact.
    """
    from rmpipe.model.packing import make_batch, resolve_packing

    packed = packed_reward_model(model)
    if packed is None or pairs.empty:
        return score_pairs(reward_fn_of(model), tokenizer, pairs, max_length, batch_size)
    pad_id = pad_id_of(tokenizer)
    tokens = tokenize_pairs(tokenizer, pairs, max_length)
    layout, _ = resolve_packing("auto", packed, tokens, pad_id)
    if layout == "none":
        log.warning("packed scoring is not exact for this model: scoring on the plain path")
        return score_pairs(reward_fn_of(model), tokenizer, pairs, max_length, batch_size)
    budget = batch_size * max_length
    units = tokens.units(layout, budget)
    r_c, r_r = np.empty(len(tokens)), np.empty(len(tokens))
    with torch.inference_mode():
        for batch_units in plan_batches(units.lengths, budget, 10**9, seed=0, shuffle=False,
                                        packed_tokens=units.tokens, sizes=units.sizes()):
            rows = units.rows(batch_units)
            rewards = packed(**make_batch(tokens, rows, layout, pad_id).inputs).float().cpu().numpy()
            r_c[rows], r_r[rows] = rewards[: len(rows)], rewards[len(rows):]
    return r_c, r_r, tokens.n_truncated_rows


# --- metrics ----------------------------------------------------------------------------------
def pair_metrics(r_chosen: np.ndarray, r_rejected: np.ndarray) -> dict:
    """Strict accuracy (a tie is wrong, RewardBench convention) with its 95% interval, mean Bradley-Terry loss,
    margin quantiles."""
    margin = np.asarray(r_chosen, dtype=np.float64) - np.asarray(r_rejected, dtype=np.float64)
    if margin.size == 0:
        raise DataError("no pairs to evaluate: the test split is empty")
    bt_loss = float(-F.logsigmoid(torch.from_numpy(margin)).mean())
    q = np.quantile(margin, [0.05, 0.25, 0.5, 0.75, 0.95])
    ci_low, ci_high = wilson_interval(int((margin > 0).sum()), margin.size)
    return {
        "n_pairs": int(margin.size),
        "accuracy": float((margin > 0).mean()),
        "accuracy_ci_low": ci_low, "accuracy_ci_high": ci_high,  # 95% Wilson interval: the test split is small
        "ties": int((margin == 0).sum()),
        "bt_loss": bt_loss,
        "margin": {
            "mean": float(margin.mean()),
            "std": float(margin.std()),
            "p05": float(q[0]), "p25": float(q[1]), "p50": float(q[2]), "p75": float(q[3]), "p95": float(q[4]),
        },
    }


def accuracy_by_bucket(correct: np.ndarray, buckets: pd.Series) -> dict[str, dict]:
    """{bucket label: {n, accuracy}} in bucket order; empty buckets are left out."""
    frame = pd.DataFrame({"correct": np.asarray(correct, dtype=float), "bucket": buckets.to_numpy()})
    out = {}
    for label, group in frame.groupby("bucket", observed=True, sort=True):
        out[str(label)] = {"n": int(len(group)), "accuracy": float(group["correct"].mean())}
    return out


def agreement_buckets(agreement: pd.Series, edges: Sequence[float]) -> pd.Series:
    """Annotator agreement cut at fixed `edges` (params), e.g. [0, 0.6, 0.8, 1.0] -> '0.8-1' (right edge included)."""
    labels = [f"{lo:g}-{hi:g}" for lo, hi in zip(edges, edges[1:])]
    return pd.cut(agreement.astype(float), bins=list(edges), labels=labels, include_lowest=True)


def length_buckets(pairs: pd.DataFrame, n_buckets: int) -> pd.Series:
    """Quantile buckets of the pair's mean response length in characters, labelled by their char range."""
    mean_len = (pairs["chosen"].str.len() + pairs["rejected"].str.len()) / 2
    n = max(1, min(n_buckets, mean_len.nunique()))
    _, edges = pd.qcut(mean_len, q=n, duplicates="drop", retbins=True)
    # Zero-padded labels keep short-to-long order wherever the buckets get sorted as text (dvc metrics show).
    width = len(str(math.ceil(edges[-1])))
    labels = [f"{round(lo):0{width}d}-{round(hi):0{width}d} chars" for lo, hi in zip(edges, edges[1:])]
    return pd.cut(mean_len, bins=edges, labels=labels, include_lowest=True)


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy of `correct` out of `n` (sound at 0 and 1, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    p, z2 = correct / n, z * z
    centre, half = (p + z2 / (2 * n)) / (1 + z2 / n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# What runs are compared by (`dvc exp show`, `dvc metrics diff`), in column order: the held-out accuracy first.
# Per-bucket and per-check detail stays in reports/eval.json.
HEADLINE = ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "n_pairs", "bt_loss", "ece", "length_r2",
            "battery_failed", "battery_n", "passed")


def headline(metrics: dict) -> dict:
    """metrics/eval.json: the HEADLINE figures of a full evaluation record, in that order."""
    return {k: metrics[k] for k in HEADLINE}


def reward_stats(rewards: np.ndarray) -> dict:
    """Normalisation stats for downstream PPO: mean/std over every scored response."""
    rewards = np.asarray(rewards, dtype=np.float64)
    return {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()), "n_rows": int(rewards.size)}


# --- the whole evaluation ---------------------------------------------------------------------
@dataclass
class EvalResult:
    metrics: dict  # -> reports/eval.json (every figure; `headline(metrics)` -> metrics/eval.json, the DVC metrics)
    pathology: dict  # -> reports/pathology.json (every check in full)
    plots: dict[str, pd.DataFrame]  # name -> table under plots/eval/
    summary: str  # -> reports/eval.md


def evaluate_model(model, tokenizer, test: pd.DataFrame, val: pd.DataFrame, battery: list[dict], s: EvalSettings,
                   max_length: int) -> EvalResult:
    """Score the held-out test split, the battery and the canary (rows cut to `max_length`); pass/fail from `s`."""
    from rmpipe.evaluation import pathology

    reward_fn = reward_fn_of(model)
    r_c, r_r, truncated = score_pairs_grouped(model, tokenizer, test, max_length, s.batch_size)
    log.info("scored %d test pairs (%d rows left-truncated to %d tokens)", len(test), truncated, max_length)
    metrics = pair_metrics(r_c, r_r)
    correct = r_c > r_r
    metrics["truncated_rows"] = truncated
    metrics["accuracy_by_agreement"] = accuracy_by_bucket(correct, agreement_buckets(test["agreement"], s.agreement_edges))
    metrics["accuracy_by_length"] = accuracy_by_bucket(correct, length_buckets(test, s.length_buckets))

    observed = test["soft_label"].astype(float).fillna(1.0).to_numpy() if "soft_label" in test else np.ones(len(test))
    calib = pathology.calibration(r_c - r_r, observed, s.calibration_bins, s.calibration_min_pairs)
    len_c, len_r = test["chosen"].str.len().to_numpy(), test["rejected"].str.len().to_numpy()
    length = pathology.length_bias(r_c, r_r, len_c, len_r, s.max_length_r2)

    b_frame = pd.DataFrame(battery)
    b_c, b_r, _ = score_pairs(reward_fn, tokenizer, b_frame, max_length, s.batch_size)
    battery_result = pathology.battery_report(b_frame["name"].tolist(), b_c - b_r, s.battery_min_margin)

    canary_frame = pd.concat([test.head(s.canary_rows), b_frame.head(2)], ignore_index=True)
    canary_tokens, _ = encode_rows(tokenizer, canary_frame["prompt"], canary_frame["chosen"], max_length)
    canary = pathology.padding_canary(batch_scorer(reward_fn, pad_id_of(tokenizer)), canary_tokens, s.canary_tolerance)

    normalization = normalization_stats(model, tokenizer, val, max_length, s.batch_size)

    checks = {  # scale-free only: BT rewards are defined up to shift and scale (ECE and margins are reported)
        "accuracy": metrics["accuracy"] >= s.min_accuracy,
        "length_bias": not length["flagged"],
        "battery": battery_result["n_failed"] <= s.max_battery_failures,
        "padding_canary": canary["passed"],
    }
    metrics.update({
        "ece": calib["ece"], "calibration_flagged": calib["ece"] > s.max_ece,  # reported: ECE moves with the scale
        "length_r2": length["r2"],
        "length_flagged": length["flagged"],
        "accuracy_chosen_shorter": length["accuracy_chosen_shorter"],
        "battery_failed": battery_result["n_failed"],
        "battery_n": battery_result["n"],
        "battery_below_min_margin": len(battery_result["below_min_margin"]),
        "canary_max_abs_diff": canary["max_abs_diff"],
        "normalization": normalization,
        "checks": checks,
        "passed": all(checks.values()),
    })
    pathology_report = {"calibration": calib, "length_bias": length, "battery": battery_result, "padding_canary": canary,
                        "thresholds": {"max_length": max_length, **s.model_dump(exclude={"batch_size"})}}
    plots = {
        "reward_hist": reward_histogram(r_c, r_r),
        "calibration": pd.DataFrame(calib["curve"]),
        "reward_vs_length": pd.DataFrame({
            "length": np.concatenate([len_c, len_r]),
            "reward": np.concatenate([r_c, r_r]),
            "response": ["chosen"] * len(r_c) + ["rejected"] * len(r_r),
        }),
    }
    return EvalResult(metrics, pathology_report, plots, summary_markdown(metrics, pathology_report))


def normalization_stats(model, tokenizer, val: pd.DataFrame, max_length: int, batch_size: int) -> dict:
    """Reward mean/std over the validation split's responses (never the test split: it stays held out)."""
    if val.empty:
        raise DataError("the val split is empty: reward normalisation stats come from it; add batches or adjust split.fractions")
    v_c, v_r, _ = score_pairs_grouped(model, tokenizer, val, max_length, batch_size)
    return {**reward_stats(np.concatenate([v_c, v_r])), "split": "val"}


def reward_histogram(r_chosen: np.ndarray, r_rejected: np.ndarray, n_bins: int = 30) -> pd.DataFrame:
    """Counts of chosen and rejected rewards on shared bins (x = bin centre)."""
    both = np.concatenate([r_chosen, r_rejected])
    edges = np.histogram_bin_edges(both, bins=n_bins)
    return pd.DataFrame({
        "reward": (edges[:-1] + edges[1:]) / 2,
        "chosen": np.histogram(r_chosen, bins=edges)[0],
        "rejected": np.histogram(r_rejected, bins=edges)[0],
    })


def summary_markdown(metrics: dict, report: dict) -> str:
    """A page a person reads first: verdict, headline figures, and every failed check by name."""
    verdict = "PASSED" if metrics["passed"] else "FAILED"
    failed = [name for name, ok in metrics["checks"].items() if not ok]
    t = report["thresholds"]
    lines = [
        f"# Reward-model evaluation: {verdict}",
        "",
        f"Held-out test split: {metrics['n_pairs']} pairs." + (f" Failed checks: {', '.join(failed)}." if failed else ""),
        "",
        "| check | value | threshold | ok |",
        "|---|---|---|---|",
        f"| accuracy (strict) | {metrics['accuracy']:.4f} | >= {t['min_accuracy']} | {metrics['checks']['accuracy']} |",
        f"| calibration ECE (reported) | {metrics['ece']:.4f} | flagged above {t['max_ece']} | "
        f"{'flagged' if metrics['calibration_flagged'] else 'ok'} |",
        f"| length R^2 | {metrics['length_r2']:.4f} | <= {t['max_length_r2']} | {metrics['checks']['length_bias']} |",
        f"| battery pairs ordered wrong | {metrics['battery_failed']}/{metrics['battery_n']} | <= {t['max_battery_failures']} | {metrics['checks']['battery']} |",
        f"| battery margin below {t['battery_min_margin']} (reported) | {metrics['battery_below_min_margin']}/{metrics['battery_n']} | - | - |",
        f"| padding canary max diff | {metrics['canary_max_abs_diff']:.2e} | <= {t['canary_tolerance']} | {metrics['checks']['padding_canary']} |",
        "",
        f"Bradley-Terry loss {metrics['bt_loss']:.4f}; margin median {metrics['margin']['p50']:.3f} "
        f"(p05 {metrics['margin']['p05']:.3f}, p95 {metrics['margin']['p95']:.3f}); "
        f"accuracy where chosen is shorter: {_fmt(metrics['accuracy_chosen_shorter'])}.",
        "",
        "## Accuracy by annotator agreement",
        *[f"- {k}: {v['accuracy']:.3f} ({v['n']} pairs)" for k, v in metrics["accuracy_by_agreement"].items()],
        "",
        "## Accuracy by response length",
        *[f"- {k}: {v['accuracy']:.3f} ({v['n']} pairs)" for k, v in metrics["accuracy_by_length"].items()],
        "",
        "## Unit battery",
        *[f"- {'ok  ' if r['passed'] else 'FAIL'} {r['name']}: margin {r['margin']:+.3f}" for r in report["battery"]["results"]],
        "",
        "A battery pair fails when ordered wrong (margin <= 0); the margin itself depends on the reward scale.",
        "",
    ]
    return "\n".join(lines)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
