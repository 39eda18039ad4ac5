"""Checks that catch reward models which score well on paper and fail silently in RLHF.

- calibration: is sigmoid(margin) the probability annotators prefer the chosen response?
- length bias: does the reward mostly measure how long the response is?
- unit battery: trivial hand-written pairs (helpful vs refusal, polite vs rude, ...) each
  needing a clear margin; a failure is reported by name.
- padding canary: a row's score must not depend on its batch neighbours or padding side
  (a model pooling the last *position* instead of the last *real token* fails this).

Each check is a function of plain arrays (or of a batch-scoring callable for the canary),
so it can be tested on small tensors and reused on any model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy import stats

from rmpipe.core.errors import DataError
from rmpipe.core.schema import PromptError, canonical_prompt

BATTERY_FIELDS = ("name", "prompt", "chosen", "rejected")


# --- calibration ------------------------------------------------------------------------------
def calibration(margin: np.ndarray, observed: np.ndarray, n_bins: int = 10, min_pairs: int = 1) -> dict:
    """Expected calibration error of p = sigmoid(margin) against the observed preference share.

    Each pair is counted in both orientations ((p, y) and (1 - p, 1 - y)): with only the
    chosen-first view every outcome would be "chosen wins" and any over-confident model
    would look calibrated. `observed` is the vote share for chosen (the soft label);
    use 1.0 when only the majority outcome is known. The ECE uses the `n_bins` equal-width
    bins; the curve merges a bin of fewer than `min_pairs` into the next (a bin of 1 or 3
    pairs reads as 0 or 1 and makes the curve zigzag).
    """
    margin = np.asarray(margin, dtype=np.float64)
    observed = np.asarray(observed, dtype=np.float64)
    p_chosen = 1.0 / (1.0 + np.exp(-margin))
    p = np.concatenate([p_chosen, 1.0 - p_chosen])
    y = np.concatenate([observed, 1.0 - observed])
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)
    ece = sum((bins == b).mean() * abs(p[bins == b].mean() - y[bins == b].mean()) for b in range(n_bins) if (bins == b).any())
    curve = [{"bin": f"{edges[lo]:.1f}-{edges[hi]:.1f}", "predicted": float(p[in_bin].mean()),
              "observed": float(y[in_bin].mean()), "perfectly_calibrated": float(p[in_bin].mean()),
              "pairs": int(in_bin.sum())}
             for lo, hi, in_bin in _merged_bins(bins, n_bins, min_pairs)]
    return {"ece": float(ece), "n_bins": n_bins, "min_pairs": min_pairs, "curve": curve}


def _merged_bins(bins: np.ndarray, n_bins: int, min_pairs: int) -> list[tuple[int, int, np.ndarray]]:
    """(first edge, last edge, members) of consecutive non-empty bins grown until each holds >= min_pairs;
    a short remainder joins the last group."""
    groups: list[tuple[int, int, np.ndarray]] = []
    start, members = 0, np.zeros(bins.shape, dtype=bool)
    for b in range(n_bins):
        members = members | (bins == b)
        if members.sum() >= min_pairs:
            groups.append((start, b + 1, members))
            start, members = b + 1, np.zeros(bins.shape, dtype=bool)
    if members.any():
        if groups:
            lo, _, last = groups.pop()
            groups.append((lo, n_bins, last | members))
        else:
            groups.append((0, n_bins, members))
    return groups


# --- length bias ------------------------------------------------------------------------------
def length_bias(
    r_chosen: np.ndarray,
    r_rejected: np.ndarray,
    len_chosen: np.ndarray,
    len_rejected: np.ndarray,
    max_r2: float,
) -> dict:
    """R^2 of reward against response length (all responses), and accuracy where chosen is shorter.

    A model that learned "longer is better" shows a high R^2 and a low accuracy on the
    pairs whose chosen response is the shorter one; `flagged` when R^2 > `max_r2`.
    """
    rewards = np.concatenate([r_chosen, r_rejected]).astype(np.float64)
    lengths = np.concatenate([len_chosen, len_rejected]).astype(np.float64)
    if np.ptp(lengths) == 0 or np.ptp(rewards) == 0:
        r2, slope = 0.0, 0.0  # no spread: reward cannot be explained by length
    else:
        fit = stats.linregress(lengths, rewards)
        r2, slope = float(fit.rvalue**2), float(fit.slope)
    shorter = np.asarray(len_chosen) < np.asarray(len_rejected)
    correct = np.asarray(r_chosen) > np.asarray(r_rejected)
    return {
        "r2": r2,
        "slope_per_char": slope,
        "max_r2": max_r2,
        "flagged": bool(r2 > max_r2),
        "n_chosen_shorter": int(shorter.sum()),
        "accuracy_chosen_shorter": float(correct[shorter].mean()) if shorter.any() else None,
        "accuracy_chosen_longer": float(correct[~shorter].mean()) if (~shorter).any() else None,
    }


# --- unit battery -----------------------------------------------------------------------------
def load_battery(path: str | Path) -> list[dict]:
    """Battery rows {name, prompt (canonical chat JSON), chosen, rejected}; a bad row is a DataError naming its line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"unit battery {path} not found (evaluate.battery_file in params.yaml)")
    rows, names = [], set()
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line_no}: expected a JSON object with {list(BATTERY_FIELDS)}")
        # The prompt may also be a message list; canonical_prompt checks it below.
        missing = [f for f in BATTERY_FIELDS if not row.get(f) or (f != "prompt" and not isinstance(row[f], str))
                   or (isinstance(row[f], str) and not row[f].strip())]
        if missing:
            raise DataError(f"{path}:{line_no}: missing or empty field(s) {missing}")
        if row["name"] in names:
            raise DataError(f"{path}:{line_no}: duplicate battery name {row['name']!r}")
        try:
            prompt = canonical_prompt(row["prompt"])
        except PromptError as exc:
            raise DataError(f"{path}:{line_no}: {exc}") from None
        names.add(row["name"])
        rows.append({"name": row["name"], "prompt": prompt, "chosen": row["chosen"], "rejected": row["rejected"]})
    if not rows:
        raise DataError(f"unit battery {path} is empty")
    return rows


def battery_report(names: Sequence[str], margins: np.ndarray, min_margin: float) -> dict:
    """Each battery pair passes when the model orders it right (r_chosen > r_rejected, strictly); failures by name.

    Bradley-Terry rewards have no fixed scale, so the margin is judged by sign only; pairs under
    `min_margin` are listed as a reported figure (`below_min_margin`), never a failure.
    """
    results = [{"name": name, "margin": float(m), "passed": bool(m > 0), "below_min_margin": bool(m < min_margin)}
               for name, m in zip(names, margins, strict=True)]
    failures = [r["name"] for r in results if not r["passed"]]
    return {
        "min_margin": min_margin,
        "n": len(results),
        "n_failed": len(failures),
        "failures": failures,
        "below_min_margin": [r["name"] for r in results if r["below_min_margin"]],
        "results": results,
    }


# --- padding canary ---------------------------------------------------------------------------
BatchScorer = Callable[[Sequence[Sequence[int]], str], np.ndarray]


def padding_canary(score_batch: BatchScorer, rows: Sequence[Sequence[int]], tolerance: float) -> dict:
    """Score each row alone, then beside longer and shorter rows, padded right and left.

    Any change beyond `tolerance` means the score depends on padding: the model (or its
    pooling, position ids or attention mask handling) reads something other than the row.
    """
    if len(rows) < 2:
        raise DataError("the padding canary needs at least two rows of different lengths")
    by_length = sorted(rows, key=len)
    shortest, longest = by_length[0], by_length[-1]
    # A longer neighbour than any row forces real padding on every probed row.
    longer = list(longest) + list(longest[: max(4, len(longest) // 2)])
    alone = np.array([score_batch([row], "right")[0] for row in by_length])
    probes = {
        "with_longer_right_padded": lambda row: score_batch([row, longer], "right")[0],
        "with_longer_left_padded": lambda row: score_batch([row, longer], "left")[0],
        "with_shorter_right_padded": lambda row: score_batch([shortest[:1], row], "right")[1],
        "with_shorter_left_padded": lambda row: score_batch([shortest[:1], row], "left")[1],
    }
    deviations = {}
    for name, probe in probes.items():
        scored = np.array([probe(row) for row in by_length])
        deviations[name] = float(np.max(np.abs(scored - alone)))
    worst = max(deviations.values())
    return {
        "tolerance": tolerance,
        "n_rows": len(rows),
        "max_abs_diff": worst,
        "by_probe": deviations,
        "passed": bool(worst <= tolerance),
    }
