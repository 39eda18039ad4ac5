"""Prompt-hash split: train / val / test as a pure function of (prompt_hash, salt, fractions).

Each prompt gets a point `u` in [0, 1) from SHA-256(salt + "\\x1f" + prompt_hash);
the cumulative fractions cut [0, 1) into train, val, test. Nothing else enters the
decision, so every pair of a prompt lands in one split, and a prompt keeps its split
when later batches add pairs (only a new salt or new fractions move prompts).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Mapping

import numpy as np
import pandas as pd

from rmpipe.core.errors import ConfigError, DataError
from rmpipe.core.schema import PAIR_COLUMNS, SPLITS
from rmpipe.core.settings import check_fractions

_SEPARATOR = "\x1f"


def unit_interval_points(prompt_hashes: pd.Series, salt: str) -> np.ndarray:
    """u in [0, 1) per row: the first 64 bits of SHA-256(salt + "\\x1f" + prompt_hash) / 2**64.

    Hashes each distinct prompt once (a prompt has many pairs); the top 53 bits are
    used for the float so u is exact and can never round up to 1.0.
    """
    codes, distinct = pd.factorize(prompt_hashes, sort=False)
    prefix = salt + _SEPARATOR
    # tolist(): Python strings at once (iterating an Arrow-backed Index builds them one call at a time)
    digests = b"".join(hashlib.sha256((prefix + h).encode("utf-8")).digest()[:8] for h in distinct.tolist())
    top64 = np.frombuffer(digests, dtype=">u8").astype(np.uint64)
    points = (top64 >> np.uint64(11)).astype(np.float64) / float(2**53)
    return points[codes]


def assign_splits(prompt_hashes: pd.Series, salt: str, fractions: Mapping[str, float]) -> np.ndarray:
    """Split name per row (train / val / test) for the given prompt hashes."""
    fractions = check_fractions(fractions)
    weights = np.array([fractions[name] for name in SPLITS])
    # Normalised so the last cut is 1.0 even when the fractions sum to 1 only within tolerance.
    cuts = np.cumsum(weights / weights.sum())[:-1]
    index = np.searchsorted(cuts, unit_interval_points(prompt_hashes, salt), side="right")
    return np.asarray(SPLITS, dtype=object)[index]


def split_pairs(pairs: pd.DataFrame, salt: str, fractions: Mapping[str, float]) -> pd.DataFrame:
    """`pairs` with a `split` column set from each row's prompt_hash (contract columns first)."""
    if "prompt_hash" not in pairs.columns:
        raise DataError("the pairs table has no 'prompt_hash' column: re-run the aggregate stage")
    missing = pairs["prompt_hash"].isna()
    if missing.any():
        raise DataError(
            f"{int(missing.sum())} of {len(pairs)} pairs have no prompt_hash "
            f"(e.g. pair_id {pairs.loc[missing].iloc[0].get('pair_id', '?')}): re-run the aggregate stage"
        )
    if not isinstance(salt, str) or not salt:
        raise ConfigError(f"params.yaml: 'split.salt' must be a non-empty string, got {salt!r}")
    out = pairs.assign(split=assign_splits(pairs["prompt_hash"].astype(str), salt, fractions))
    ordered = [c for c in PAIR_COLUMNS if c in out.columns] + [c for c in out.columns if c not in PAIR_COLUMNS]
    return out[ordered]


def split_frames(split_table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """One frame per split name (empty frames keep the columns), rows in input order."""
    return {
        name: split_table[split_table["split"] == name].reset_index(drop=True) for name in SPLITS
    }


class SplitTally:
    """Pairs and distinct prompts per split, counted over a split table that arrives in chunks."""

    def __init__(self) -> None:
        self.pairs: dict[str, int] = {}
        self._placed: list[pd.DataFrame] = []  # distinct (split, prompt_hash) per chunk

    def add(self, split_table: pd.DataFrame) -> None:
        for name, count in split_table["split"].value_counts().items():
            self.pairs[name] = self.pairs.get(name, 0) + int(count)
        self._placed.append(split_table[["split", "prompt_hash"]].drop_duplicates())

    def report(self, fractions: Mapping[str, float]) -> dict[str, Any]:
        """Pairs and distinct prompts per split and the fractions realised (DVC metrics)."""
        placed = pd.concat(self._placed, ignore_index=True).drop_duplicates() if self._placed else None
        n_pairs = sum(self.pairs.values())
        n_prompts = int(placed["prompt_hash"].nunique()) if placed is not None else 0
        prompts = placed["split"].value_counts() if placed is not None else pd.Series(dtype=int)
        report: dict[str, Any] = {"pairs": n_pairs, "prompts": n_prompts}
        for name in SPLITS:
            in_pairs, in_prompts = self.pairs.get(name, 0), int(prompts.get(name, 0))
            report[name] = {
                "pairs": in_pairs,
                "prompts": in_prompts,
                "pair_fraction": round(in_pairs / n_pairs, 6) if n_pairs else 0.0,
                "prompt_fraction": round(in_prompts / n_prompts, 6) if n_prompts else 0.0,
                "target_fraction": float(fractions[name]),
            }
        return report


def split_report(split_table: pd.DataFrame, fractions: Mapping[str, float]) -> dict[str, Any]:
    """SplitTally's report for a table held whole."""
    tally = SplitTally()
    tally.add(split_table)
    return tally.report(fractions)


def check_not_empty(report: Mapping[str, Any]) -> None:
    """DataError when a split with a non-zero fraction got no pairs: too few distinct prompts for the
    fractions. Raised by the split stage itself, not three stages later by validate."""
    empty = [name for name in SPLITS if report[name]["target_fraction"] > 0 and report[name]["pairs"] == 0]
    if not empty:
        return
    shown = ", ".join(f"{name}={report[name]['target_fraction']:g}" for name in SPLITS)
    smallest = min(report[name]["target_fraction"] for name in empty)
    raise DataError(
        f"split left {' and '.join(empty)} empty: {report['prompts']:,} distinct prompt(s) ({report['pairs']:,} pairs) "
        f"over split.fractions {shown}. Deliver pairs with more distinct prompts (roughly {math.ceil(3 / smallest):,}+ "
        f"for a {smallest:g} share), or set split.fractions.{empty[0]}: 0 (and move its share elsewhere)"
    )
