"""Labels per pair from crowd-kit (majority vote or Dawid-Skene), Krippendorff's alpha, annotator stats.

Ties. crowd-kit's labels are `probas_.idxmax()`, which on a shared top score picks the
first column and so would always favour the canonical-first response. We read the
probabilities instead: a pair whose top score is shared (2 vs 2, or 2 "first" vs 2
"tie") is a tie, deterministically. With either method a pair whose two responses
share the top vote count (2 vs 2, with no more "tie" votes) is a tie too: Dawid-Skene
may otherwise break it by annotator quality, and a 50/50 soft label backs a tie anyway.

Everything here works on integer codes (pair, annotator, label) and numpy. Majority labels are read
off the label counts the group-by makes anyway (crowd-kit's MajorityVote gives the same label on every
pair, ties included: tests/test_aggregate.py checks it); crowd-kit runs Dawid-Skene, and is imported
only then (it pulls in scipy.stats and more: seconds per run).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd

from rmpipe.data.aggregate.vocab import FIRST, SECOND, TIE, AggregateSettings

log = logging.getLogger("rmpipe.aggregate")


@dataclass
class Pass:
    """One aggregation pass over a set of votes; arrays indexed by pair code."""

    counts: np.ndarray  # (n_pairs, 3): votes (rows) per label
    weighted: np.ndarray  # judgements per pair: the sum of the votes' n_votes (a pair row may stand for several)
    prejudged: np.ndarray  # every vote from an already-judged row (pair row / ranked group): min_votes does not apply
    eligible: np.ndarray  # prejudged, or weighted >= min_votes
    label: np.ndarray  # int8 aggregated label, -1 where not eligible


def _crowd_labels(votes: VoteColumns, settings: AggregateSettings) -> pd.Series:
    """crowd-kit's label per pair code, a shared top score read as a tie (see module doc)."""
    from crowdkit.aggregation import (  # here: the default (majority) path never needs it
        DawidSkene,
        MajorityVote,
    )

    data = pd.DataFrame({"task": np.asarray(votes["pair"], np.int64), "worker": np.asarray(votes["annotator"], np.int64),
                         "label": np.asarray(votes["label"], np.int64)})
    if settings.method == "majority":
        model = MajorityVote()
    else:
        model = DawidSkene(n_iter=settings.dawid_skene.n_iter, tol=settings.dawid_skene.tol)
    probas = model.fit_predict_proba(data).reindex(columns=[FIRST, SECOND, TIE], fill_value=0.0)
    if isinstance(model, DawidSkene) and len(model.loss_history_) >= settings.dawid_skene.n_iter:
        log.info("Dawid-Skene stopped at n_iter=%d before reaching tol=%g", settings.dawid_skene.n_iter, settings.dawid_skene.tol)
    scores = probas.to_numpy(dtype=float)
    shared = (scores >= scores.max(axis=1, keepdims=True) - 1e-9).sum(axis=1) > 1
    return pd.Series(np.where(shared, TIE, scores.argmax(axis=1)).astype(np.int8), index=probas.index)


def count_pairs(pair: np.ndarray, label: np.ndarray, weight: np.ndarray, prejudged: np.ndarray,
                n_pairs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The group-by on the pair code: votes per (pair, label), judgements per pair (sum of n_votes), and
    A/B vote rows per pair. Sums of partial counts over any split of the votes give the same arrays."""
    counts = np.bincount(pair.astype(np.int64) * 3 + label, minlength=n_pairs * 3)
    weighted = np.bincount(pair, weights=weight, minlength=n_pairs)
    return counts, weighted, np.bincount(pair[~prejudged], minlength=n_pairs)


def majority_labels(counts: np.ndarray) -> np.ndarray:
    """crowd-kit MajorityVote's label from a pair's label counts, a shared top read as a tie (as
    `_crowd_labels`; tests/test_aggregate.py checks the two agree)."""
    shared = (counts == counts.max(axis=1, keepdims=True)).sum(axis=1) > 1
    return np.where(shared, TIE, counts.argmax(axis=1)).astype(np.int8)


VoteColumns = Mapping[str, Any]  # column name -> one value per vote (numpy arrays, or a DataFrame's columns)
Counter = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray, np.ndarray]]


def aggregate_pass(votes: VoteColumns, n_pairs: int, settings: AggregateSettings, counter: Counter | None = None) -> Pass:
    """One pass over the votes' pair / annotator / label / weight / prejudged. `counter`: the group-by run
    elsewhere (rmpipe.data.engine), else here; majority labels come from its counts, Dawid-Skene from crowd-kit."""
    pair = votes["pair"]
    counts, weighted, vote_rows = (counter or count_pairs)(pair, votes["label"], votes["weight"], votes["prejudged"], n_pairs)
    counts, weighted = counts.reshape(n_pairs, 3), weighted.astype(np.int64)
    has_votes = counts.sum(axis=1) > 0
    # The mixed rule: one A/B vote row on a pair makes it vote-built, and min_votes counts all its judgements.
    prejudged = has_votes & ~(vote_rows > 0)
    eligible = prejudged | (has_votes & (weighted >= settings.min_votes))
    label = np.full(n_pairs, -1, np.int8)
    if settings.method == "majority":
        label[eligible] = majority_labels(counts[eligible])
    else:
        voted = {name: np.asarray(votes[name])[eligible[pair]] for name in ("pair", "annotator", "label")}
        if len(voted["pair"]):
            crowd = _crowd_labels(voted, settings)
            label[crowd.index.to_numpy()] = crowd.to_numpy()
    responses_level = (counts[:, FIRST] == counts[:, SECOND]) & (counts[:, FIRST] >= counts[:, TIE])
    label[eligible & responses_level] = TIE
    return Pass(counts=counts, weighted=weighted, prejudged=prejudged, eligible=eligible, label=label)


def krippendorff_alpha(counts: np.ndarray, chunk_rows: int = 1 << 16) -> float | None:
    """Nominal Krippendorff's alpha from per-pair label counts (canonical orientation).

    Alpha depends on the annotator x pair reliability matrix only through how many
    annotators gave each label to each pair, so `value_counts` gives the same number
    in O(pairs) memory instead of O(annotators x pairs). None where undefined (no pair
    with 2+ votes, or a single label everywhere).

    The krippendorff package's own steps, with its coincidence matrix summed `chunk_rows` pairs at a time
    (it builds three pairs x labels x labels float arrays at once: ~300 bytes a pair); numpy sums that
    axis row after row, and each chunk's sum starts from the running total, so the bits are the same.
    """
    counts = counts[counts.sum(axis=1) >= 2]
    if len(counts) == 0 or (counts.sum(axis=0) > 0).sum() < 2:
        return None
    value = nominal_alpha(counts, chunk_rows)
    return round(value, 4) if math.isfinite(value) else None


def nominal_alpha(counts: np.ndarray, chunk_rows: int) -> float:
    """krippendorff.alpha(value_counts=counts, level_of_measurement="nominal"), bit for bit, in bounded memory."""
    n_labels = counts.shape[1]
    o = np.zeros((n_labels, n_labels))
    for start in range(0, len(counts), chunk_rows):
        part = counts[start:start + chunk_rows]
        terms = np.divide(part[..., np.newaxis] * part[:, np.newaxis, :] - part[:, np.newaxis, :] * np.eye(n_labels),
                          (np.maximum(part.sum(axis=1), 2) - 1).reshape((-1, 1, 1)), dtype=float)
        o = np.concatenate([o[np.newaxis], terms]).sum(axis=0)
    n_v = o.sum(axis=0)
    e = np.divide(np.outer(n_v, n_v) - np.diagflat(n_v), n_v.sum() - 1, dtype=float)
    d = 1.0 - np.eye(n_labels)  # the nominal distance
    return float(1 - (o * d).sum() / (e * d).sum())


def _pct(value: float, threshold: float | None = None) -> str:
    """A share as a whole percent, with one decimal where whole percents would hide the threshold's side."""
    text = f"{value:.0%}"
    return f"{value:.1%}" if threshold is not None and text == f"{threshold:.0%}" else text

def annotator_stats(votes: VoteColumns, first: Pass, names: pd.Index, settings: AggregateSettings) -> pd.DataFrame:
    """Per annotator: votes, share, agreement with the aggregated label on pairs with 2+ votes, A-picks, flags."""
    annotator, pair = votes["annotator"], votes["pair"]
    n = len(names)
    n_votes = np.bincount(annotator, minlength=n)
    compared = (first.counts.sum(axis=1)[pair] >= 2) & (first.label[pair] >= 0)
    agree = compared & (votes["label"] == first.label[pair])
    n_compared = np.bincount(annotator[compared], minlength=n)
    n_agree = np.bincount(annotator[agree], minlength=n)
    n_a = np.bincount(annotator[votes["chose_a"]], minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        stats = pd.DataFrame(
            {
                "annotator_id": np.asarray(names, dtype=object),
                "votes": n_votes,
                "share": n_votes / max(len(pair), 1),
                "agreement": np.where(n_compared > 0, n_agree / n_compared, np.nan),
                "n_compared": n_compared,
                "choice_a_share": np.where(n_votes > 0, n_a / n_votes, np.nan),
            }
        )
    stats = stats[stats["votes"] > 0].reset_index(drop=True)
    low = (stats["agreement"] < settings.agreement_floor).to_numpy()  # NaN (nothing compared) is never low
    heavy = (stats["share"] > settings.share_ceiling).to_numpy()
    stats["flagged"] = low | heavy
    reasons = [  # the rule that flagged, in words: "cast 32% of all votes (ceiling 30%)"
        "; ".join(
            ([f"agreed with the majority on {_pct(agr, settings.agreement_floor)} of compared votes "
              f"(floor {_pct(settings.agreement_floor)})"] if lo else [])
            + ([f"cast {_pct(sh, settings.share_ceiling)} of all votes (ceiling {_pct(settings.share_ceiling)})"]
               if hv else [])
        )
        or None
        for agr, sh, lo, hv in zip(stats["agreement"], stats["share"], low, heavy)
    ]
    stats["reason"] = pd.Series(reasons, dtype=object)  # object: keep None (a str column would make it NaN)
    return stats
