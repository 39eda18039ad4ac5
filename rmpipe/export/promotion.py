"""The promotion gate: does the candidate replace the model in prod? A comparison, not a threshold.

    prod = baseline(root, s, test, battery, max_length, batch_size)        # None: no version in prod
    decision = promotion_decision(metrics, candidate_scores(...), prod, s)
    if decision["promoted"]: promote(export_dir, promoted_dir, decision)

Bradley-Terry rewards are defined only up to shift and scale, so no absolute reward margin decides.
The candidate and the prod model are scored on the SAME held-out pairs (the candidate's test split;
prod is re-scored on it) and the candidate is refused only when it is significantly worse:

* paired test on the test split: d_i = correct_cand_i - correct_prod_i; the one-sided (1 - alpha)
  upper bound of the mean difference from a paired bootstrap (seeded: the same inputs give the same
  decision) must not fall below -`promotion_tolerance`. Reported with it: n, the discordant counts
  b (candidate right, prod wrong) and c (prod right, candidate wrong), the accuracy difference and the
  exact McNemar one-sided p-value P(X >= c | X ~ Bin(b + c, 1/2));
* the battery, judged relative and by sign: a pair prod orders right and the candidate wrong is a
  regression; more than `max_battery_regressions` of them refuse the candidate.

With no version in prod, a candidate that passed its own evaluation is promoted. Which model is in
prod comes from the registry (rmpipe.audit.registry) where there is one; its files are the promoted
folder when that holds the same model, else the prod version's export restored from the DVC cache.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rmpipe.core import io
from rmpipe.evaluation.evaluate import reward_fn_of, score_pairs, score_pairs_grouped
from rmpipe.export.hf import load_exported
from rmpipe.audit.lineage import MANIFEST_FILE, PROMOTION_FILE
from rmpipe.core.settings import ExportSettings

log = logging.getLogger("rmpipe.export")

N_BOOTSTRAP = 20000
NO_PROD = "no version in prod"


@dataclass
class Scores:
    """One model on the gate's pairs: per test pair, ordered right?; per battery pair name, its margin."""
    correct: np.ndarray
    battery: dict[str, float]


@dataclass
class Baseline:
    """The model in prod, scored on the candidate's pairs."""
    scores: Scores
    version: str | None  # the registry's version name; None without a registry
    source: str  # where its files were read


def candidate_scores(model, tokenizer, test: pd.DataFrame, battery_margins: dict[str, float], max_length: int,
                     batch_size: int) -> Scores:
    r_c, r_r, _ = score_pairs_grouped(model, tokenizer, test, max_length, batch_size)
    return Scores(np.asarray(r_c > r_r), dict(battery_margins))


def export_scores(export_dir: Path, test: pd.DataFrame, battery: list[dict], batch_size: int,
                  trust_remote_code: bool = False) -> Scores:
    """An export scored the way it was exported to be used (its own tokenizer and max length)."""
    hf, tokenizer, max_length = load_exported(export_dir, trust_remote_code)
    r_c, r_r, _ = score_pairs_grouped(hf, tokenizer, test, max_length, batch_size)  # each prompt once
    margins: dict[str, float] = {}
    if battery:
        frame = pd.DataFrame(battery)
        b_c, b_r, _ = score_pairs(reward_fn_of(hf), tokenizer, frame, max_length, batch_size)
        margins = dict(zip(frame["name"], (b_c - b_r).tolist()))
    return Scores(np.asarray(r_c > r_r), margins)


# --- the statistics -------------------------------------------------------------------------------
def paired_comparison(cand: np.ndarray, prod: np.ndarray, tolerance: float, alpha: float, seed: int = 0) -> dict:
    """Paired bootstrap bound and exact McNemar on the same pairs; `significantly_worse` decides."""
    from scipy.stats import binomtest

    cand, prod = np.asarray(cand, dtype=bool), np.asarray(prod, dtype=bool)
    n = int(cand.size)
    b, c = int((cand & ~prod).sum()), int((prod & ~cand).sum())
    diff = (b - c) / n
    draws = np.random.default_rng(seed).multinomial(n, [b / n, c / n, (n - b - c) / n], size=N_BOOTSTRAP)
    boot = (draws[:, 0] - draws[:, 1]) / n
    upper, lower = float(np.quantile(boot, 1 - alpha)), float(np.quantile(boot, alpha))
    p = float(binomtest(c, b + c, 0.5, alternative="greater").pvalue) if b + c else 1.0
    return {"n": n, "b": b, "c": c, "candidate_accuracy": float(cand.mean()), "prod_accuracy": float(prod.mean()),
            "accuracy_diff": diff, "ci": [lower, upper], "ci_level": 1 - 2 * alpha, "upper_bound": upper,
            "mcnemar_p": p, "tolerance": tolerance, "alpha": alpha, "n_bootstrap": N_BOOTSTRAP,
            "significantly_worse": upper < -tolerance}


def battery_regressions(cand: dict[str, float], prod: dict[str, float]) -> dict:
    """Battery pairs prod orders right (margin > 0) and the candidate wrong (margin <= 0)."""
    shared = sorted(set(cand) & set(prod))
    regressed = [k for k in shared if prod[k] > 0 >= cand[k]]
    return {"n": len(shared), "prod_right": sum(prod[k] > 0 for k in shared),
            "candidate_right": sum(cand[k] > 0 for k in shared), "regressions": regressed,
            "improvements": [k for k in shared if cand[k] > 0 >= prod[k]]}


def promotion_decision(metrics: dict, candidate: Scores, prod: Baseline | None, s: ExportSettings,
                       note: str | None = None) -> dict:
    """Promote unless evaluation failed or the candidate is significantly worse than prod (module doc)."""
    accuracy = float(metrics["accuracy"])
    decision: dict[str, Any] = {"accuracy": accuracy, "tolerance": s.promotion_tolerance, "previous_accuracy": None,
                                "prod_version": None, "baseline_note": note}
    if not metrics.get("passed", False):
        failed = [k for k, ok in metrics.get("checks", {}).items() if not ok]
        return {**decision, "promoted": False, "reason": f"evaluation failed: {', '.join(failed) or 'see metrics'}"}
    if prod is None:
        return {**decision, "promoted": True,
                "reason": "passed; no previously promoted model" + (" (no version in prod)" if note == NO_PROD else "")}
    test = paired_comparison(candidate.correct, prod.scores.correct, s.promotion_tolerance, s.promotion_alpha)
    battery = battery_regressions(candidate.battery, prod.scores.battery)
    who = f"prod {prod.version}" if prod.version else "the promoted model"
    decision.update(previous_accuracy=test["prod_accuracy"], prod_version=prod.version, prod_source=prod.source,
                    paired_test=test, battery=battery)
    figures = (f"accuracy {test['candidate_accuracy']:.4f} vs {test['prod_accuracy']:.4f} on the same {test['n']} "
               f"pairs, diff {test['accuracy_diff']:+.4f}, {1 - s.promotion_alpha:.0%} upper bound "
               f"{test['upper_bound']:+.4f} vs -{s.promotion_tolerance}; McNemar b={test['b']} c={test['c']} "
               f"p={test['mcnemar_p']:.3g}")
    if test["significantly_worse"]:
        return {**decision, "promoted": False, "reason": f"significantly worse than {who}: {figures}"}
    if len(battery["regressions"]) > s.max_battery_regressions:
        return {**decision, "promoted": False,
                "reason": f"battery regression vs {who}: {', '.join(battery['regressions'])} ordered right by prod, "
                          f"wrong by the candidate (allowed {s.max_battery_regressions}); {figures}"}
    return {**decision, "promoted": True, "reason": f"passed; not significantly worse than {who}: {figures}"}


# --- which model is in prod ------------------------------------------------------------------------
def baseline(root: Path, s: ExportSettings, test: pd.DataFrame, battery: list[dict], batch_size: int,
             trust_remote_code: bool = False) -> tuple[Baseline | None, str | None]:
    """(prod scored on these pairs or None, a note on where prod came from)."""
    from rmpipe.audit import registry
    from rmpipe.audit.lineage import manifest_sha256

    folder = Path(root) / s.promoted_dir
    folder_digest = manifest_sha256(folder) if (folder / MANIFEST_FILE).exists() else None
    reason = registry.unavailable_reason(root)
    if reason is not None:  # no registry: the promoted folder is all there is
        if folder_digest is None:
            return None, reason
        return Baseline(export_scores(folder, test, battery, batch_size, trust_remote_code), None, str(s.promoted_dir)), reason
    prod = registry.in_stage(root)
    if prod is None:
        return None, NO_PROD
    if prod["body"].get("manifest_sha256") == folder_digest:
        scores = export_scores(folder, test, battery, batch_size, trust_remote_code)
        return Baseline(scores, prod["version"], str(s.promoted_dir)), None
    restored = registry.restore_export(root, prod, s.out_dir)
    if restored is None:
        return None, f"prod {prod['version']}'s export is neither in {s.promoted_dir} nor in the DVC cache"
    with restored as path:
        scores = export_scores(path, test, battery, batch_size, trust_remote_code)
    return Baseline(scores, prod["version"], f"DVC cache ({prod['tag']})"), None


def promote(export_dir: Path, promoted_dir: Path, decision: dict) -> None:
    """Copy the export to the promoted folder, atomically (a reader sees the old or the new model)."""
    with io.atomic_dir(promoted_dir) as tmp:
        for item in Path(export_dir).iterdir():
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        io.write_json(tmp / PROMOTION_FILE, decision)
    log.info("promoted %s -> %s (%s)", export_dir, promoted_dir, decision["reason"])
