"""Votes -> one row per pair (crowd-kit majority vote or Dawid-Skene) + an annotator report.

The steps, each in its own module:
  aggregate_orient   votes in canonical orientation (first / second / tie), texts streamed once
  aggregate_texts    each pair's texts, spilled in buckets of pair codes, read back in pair_id order
  aggregate_labels   crowd-kit labels per pair, ties, Krippendorff's alpha, annotator stats
  aggregate_pairs    the output rows, chunk by chunk
  aggregate_report   reports/annotators.{json,md} and the "too much dropped" check
  aggregate_parts    the stage's path: votes parts in, pairs parts out, text work only where parts changed
  aggregate_memo     what aggregate_parts keeps between runs (.rmpipe/memo/aggregate/)
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
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from rmpipe.core import io
from rmpipe.core.errors import DataError
from rmpipe.data.aggregate.codes import VoteCodes, pair_key, release_memory
from rmpipe.data.aggregate.labels import (  # noqa: F401
    Counter,
    Pass,
    _pct,
    aggregate_pass,
    annotator_stats,
    krippendorff_alpha,
)
from rmpipe.data.aggregate.memo import AggregateMemo
from rmpipe.data.aggregate.orient import (  # noqa: F401
    PY_WHITESPACE,
    VoteParts,
    Votes,
    canonical_key,
    orient_votes,
    read_votes,
)
from rmpipe.data.aggregate.orient import (
    _representative_rows as representative_rows,
)
from rmpipe.data.aggregate.pairs import PairColumns, pair_chunks, pair_columns
from rmpipe.data.aggregate.parts import orient_parts, part_hashes, write_pair_parts
from rmpipe.data.aggregate.report import annotator_markdown, build_report, check_dropped  # noqa: F401
from rmpipe.data.aggregate.texts import PairTexts
from rmpipe.data.aggregate.vocab import (  # noqa: F401
    IDENTICAL,
    LABELS,
    MALFORMED,
    OUTPUT_COLUMNS,
    TIE,
    VOTE_BUCKETS,
    AggregateSettings,
)

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
    texts: PairTexts  # the kept pairs' texts (the per-vote codes are not kept: freed once decided)

    def chunks(self) -> Iterator[pd.DataFrame]:
        """The output rows (OUTPUT_COLUMNS) in pair_id order, a bucket of pairs at a time."""
        return pair_chunks(self.columns, self.texts)


def aggregate(source: Votes | pd.DataFrame, settings: AggregateSettings) -> Aggregation:
    """Aggregate oriented votes (or a raw VOTE_COLUMNS table) into pairs plus the annotator report, in memory."""
    decision = decide(source if isinstance(source, Votes) else orient_votes(source), settings)
    chunks = list(decision.chunks())
    pairs = chunks[0] if len(chunks) == 1 else pd.concat(chunks, ignore_index=True)
    return Aggregation(pairs=pairs, report=decision.report, annotators=decision.annotators)


def aggregate_file(votes_path: str | Path, pairs_dir: str | Path, settings: AggregateSettings,
                   counter: Counter | None = None, memo: AggregateMemo | None = None,
                   batch_rows: int = 32_768) -> Decision:
    """The votes (a folder of parts, or one parquet file) -> the pairs folder `pairs_dir`, one part per votes
    part holding representative votes (aggregate.parts), written whole (replacing the folder). Streaming:
    texts are read a record batch at a time and spill beside the output. `counter`: the group-by on the pair
    code run by an engine (rmpipe.data.engine.pair_counter). `memo` (aggregate.memo): the text work of
    unchanged parts is not done again; the same bytes."""
    pairs_dir = Path(pairs_dir)
    pairs_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_spills(pairs_dir.parent)
    source = VoteParts(votes_path)
    codes = source.codes()
    release_memory()
    hashes = part_hashes(source, memo) if memo is not None else []
    reps = representative_rows(codes)
    with tempfile.TemporaryDirectory(prefix=f".aggregate-{os.getpid()}-", dir=pairs_dir.parent) as spill:
        texts = orient_parts(codes, source, memo, hashes, reps, Path(spill), batch_rows)
        decision = decide(Votes(codes=codes, texts=PairTexts()), settings, counter)
        release_memory()  # decide's temporaries: only per-pair columns and the per-vote codes remain
        with io.atomic_dir(pairs_dir) as out:
            write_pair_parts(decision.columns, codes, source, out, memo, hashes, reps, texts, Path(spill), batch_rows)
    if memo is not None:
        memo.moved(out, pairs_dir)
    return decision


def _remove_stale_spills(folder: Path) -> None:
    """Spill folders left by a killed run (their process is gone): each may hold gigabytes."""
    io.remove_left_behind(folder, re.compile(r"\.aggregate-(\d+)-.*"))


def _sort_out_unusable(votes: VoteCodes) -> tuple[np.ndarray, np.ndarray]:
    """Vote buckets (index into VOTE_BUCKETS; 0 = usable) for malformed, identical, duplicate and
    inconsistent votes; and the codes of the pairs whose pair_id names different response pairs."""
    bucket = np.zeros(len(votes), np.int8)
    bucket[votes.label == MALFORMED] = VOTE_BUCKETS.index("malformed")
    bucket[votes.label == IDENTICAL] = VOTE_BUCKETS.index("identical_responses")

    # collect drops repeats already; a second vote by one annotator on one pair would also skew alpha.
    # The first in (batch_id, line) order is kept: np.unique gives each key's first position.
    candidates = votes.in_order(bucket == 0)
    key = pair_key(votes.pair[candidates], votes.annotator[candidates], len(votes.annotator_names), len(votes.pair_names))
    repeat = np.ones(len(candidates), bool)
    repeat[np.unique(key, return_index=True)[1]] = False
    del key
    bucket[candidates[repeat]] = VOTE_BUCKETS.index("duplicate_vote")
    del candidates, repeat

    # A pair_id whose votes show different response pairs (an id reused by a tool) cannot be aggregated.
    # Normalized text lengths are a cheap fingerprint of "the same two responses": a pair is inconsistent
    # where any of its votes differs from the lengths one of them (the last written) put in `seen`.
    alive = (bucket == 0) | (bucket == VOTE_BUCKETS.index("identical_responses"))
    pair = votes.pair[alive]
    bad = np.zeros(len(votes.pair_names), bool)
    for lengths in (votes.len_first[alive], votes.len_second[alive]):
        seen = np.zeros(len(bad), np.int32)
        seen[pair] = lengths
        bad[pair[lengths != seen[pair]]] = True
    bad_pairs = np.flatnonzero(bad)
    if len(bad_pairs):
        log.warning(
            "%d pair_id(s) name different response pairs in different votes; dropped, e.g. %s",
            len(bad_pairs), votes.pair_names.take(pa.array(bad_pairs[:5])).to_pylist(),
        )
        bucket[(bucket == 0) & votes.of_pairs(bad, votes.pair >= 0)] = VOTE_BUCKETS.index("inconsistent_pair_id")
    return bucket, bad_pairs


def _exclusions(votes: VoteCodes, valid: np.ndarray, annotators: pd.DataFrame,
                settings: AggregateSettings) -> tuple[list[str], np.ndarray]:
    """The annotators left out (flagged and excluded, or named) and which `valid` votes are theirs (a mask)."""
    flagged = set(annotators.loc[annotators["flagged"], "annotator_id"]) if settings.exclude_flagged else set()
    named = set(settings.exclude_annotators) & set(annotators["annotator_id"])
    excluded: list[str] = sorted(flagged | named)
    out = valid & np.isin(votes.annotator, votes.annotator_names.get_indexer(excluded)) if excluded else np.zeros(len(votes), bool)
    if excluded and out.sum() == valid.sum():
        raise DataError(
            f"excluding {len(excluded)} annotators (aggregate.exclude_flagged / aggregate.exclude_annotators) "
            "would leave no votes: lower aggregate.agreement_floor, raise aggregate.share_ceiling, set "
            "exclude_flagged: false, or name fewer annotators in exclude_annotators"
        )
    return excluded, out


def _pair_buckets(votes: VoteCodes, bad_pairs: np.ndarray, final: Pass, keep: np.ndarray,
                  is_tie: np.ndarray) -> dict[str, int]:
    """Where every pair that had a vote ended up."""
    n_pairs = len(votes.pair_names)
    seen = np.zeros(n_pairs, bool)
    seen[votes.pair[votes.pair >= 0]] = True
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


PASS_COLUMNS = ("pair", "annotator", "label", "weight", "prejudged")


def decide(src: Votes, settings: AggregateSettings, counter: Counter | None = None) -> Decision:
    """Run the passes over oriented votes: labels, exclusions, ties, min_votes; the report and kept pairs.
    Votes are selected by bool masks over the one coded table (no per-pass copy of the table)."""
    votes = src.codes
    n_in, n_pairs = len(votes), len(votes.pair_names)
    if n_in == 0:
        raise DataError("the vote table is empty: nothing to aggregate (see reports/collect.json for why)")
    bucket, bad_pairs = _sort_out_unusable(votes)
    release_memory()  # here and below: the last step's temporaries, so the next step's do not stack on them

    valid = bucket == 0
    first = aggregate_pass(votes.select(valid, *PASS_COLUMNS), n_pairs, settings, counter)
    names = votes.annotator_names
    annotators = annotator_stats(votes.select(valid, "annotator", "pair", "label", "chose_a"), first, names, settings)
    excluded, out = _exclusions(votes, valid, annotators, settings)
    final, used = first, valid
    if excluded:
        bucket[out] = VOTE_BUCKETS.index("excluded_annotator")
        used = valid & ~out
        final = aggregate_pass(votes.select(used, *PASS_COLUMNS), n_pairs, settings, counter)
    del valid, out
    release_memory()

    is_tie = final.eligible & (final.label == TIE)
    keep = final.eligible & (~is_tie | (settings.tie_policy == "soft"))
    bucket[used & ~votes.of_pairs(final.eligible, used)] = VOTE_BUCKETS.index("in_pairs_below_min_votes")
    bucket[votes.of_pairs(final.eligible & ~keep, used)] = VOTE_BUCKETS.index("in_dropped_tie_pairs")
    columns = pair_columns(votes, votes.of_pairs(keep, used), final, keep, settings)

    vote_counts = np.bincount(bucket, minlength=len(VOTE_BUCKETS))
    if vote_counts.sum() != n_in:
        raise RuntimeError(f"aggregate lost track of votes: {vote_counts}")
    pair_buckets = _pair_buckets(votes, bad_pairs, final, keep, is_tie)
    report = build_report(
        settings, votes.label, votes.chose_a, dict(zip(VOTE_BUCKETS, map(int, vote_counts))), pair_buckets, first,
        final, columns.numbers, annotators, excluded,
    )
    log.info(
        "%d votes on %d pairs -> %d pairs (%d below min_votes, %d ties dropped, %d ties kept soft, %d annotators flagged)",
        n_in, report["n_pairs_in"], report["n_pairs_out"], report["n_dropped_min_votes"], report["n_dropped_tie"],
        report["n_tie_kept_soft"], report["n_flagged"],
    )
    return Decision(report=report, annotators=annotators, columns=columns, texts=src.texts)
