"""Votes -> one row per pair (crowd-kit majority vote or Dawid-Skene) + an annotator report.

The steps, each in its own module:
  aggregate_orient   votes in canonical orientation (first / second / tie), texts streamed once
  aggregate_texts    each pair's texts, spilled in buckets of pair codes, read back in pair_id order
  aggregate_labels   crowd-kit labels per pair, ties, Krippendorff's alpha, annotator stats
  aggregate_pairs    the output rows, chunk by chunk
  aggregate_report   reports/annotators.{json,md} and the "too much dropped" check
This module sorts every vote into one bucket, runs the passes and puts the pieces together.

Scale. All aggregation works on integer codes and numpy: memory grows with the number of
votes by a few dozen bytes each, never with the texts (`aggregate_file` holds one record
batch of votes or one bucket of pairs' texts at a time).

Accounting. Every input vote ends in exactly one bucket of `report["votes"]` and every
pair in one bucket of `report["pairs"]`; `decide` checks both sums.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from rmpipe import io
from rmpipe.aggregate_labels import Counter, Pass, aggregate_pass, annotator_stats, krippendorff_alpha, _pct  # noqa: F401
from rmpipe.aggregate_orient import PY_WHITESPACE, Votes, canonical_key, orient_votes, read_votes  # noqa: F401
from rmpipe.aggregate_pairs import PairColumns, pair_chunks, pair_columns
from rmpipe.aggregate_report import annotator_markdown, build_report, check_dropped  # noqa: F401
from rmpipe.aggregate_settings import (  # noqa: F401
    IDENTICAL, LABELS, MALFORMED, OUTPUT_COLUMNS, TIE, VOTE_BUCKETS, AggregateSettings,
)
from rmpipe.errors import DataError

log = logging.getLogger("rmpipe.aggregate")


@dataclass
class Aggregation:
    pairs: pd.DataFrame  # OUTPUT_COLUMNS, one row per pair, sorted by pair_id
    report: dict[str, Any]  # what reports/annotators.json holds
    annotators: pd.DataFrame = field(repr=False)  # per-annotator stats (first pass)


@dataclass
class Decision:
    """What aggregation decided, before any text is joined back: the report and the kept pairs' columns."""

    report: dict[str, Any]
    annotators: pd.DataFrame
    columns: PairColumns
    votes: Votes

    def chunks(self) -> Iterator[pd.DataFrame]:
        """The output rows (OUTPUT_COLUMNS) in pair_id order, a bucket of pairs at a time."""
        return pair_chunks(self.columns, self.votes.texts)


def aggregate(source: Votes | pd.DataFrame, settings: AggregateSettings) -> Aggregation:
    """Aggregate oriented votes (or a raw VOTE_COLUMNS table) into pairs plus the annotator report, in memory."""
    decision = decide(source if isinstance(source, Votes) else orient_votes(source), settings)
    chunks = list(decision.chunks())
    pairs = chunks[0] if len(chunks) == 1 else pd.concat(chunks, ignore_index=True)
    return Aggregation(pairs=pairs, report=decision.report, annotators=decision.annotators)


def aggregate_file(votes_path: str | Path, pairs_path: str | Path, settings: AggregateSettings,
                   counter: Counter | None = None) -> Decision:
    """votes.parquet -> pairs.parquet, streaming: texts spill beside the output and are written chunk by chunk.
    `counter`: the group-by on the pair code run by an engine (rmpipe.engine.pair_counter)."""
    pairs_path = Path(pairs_path)
    pairs_path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_spills(pairs_path.parent)
    with tempfile.TemporaryDirectory(prefix=f".aggregate-{os.getpid()}-", dir=pairs_path.parent) as spill:
        decision = decide(read_votes(votes_path, spill_dir=Path(spill)), settings, counter)
        io.write_parquet_chunks(pairs_path, decision.chunks())
    return decision


def _remove_stale_spills(folder: Path) -> None:
    """Spill folders left by a killed run (their process is gone): each may hold gigabytes."""
    for stale in folder.glob(".aggregate-*-*"):
        pid = stale.name.split("-")[1]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def _vote_codes(table: pd.DataFrame) -> pd.DataFrame:
    """The integer-coded votes every pass works on; int32 codes and int8 labels: this table is copied
    per pass (valid, used...), so its width is most of aggregate's memory per vote."""
    return pd.DataFrame(
        {
            "pair": table["pair_id"].cat.codes.to_numpy().astype(np.int32),
            "annotator": table["annotator_id"].cat.codes.to_numpy().astype(np.int32),
            "batch": table["batch_id"].cat.codes.to_numpy().astype(np.int32),
            "label": table["label"].to_numpy(),  # int8
            "chose_a": table["chose_a"].to_numpy(),
            "strength": table["strength"],
            "margin": table["margin"].to_numpy(),
            "prejudged": table["prejudged"].to_numpy(),
            "weight": table["weight"].to_numpy(),
        }
    )


def _sort_out_unusable(table: pd.DataFrame, votes: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Vote buckets (index into VOTE_BUCKETS; 0 = usable) for malformed, identical, duplicate and
    inconsistent votes; and the codes of the pairs whose pair_id names different response pairs."""
    bucket = np.zeros(len(table), np.int8)
    bucket[votes["label"] == MALFORMED] = VOTE_BUCKETS.index("malformed")
    bucket[votes["label"] == IDENTICAL] = VOTE_BUCKETS.index("identical_responses")

    # collect drops repeats already; a second vote by one annotator on one pair would also skew alpha.
    candidates = np.flatnonzero(bucket == 0)
    order = candidates[np.lexsort((table["line"].to_numpy()[candidates], votes["batch"].to_numpy()[candidates]))]
    repeat = votes.iloc[order].duplicated(["pair", "annotator"]).to_numpy()
    bucket[order[repeat]] = VOTE_BUCKETS.index("duplicate_vote")

    # A pair_id whose votes show different response pairs (an id reused by a tool) cannot be aggregated.
    # Normalized text lengths are a cheap fingerprint of "the same two responses".
    alive = (bucket == 0) | (bucket == VOTE_BUCKETS.index("identical_responses"))
    lengths = table.loc[alive, ["len_first", "len_second"]].assign(pair=votes["pair"][alive])
    spread = lengths.groupby("pair").agg(["min", "max"])
    differs = (spread.xs("min", axis=1, level=1) != spread.xs("max", axis=1, level=1)).any(axis=1)
    bad_pairs = differs.index[differs.to_numpy()].to_numpy()
    if len(bad_pairs):
        log.warning(
            "%d pair_id(s) name different response pairs in different votes; dropped, e.g. %s",
            len(bad_pairs), table["pair_id"].cat.categories[bad_pairs[:5]].tolist(),
        )
        bucket[(bucket == 0) & np.isin(votes["pair"].to_numpy(), bad_pairs)] = VOTE_BUCKETS.index("inconsistent_pair_id")
    return bucket, bad_pairs


def _exclusions(valid: pd.DataFrame, annotators: pd.DataFrame, names: pd.Index,
                settings: AggregateSettings) -> tuple[list[str], np.ndarray]:
    """The annotators left out (flagged and excluded, or named) and which `valid` votes are theirs."""
    flagged = set(annotators.loc[annotators["flagged"], "annotator_id"]) if settings.exclude_flagged else set()
    named = set(settings.exclude_annotators) & set(annotators["annotator_id"])
    excluded: list[str] = sorted(flagged | named)
    out = np.isin(valid["annotator"].to_numpy(), names.get_indexer(excluded)) if excluded else np.zeros(len(valid), bool)
    if excluded and out.all():
        raise DataError(
            f"excluding {len(excluded)} annotators (aggregate.exclude_flagged / aggregate.exclude_annotators) "
            "would leave no votes: lower aggregate.agreement_floor, raise aggregate.share_ceiling, set "
            "exclude_flagged: false, or name fewer annotators in exclude_annotators"
        )
    return excluded, out


def _pair_buckets(votes: pd.DataFrame, n_pairs: int, bad_pairs: np.ndarray, final: Pass, keep: np.ndarray,
                  is_tie: np.ndarray) -> dict[str, int]:
    """Where every pair that had a vote ended up."""
    seen = np.zeros(n_pairs, bool)
    seen[votes["pair"][votes["pair"] >= 0].to_numpy()] = True
    inconsistent = np.zeros(n_pairs, bool)
    inconsistent[bad_pairs] = True
    has_votes = final.counts.sum(axis=1) > 0
    buckets = {
        "out": int(keep.sum()),
        "no_usable_votes": int((seen & ~inconsistent & ~has_votes).sum()),
        "inconsistent_pair_id": int(inconsistent.sum()),
        "min_votes": int((has_votes & ~final.eligible).sum()),
        "tie": int((is_tie & ~keep).sum()),
    }
    if sum(buckets.values()) != seen.sum():
        raise RuntimeError(f"aggregate lost track of pairs: {buckets}")
    return buckets


def decide(src: Votes, settings: AggregateSettings, counter: Counter | None = None) -> Decision:
    """Run the passes over oriented votes: labels, exclusions, ties, min_votes; the report and kept pairs."""
    table = src.table
    n_in, n_pairs = len(table), len(table["pair_id"].cat.categories)
    if n_in == 0:
        raise DataError("the vote table is empty: nothing to aggregate (see reports/collect.json for why)")
    votes = _vote_codes(table)
    bucket, bad_pairs = _sort_out_unusable(table, votes)

    valid = votes[bucket == 0]
    first = aggregate_pass(valid, n_pairs, settings, counter)
    names = table["annotator_id"].cat.categories
    annotators = annotator_stats(valid, first, names, settings)
    excluded, out = _exclusions(valid, annotators, names, settings)
    final, used = first, valid
    if excluded:
        bucket[valid.index[out]] = VOTE_BUCKETS.index("excluded_annotator")
        used = valid[~out]
        final = aggregate_pass(used, n_pairs, settings, counter)

    is_tie = final.eligible & (final.label == TIE)
    keep = final.eligible & (~is_tie | (settings.tie_policy == "soft"))
    used_pair = used["pair"].to_numpy()
    bucket[used.index[~final.eligible[used_pair]]] = VOTE_BUCKETS.index("in_pairs_below_min_votes")
    bucket[used.index[(final.eligible & ~keep)[used_pair]]] = VOTE_BUCKETS.index("in_dropped_tie_pairs")
    columns = pair_columns(used[keep[used_pair]], final, keep, table, settings)

    vote_counts = np.bincount(bucket, minlength=len(VOTE_BUCKETS))
    if vote_counts.sum() != n_in:
        raise RuntimeError(f"aggregate lost track of votes: {vote_counts}")
    pair_buckets = _pair_buckets(votes, n_pairs, bad_pairs, final, keep, is_tie)
    report = build_report(
        settings, votes, dict(zip(VOTE_BUCKETS, map(int, vote_counts))), pair_buckets, first, final, columns.numbers,
        annotators, excluded,
    )
    log.info(
        "%d votes on %d pairs -> %d pairs (%d below min_votes, %d ties dropped, %d ties kept soft, %d annotators flagged)",
        n_in, report["n_pairs_in"], report["n_pairs_out"], report["n_dropped_min_votes"], report["n_dropped_tie"],
        report["n_tie_kept_soft"], report["n_flagged"],
    )
    return Decision(report=report, annotators=annotators, columns=columns, votes=src)
