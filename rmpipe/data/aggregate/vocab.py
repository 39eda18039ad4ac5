"""The label / bucket vocabulary every aggregate module shares (the `aggregate:` section is `rmpipe.core.settings`)."""

from __future__ import annotations

from rmpipe.core.schema import PAIR_COLUMNS
from rmpipe.core.settings import AggregateSettings  # noqa: F401 (the `aggregate:` section, parsed in rmpipe.core.settings)

LABELS = ("first", "second", "tie")
FIRST, SECOND, TIE = 0, 1, 2
MALFORMED, IDENTICAL = -1, -2  # votes that cannot be oriented

OUTPUT_COLUMNS = [c for c in PAIR_COLUMNS if c != "split"] + ["prejudged", "group_id"]  # the split stage adds `split`

# Where each input vote ends up; report["votes"] counts them and they sum to n_votes_in.
VOTE_BUCKETS = (
    "used",
    "malformed",  # unknown choice, missing pair_id / annotator_id / response
    "identical_responses",
    "duplicate_vote",  # same annotator, same pair again (first by batch_id, line is kept)
    "inconsistent_pair_id",  # the pair_id names different response pairs in different votes
    "excluded_annotator",  # aggregate.exclude_flagged / aggregate.exclude_annotators
    "in_pairs_below_min_votes",
    "in_dropped_tie_pairs",
)
