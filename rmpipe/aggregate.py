"""Votes -> one row per pair (crowd-kit majority vote or Dawid-Skene) + an annotator report.

Orientation. A pair may be shown as A/B to one annotator and B/A to another. Every
vote becomes a label in the pair's *canonical* order: "first" is the response whose
normalized text (schema.normalize_text) sorts first, the rule schema.pair_id uses.
Swapped presentations of a pair land on one label space: first / second / tie.

Ties. crowd-kit's labels are `probas_.idxmax()`, which on a shared top score picks the
first column and so would always favour the canonical-first response. We read the
probabilities instead: a pair whose top score is shared (2 vs 2, or 2 "first" vs 2
"tie") is a tie, deterministically. With either method a pair whose two responses
share the top vote count (2 vs 2, with no more "tie" votes) is a tie too: Dawid-Skene
may otherwise break it by annotator quality, and a 50/50 soft label backs a tie anyway.

Scale. 1M votes with prompts of a few KB is gigabytes of text. `read_votes` reads the
small columns whole, streams the text columns in record batches to orient each vote,
and keeps the texts of one representative vote per pair (lowest batch_id, line).
Everything after that works on integer codes and numpy.

Accounting. Every input vote ends in exactly one bucket of `report["votes"]` and every
pair in one bucket of `report["pairs"]`; `aggregate` checks both sums.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import krippendorff
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from crowdkit.aggregation import DawidSkene, MajorityVote

from rmpipe import params as P
from rmpipe.errors import ConfigError, DataError
from rmpipe.schema import CHOICES, PAIR_COLUMNS, STRENGTHS, VOTE_COLUMNS, VOTE_DEFAULTS, prompt_hash

log = logging.getLogger("rmpipe.aggregate")

LABELS = ("first", "second", "tie")
FIRST, SECOND, TIE = 0, 1, 2
MALFORMED, IDENTICAL = -1, -2  # votes that cannot be oriented

METHODS = ("majority", "dawid_skene")
TIE_POLICIES = ("drop", "soft")
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

_SMALL_COLUMNS = ["batch_id", "line", "pair_id", "annotator_id", "choice", "strength", "margin", "prejudged", "n_votes",
                  "group_id"]
_TEXT_COLUMNS = ["prompt", "prompt_hash", "response_a", "response_b"]
# Vote tables written before collect carried prompt_hash lack it: aggregate computes it then. The
# pre-judged columns take their schema.VOTE_DEFAULTS (an A/B vote, one judgement) where absent.
_OPTIONAL_COLUMNS = ("prompt_hash", *VOTE_DEFAULTS)

# Every character Python's str.isspace() accepts (what `\s` means in schema.normalize_text),
# spelled for RE2 so pyarrow can normalize millions of texts without a Python loop.
PY_WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
    "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_WS = "".join(f"\\x{{{ord(c):x}}}" for c in PY_WHITESPACE)
_WS_NOT_SPACE = "".join(f"\\x{{{ord(c):x}}}" for c in PY_WHITESPACE if c != " ")
# Rewrite only runs of 2+ whitespace and lone non-space whitespace: the same result as
# `\s+` -> " ", with far fewer matches (every space matches `\s+`), ~10x faster.
_WS_PATTERN = f"[{_WS}]{{2,}}|[{_WS_NOT_SPACE}]"


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class AggregateSettings:
    method: str = "majority"
    min_votes: int = 2
    tie_policy: str = "drop"
    strength_margin: dict[str, float] = field(
        default_factory=lambda: {"slight": 0.0, "moderate": 0.33, "strong": 0.67, "very_strong": 1.0}
    )
    agreement_floor: float = 0.6
    share_ceiling: float = 0.3
    exclude_flagged: bool = False
    max_dropped_share: float = 0.5
    exclude_annotators: tuple[str, ...] = ()  # named out, e.g. by `rmpipe retract --annotator`
    ds_n_iter: int = 20
    ds_tol: float = 1e-4

    @classmethod
    def from_params(cls, cfg: dict[str, Any]) -> AggregateSettings:
        """Read and check the `aggregate:` section of params.yaml (ConfigError naming the key)."""
        where = "aggregate"
        margins = P.get(cfg, "strength_margin", dict, where)
        missing = [s for s in STRENGTHS if s not in margins]
        if missing:
            raise ConfigError(f"params.yaml: '{where}.strength_margin' has no value for {missing}")
        ds = P.get(cfg, "dawid_skene", dict, where)
        settings = cls(
            method=P.get(cfg, "method", str, where, choices=METHODS),
            min_votes=P.get(cfg, "min_votes", int, where),
            tie_policy=P.get(cfg, "tie_policy", str, where, choices=TIE_POLICIES),
            strength_margin={s: float(P.get(margins, s, float, f"{where}.strength_margin")) for s in margins},
            agreement_floor=P.fraction(cfg, "agreement_floor", where),
            share_ceiling=P.fraction(cfg, "share_ceiling", where),
            exclude_flagged=P.get(cfg, "exclude_flagged", bool, where),
            max_dropped_share=P.fraction({"max_dropped_share": 0.5, **cfg}, "max_dropped_share", where),
            exclude_annotators=tuple(str(a) for a in cfg.get("exclude_annotators") or ()),
            ds_n_iter=P.get(ds, "n_iter", int, f"{where}.dawid_skene"),
            ds_tol=float(P.get(ds, "tol", float, f"{where}.dawid_skene")),
        )
        settings.check()
        return settings

    def check(self) -> None:
        """The checks that also apply to settings built in code rather than read from params."""
        if self.method not in METHODS:
            raise ConfigError(f"aggregate.method must be one of {list(METHODS)}, got {self.method!r}")
        if self.tie_policy not in TIE_POLICIES:
            raise ConfigError(f"aggregate.tie_policy must be one of {list(TIE_POLICIES)}, got {self.tie_policy!r}")
        if self.min_votes < 1:
            raise ConfigError(f"aggregate.min_votes must be at least 1, got {self.min_votes}")
        if isinstance(self.exclude_annotators, str):
            raise ConfigError("aggregate.exclude_annotators must be a list of annotator ids, not one string")
        if self.ds_n_iter < 1:
            raise ConfigError(f"aggregate.dawid_skene.n_iter must be at least 1, got {self.ds_n_iter}")


# --------------------------------------------------------------------------- orientation


@dataclass
class Votes:
    """Votes in canonical orientation.

    table: one compact row per input vote, in input order: pair_id / annotator_id /
      batch_id / strength as categoricals (sorted categories), line, label (FIRST,
      SECOND, TIE, or MALFORMED / IDENTICAL), chose_a (position-A pick), margin, and
      the lengths of the normalized first/second texts (to spot a reused pair_id).
    texts: one row per pair_id (arrow table): pair_id, prompt, prompt_hash, first, second,
      the raw texts of the pair's representative vote (prompt_hash null where the vote
      table did not carry it).
    """

    table: pd.DataFrame
    texts: pa.Table


def _already_normal(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """True where normalize_text keeps the text as is: printable ASCII (NFKC keeps it; no whitespace
    but the space), no double space, no space at either end. Null -> False."""
    # (RE2 finds the literal "  " ~3x faster than match_substring does)
    clean = pc.and_(pc.ascii_is_printable(texts), pc.invert(pc.match_substring_regex(texts, "  ")))
    ends = pc.or_(pc.starts_with(texts, " "), pc.ends_with(texts, " "))
    return pc.fill_null(pc.and_(clean, pc.invert(ends)), False)


def canonical_key(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """schema.normalize_text over a whole column (NFKC, whitespace runs -> one space, ends stripped).

    Most real texts are already normal: only the others go through NFKC and the regex (about half
    the time of normalizing every text)."""
    if isinstance(texts, pa.ChunkedArray):
        return pa.chunked_array([canonical_key(chunk) for chunk in texts.chunks], texts.type)
    clean = _already_normal(texts)
    if pc.all(clean).as_py() is not False:  # all clean, or empty
        return texts
    dirty = pc.invert(clean)
    return pc.replace_with_mask(texts, dirty, _normalize(pc.filter(texts, dirty)))


def _normalize(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    normalized = pc.utf8_normalize(texts, form="NFKC")
    collapsed = pc.replace_substring_regex(normalized, pattern=_WS_PATTERN, replacement=" ")
    return pc.utf8_trim(collapsed, characters=" ")


def _require_columns(columns: Iterable[str], where: str) -> None:
    missing = [c for c in VOTE_COLUMNS if c not in set(columns) and c not in _OPTIONAL_COLUMNS]
    if missing:
        raise DataError(f"{where} lacks the vote columns {missing}: is it the output of the collect stage?")


def _representative_rows(small: pd.DataFrame) -> np.ndarray:
    """Sorted row positions of each pair's lowest (batch_id, line) vote with a known choice.

    Depends on neither row order nor A/B presentation, so the output texts do not either.
    """
    candidate = small["pair_id"].notna() & small["annotator_id"].notna() & small["choice"].isin(CHOICES)
    rows = np.flatnonzero(candidate.to_numpy())
    batch = pd.Categorical(small["batch_id"].iloc[rows]).codes  # sorted categories: codes sort like names
    pair = pd.factorize(small["pair_id"].iloc[rows])[0]
    order = np.lexsort((small["line"].to_numpy()[rows], batch, pair))
    first_of_pair = np.ones(len(order), bool)
    first_of_pair[1:] = pair[order][1:] != pair[order][:-1]
    return np.sort(rows[order[first_of_pair]])


def _orient(small: pd.DataFrame, text_batches: Iterable[pa.RecordBatch]) -> Votes:
    """Label every vote in canonical order; keep the texts of each pair's representative vote."""
    n = len(small)
    reps = _representative_rows(small)
    a_first, readable, identical = np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool)
    len_a, len_b = np.zeros(n, np.int64), np.zeros(n, np.int64)
    kept: dict[str, list[pa.Array]] = {"prompt": [], "prompt_hash": [], "first": [], "second": []}
    start = 0
    for batch in text_batches:
        stop = start + batch.num_rows
        a, b = batch.column("response_a"), batch.column("response_b")
        key_a, key_b = canonical_key(a), canonical_key(b)
        first_is_a = pc.fill_null(pc.less_equal(key_a, key_b), True)
        a_first[start:stop] = first_is_a.to_numpy(zero_copy_only=False)
        readable[start:stop] = pc.and_(pc.is_valid(key_a), pc.is_valid(key_b)).to_numpy(zero_copy_only=False)
        identical[start:stop] = pc.fill_null(pc.equal(key_a, key_b), False).to_numpy(zero_copy_only=False)
        len_a[start:stop] = pc.fill_null(pc.utf8_length(key_a), 0).to_numpy(zero_copy_only=False)
        len_b[start:stop] = pc.fill_null(pc.utf8_length(key_b), 0).to_numpy(zero_copy_only=False)
        here = pa.array(reps[(reps >= start) & (reps < stop)] - start)
        if len(here):
            rows, flag = batch.take(here), first_is_a.take(here)
            a_rep, b_rep = rows.column("response_a"), rows.column("response_b")
            kept["prompt"].append(rows.column("prompt").cast(pa.string()))
            names = rows.schema.names
            given = rows.column("prompt_hash").cast(pa.string()) if "prompt_hash" in names else None
            kept["prompt_hash"].append(given if given is not None else pa.nulls(len(here), pa.string()))
            kept["first"].append(pc.if_else(flag, a_rep, b_rep).cast(pa.string()))
            kept["second"].append(pc.if_else(flag, b_rep, a_rep).cast(pa.string()))
        start = stop
    if start != n:
        raise RuntimeError(f"text columns have {start} rows, small columns {n}")

    small = _with_defaults(small)
    choice = small["choice"].to_numpy(dtype=object, na_value=None)
    label = np.select(
        [choice == "tie", choice == "a", choice == "b"],
        [TIE, np.where(a_first, FIRST, SECOND), np.where(a_first, SECOND, FIRST)],
        MALFORMED,
    ).astype(np.int8)
    label[identical & (label >= 0)] = IDENTICAL
    label[~readable | small["pair_id"].isna().to_numpy() | small["annotator_id"].isna().to_numpy()] = MALFORMED

    table = pd.DataFrame(
        {
            "pair_id": pd.Categorical(small["pair_id"]),
            "annotator_id": pd.Categorical(small["annotator_id"]),
            "batch_id": pd.Categorical(small["batch_id"]),
            "line": small["line"].to_numpy(),
            "label": label,
            "chose_a": choice == "a",
            "strength": pd.Categorical(small["strength"]),
            "margin": pd.to_numeric(small["margin"], errors="coerce").to_numpy(dtype=float, na_value=np.nan),
            "prejudged": small["prejudged"].to_numpy(dtype=bool),
            "group_id": pd.Categorical(small["group_id"]),
            "weight": small["n_votes"].to_numpy(dtype=np.int64),
            "len_first": np.where(a_first, len_a, len_b),
            "len_second": np.where(a_first, len_b, len_a),
        }
    )
    # One contiguous array per column (a take on a many-chunk column would concatenate it on every call);
    # built column by column so only one column is ever held twice.
    columns = {"pair_id": pa.array(small["pair_id"].iloc[reps].to_numpy(dtype=object), pa.string())}
    for name, chunks in kept.items():
        columns[name] = pa.concat_arrays(chunks) if chunks else pa.array([], pa.string())
        chunks.clear()
    return Votes(table=table, texts=pa.table(columns))


def _with_defaults(small: pd.DataFrame) -> pd.DataFrame:
    """prejudged / n_votes filled where a vote table lacks them (or holds nulls): an A/B vote, one judgement."""
    fills = {}
    for name in ("prejudged", "n_votes"):
        column = small[name] if name in small.columns else pd.Series(VOTE_DEFAULTS[name], index=small.index)
        fills[name] = column.fillna(VOTE_DEFAULTS[name]).astype(bool if name == "prejudged" else np.int64)
    if "group_id" not in small.columns:
        fills["group_id"] = pd.Series(None, index=small.index, dtype=object)
    return small.assign(**fills)


def orient_votes(votes: pd.DataFrame) -> Votes:
    """Orient an in-memory vote table (columns schema.VOTE_COLUMNS)."""
    _require_columns(votes.columns, "the vote table")
    votes = votes.reset_index(drop=True)
    # from_pandas for prompt_hash only: a hand-built table may leave it NaN (computed later); a NaN text stays an error
    texts = pa.table({c: pa.array(votes[c].to_numpy(dtype=object), pa.string(), from_pandas=c == "prompt_hash")
                      for c in _TEXT_COLUMNS if c in votes.columns})
    return _orient(votes[[c for c in _SMALL_COLUMNS if c in votes.columns]], texts.to_batches())


def read_votes(path: str | Path, batch_rows: int = 32_768) -> Votes:
    """Orient the collect stage's votes.parquet, streaming its text columns to bound memory."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} not found: run the collect stage first (`dvc repro collect`)")
    try:
        # pre_buffer=False: decode one column chunk at a time instead of buffering the whole file (half the RSS and CPU)
        parquet = pq.ParquetFile(path, pre_buffer=False)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path} is not a readable parquet file ({exc}): re-run the collect stage") from None
    _require_columns(parquet.schema_arrow.names, str(path))
    small = parquet.read(columns=[c for c in _SMALL_COLUMNS if c in parquet.schema_arrow.names]).to_pandas()
    text_columns = [c for c in _TEXT_COLUMNS if c in parquet.schema_arrow.names]
    if "prompt_hash" not in text_columns:
        log.warning("%s has no prompt_hash column (written by an older collect): computing it here; "
                    "re-run the collect stage to skip this", path)
    votes = _orient(small, parquet.iter_batches(batch_size=batch_rows, columns=text_columns))
    pa.default_memory_pool().release_unused()  # hand the decoded batches' memory back to the OS
    return votes


# --------------------------------------------------------------------------- aggregation


@dataclass
class _Pass:
    """One aggregation pass over a set of votes; arrays indexed by pair code."""

    counts: np.ndarray  # (n_pairs, 3): votes (rows) per label
    weighted: np.ndarray  # judgements per pair: the sum of the votes' n_votes (a pair row may stand for several)
    prejudged: np.ndarray  # every vote from an already-judged row (pair row / ranked group): min_votes does not apply
    eligible: np.ndarray  # prejudged, or weighted >= min_votes
    label: np.ndarray  # int8 aggregated label, -1 where not eligible


def _crowd_labels(votes: pd.DataFrame, settings: AggregateSettings) -> pd.Series:
    """crowd-kit's label per pair code, a shared top score read as a tie (see module doc)."""
    data = votes[["pair", "annotator", "label"]].set_axis(["task", "worker", "label"], axis=1)
    if settings.method == "majority":
        model = MajorityVote()
    else:
        model = DawidSkene(n_iter=settings.ds_n_iter, tol=settings.ds_tol)
    probas = model.fit_predict_proba(data).reindex(columns=[FIRST, SECOND, TIE], fill_value=0.0)
    if isinstance(model, DawidSkene) and len(model.loss_history_) >= settings.ds_n_iter:
        log.info("Dawid-Skene stopped at n_iter=%d before reaching tol=%g", settings.ds_n_iter, settings.ds_tol)
    scores = probas.to_numpy(dtype=float)
    shared = (scores >= scores.max(axis=1, keepdims=True) - 1e-9).sum(axis=1) > 1
    return pd.Series(np.where(shared, TIE, scores.argmax(axis=1)).astype(np.int8), index=probas.index)


def _aggregate_pass(votes: pd.DataFrame, n_pairs: int, settings: AggregateSettings) -> _Pass:
    pair = votes["pair"].to_numpy()
    counts = np.bincount(pair * 3 + votes["label"].to_numpy(), minlength=n_pairs * 3).reshape(n_pairs, 3)
    weighted = np.bincount(pair, weights=votes["weight"].to_numpy(), minlength=n_pairs).astype(np.int64)
    has_votes = counts.sum(axis=1) > 0
    # The mixed rule: one A/B vote row on a pair makes it vote-built, and min_votes counts all its judgements.
    vote_built = np.bincount(pair[~votes["prejudged"].to_numpy()], minlength=n_pairs) > 0
    prejudged = has_votes & ~vote_built
    eligible = prejudged | (has_votes & (weighted >= settings.min_votes))
    label = np.full(n_pairs, -1, np.int8)
    voted = votes[eligible[pair]]
    if len(voted):
        crowd = _crowd_labels(voted, settings)
        label[crowd.index.to_numpy()] = crowd.to_numpy()
    responses_level = (counts[:, FIRST] == counts[:, SECOND]) & (counts[:, FIRST] >= counts[:, TIE])
    label[eligible & responses_level] = TIE
    return _Pass(counts=counts, weighted=weighted, prejudged=prejudged, eligible=eligible, label=label)


def krippendorff_alpha(counts: np.ndarray) -> float | None:
    """Nominal Krippendorff's alpha from per-pair label counts (canonical orientation).

    Alpha depends on the annotator x pair reliability matrix only through how many
    annotators gave each label to each pair, so `value_counts` gives the same number
    in O(pairs) memory instead of O(annotators x pairs). None where undefined (no pair
    with 2+ votes, or a single label everywhere).
    """
    counts = counts[counts.sum(axis=1) >= 2]
    if len(counts) == 0 or (counts.sum(axis=0) > 0).sum() < 2:
        return None
    value = float(krippendorff.alpha(value_counts=counts, level_of_measurement="nominal"))
    return round(value, 4) if math.isfinite(value) else None



def _pct(value: float, threshold: float | None = None) -> str:
    """A share as a whole percent, with one decimal where whole percents would hide the threshold's side."""
    text = f"{value:.0%}"
    return f"{value:.1%}" if threshold is not None and text == f"{threshold:.0%}" else text

def _annotator_stats(votes: pd.DataFrame, first: _Pass, names: pd.Index, settings: AggregateSettings) -> pd.DataFrame:
    """Per annotator: votes, share, agreement with the aggregated label on pairs with 2+ votes, A-picks, flags."""
    annotator, pair = votes["annotator"].to_numpy(), votes["pair"].to_numpy()
    n = len(names)
    n_votes = np.bincount(annotator, minlength=n)
    compared = (first.counts.sum(axis=1)[pair] >= 2) & (first.label[pair] >= 0)
    agree = compared & (votes["label"].to_numpy() == first.label[pair])
    n_compared = np.bincount(annotator[compared], minlength=n)
    n_agree = np.bincount(annotator[agree], minlength=n)
    n_a = np.bincount(annotator[votes["chose_a"].to_numpy()], minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        stats = pd.DataFrame(
            {
                "annotator_id": np.asarray(names, dtype=object),
                "votes": n_votes,
                "share": n_votes / max(len(votes), 1),
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


def _batch_lists(votes: pd.DataFrame, pair_codes: np.ndarray, batch_names: pd.Index) -> pa.ListArray:
    """Sorted distinct batch ids per pair, one list per pair code (ascending), all pairs at once."""
    n_batches = max(len(batch_names), 1)
    combos = np.sort(votes["pair"].to_numpy() * n_batches + votes["batch"].to_numpy())
    combos = combos[np.r_[True, combos[1:] != combos[:-1]]] if len(combos) else combos
    combo_pair, combo_batch = np.divmod(combos, n_batches)  # sorted by pair, then by batch name
    starts = np.searchsorted(combo_pair, pair_codes)
    if not np.array_equal(combo_pair[np.r_[True, combo_pair[1:] != combo_pair[:-1]]] if len(combos) else combo_pair, pair_codes):
        raise RuntimeError("aggregate: batch ids requested for pairs without votes")
    offsets = np.append(starts, len(combos)).astype(np.int32)
    values = pa.array(np.asarray(batch_names, dtype=object)[combo_batch], pa.string())
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def _pair_groups(used: pd.DataFrame, group: pd.Categorical | pd.Series, n_pairs: int) -> np.ndarray:
    """Per pair code: the ranked/rated group its first grouped vote came from (pairs of one group share it:
    the same prompt and responses), None for pairs from A/B votes and pair rows only."""
    out = np.full(n_pairs, None, dtype=object)
    codes = np.asarray(group.cat.codes)[used.index.to_numpy()]
    grouped = codes >= 0
    if grouped.any():
        pair = used["pair"].to_numpy()[grouped]
        first = np.unique(pair, return_index=True)[1]  # input order: file name, then line
        out[pair[first]] = np.asarray(group.cat.categories, dtype=object)[codes[grouped][first]]
    return out


def _pair_margins(votes: pd.DataFrame, label: np.ndarray, settings: AggregateSettings) -> np.ndarray:
    """Mean margin over the votes agreeing with the aggregated label; explicit margins win; else 0.0."""
    pair = votes["pair"].to_numpy()
    agree = votes["label"].to_numpy() == label[pair]
    strength_codes = votes["strength"].cat.codes.to_numpy()
    per_category = [settings.strength_margin.get(s, np.nan) for s in votes["strength"].cat.categories]
    strength = np.append(np.asarray(per_category, dtype=float), np.nan)[strength_codes]  # code -1 -> NaN

    def sums(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        use = agree & ~np.isnan(values)
        return np.bincount(pair[use], weights=values[use], minlength=len(label)), np.bincount(pair[use], minlength=len(label))

    explicit_sum, explicit_n = sums(votes["margin"].to_numpy())
    strength_sum, strength_n = sums(strength)
    with np.errstate(invalid="ignore", divide="ignore"):
        margin = np.where(
            explicit_n > 0, explicit_sum / explicit_n, np.where(strength_n > 0, strength_sum / strength_n, 0.0)
        )
    margin[label == TIE] = 0.0  # a tie expresses no preference strength
    return margin


def _hash_prompts(prompts: pa.ChunkedArray | pa.Array, slice_rows: int = 10_000) -> pa.Array:
    """schema.prompt_hash once per distinct prompt (in slices: never all prompts as Python strings at once)."""
    if len(prompts) == 0:
        return pa.array([], pa.string())
    encoded = pc.dictionary_encode(prompts)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.unify_dictionaries().combine_chunks()
    distinct = encoded.dictionary
    hashes = [
        prompt_hash(p) for start in range(0, len(distinct), slice_rows) for p in distinct.slice(start, slice_rows).to_pylist()
    ]
    return pa.array(hashes, pa.string()).take(encoded.indices)


def _prompt_hashes(prompts: pa.Array | pa.ChunkedArray, given: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The prompt hashes collect carried; computed only where missing (an older or hand-built vote table)."""
    if isinstance(given, pa.ChunkedArray):
        given = given.combine_chunks()
    missing = pc.is_null(given)
    if not pc.any(missing).as_py():
        return given
    computed = _hash_prompts(pc.filter(prompts, missing))
    return pc.replace_with_mask(given, missing, computed)


def _pairs_table(used: pd.DataFrame, final: _Pass, keep: np.ndarray, src: Votes, settings: AggregateSettings) -> pd.DataFrame:
    """The output rows, in pair_id order (category codes are sorted names)."""
    pair_names = src.table["pair_id"].cat.categories
    codes = np.flatnonzero(keep)
    label = final.label[codes]
    counts = final.counts[codes]
    n_rows = counts.sum(axis=1)
    n_votes = final.weighted[codes]
    second_wins = label == SECOND
    n_chosen = np.where(second_wins, counts[:, 1], counts[:, 0])  # ties: canonical order
    n_rejected = np.where(second_wins, counts[:, 0], counts[:, 1])
    n_label = np.take_along_axis(counts, label[:, None].astype(np.int64), axis=1)[:, 0]
    decided = n_chosen + n_rejected
    with np.errstate(invalid="ignore", divide="ignore"):
        soft_label = np.where((label == TIE) | (decided == 0), 0.5, n_chosen / decided)
    margin = _pair_margins(used, final.label, settings)[codes]

    texts = src.texts.combine_chunks()  # no copy when already contiguous (as _orient builds it)
    text_row = np.full(len(pair_names), -1)
    text_row[pair_names.get_indexer(texts.column("pair_id").to_pandas())] = np.arange(texts.num_rows)
    rows = text_row[codes]
    prompt = texts.column("prompt").take(pa.array(rows))
    # [first..., second...]: one take per output column, cheaper than taking both and if_else-ing strings
    both = pa.concat_arrays([texts.column("first").combine_chunks(), texts.column("second").combine_chunks()])
    table = pa.table(
        {
            "pair_id": pa.array(np.asarray(pair_names[codes], dtype=object), pa.string()),
            "prompt": prompt,
            "chosen": both.take(pa.array(np.where(second_wins, rows + texts.num_rows, rows))),
            "rejected": both.take(pa.array(np.where(second_wins, rows, rows + texts.num_rows))),
            "n_votes": n_votes.astype(np.int64),
            "n_chosen": n_chosen.astype(np.int64),
            "n_rejected": n_rejected.astype(np.int64),
            "n_tie": counts[:, 2].astype(np.int64),
            "agreement": n_label / np.maximum(n_rows, 1),
            "soft_label": soft_label.astype(float),
            "margin": margin.astype(float),
            "prompt_hash": _prompt_hashes(prompt, texts.column("prompt_hash").take(pa.array(rows))),
            "batch_ids": _batch_lists(used, codes, src.table["batch_id"].cat.categories),
            "prejudged": final.prejudged[codes],
            "group_id": pa.array(_pair_groups(used, src.table["group_id"], len(pair_names))[codes], pa.string()),
        }
    )
    # batch_ids as plain object lists: an ArrowDtype column leaves pandas metadata that read_parquet cannot parse.
    return table.to_pandas()


@dataclass
class Aggregation:
    pairs: pd.DataFrame  # OUTPUT_COLUMNS, one row per pair, sorted by pair_id
    report: dict[str, Any]  # what reports/annotators.json holds
    annotators: pd.DataFrame = field(repr=False)  # per-annotator stats (first pass)


def aggregate(source: Votes | pd.DataFrame, settings: AggregateSettings) -> Aggregation:
    """Aggregate oriented votes (or a raw VOTE_COLUMNS table) into pairs plus the annotator report."""
    settings.check()
    src = source if isinstance(source, Votes) else orient_votes(source)
    table = src.table
    n_in, n_pairs = len(table), len(table["pair_id"].cat.categories)
    if n_in == 0:
        raise DataError("the vote table is empty: nothing to aggregate (see reports/collect.json for why)")

    votes = pd.DataFrame(
        {
            "pair": table["pair_id"].cat.codes.to_numpy().astype(np.int64),
            "annotator": table["annotator_id"].cat.codes.to_numpy().astype(np.int64),
            "batch": table["batch_id"].cat.codes.to_numpy().astype(np.int64),
            "label": table["label"].to_numpy().astype(np.int64),
            "chose_a": table["chose_a"].to_numpy(),
            "strength": table["strength"],
            "margin": table["margin"].to_numpy(),
            "prejudged": table["prejudged"].to_numpy(),
            "weight": table["weight"].to_numpy(),
        }
    )
    bucket = np.zeros(n_in, np.int8)  # index into VOTE_BUCKETS; 0 = used
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

    valid = votes[bucket == 0]
    first = _aggregate_pass(valid, n_pairs, settings)
    annotator_names = table["annotator_id"].cat.categories
    annotators = _annotator_stats(valid, first, annotator_names, settings)

    final, used = first, valid
    flagged = set(annotators.loc[annotators["flagged"], "annotator_id"]) if settings.exclude_flagged else set()
    named = set(settings.exclude_annotators) & set(annotators["annotator_id"])
    excluded: list[str] = sorted(flagged | named)
    if excluded:
        out = np.isin(valid["annotator"].to_numpy(), annotator_names.get_indexer(excluded))
        if out.all():
            raise DataError(
                f"excluding {len(excluded)} annotators (aggregate.exclude_flagged / aggregate.exclude_annotators) "
                "would leave no votes: lower aggregate.agreement_floor, raise aggregate.share_ceiling, set "
                "exclude_flagged: false, or name fewer annotators in exclude_annotators"
            )
        bucket[valid.index[out]] = VOTE_BUCKETS.index("excluded_annotator")
        used = valid[~out]
        final = _aggregate_pass(used, n_pairs, settings)

    is_tie = final.eligible & (final.label == TIE)
    keep = final.eligible & (~is_tie | (settings.tie_policy == "soft"))
    used_pair = used["pair"].to_numpy()
    bucket[used.index[~final.eligible[used_pair]]] = VOTE_BUCKETS.index("in_pairs_below_min_votes")
    bucket[used.index[(final.eligible & ~keep)[used_pair]]] = VOTE_BUCKETS.index("in_dropped_tie_pairs")
    used = used[keep[used_pair]]
    pairs = _pairs_table(used, final, keep, src, settings)

    # ---- accounting: every vote and every pair lands in exactly one bucket
    vote_counts = np.bincount(bucket, minlength=len(VOTE_BUCKETS))
    seen = np.zeros(n_pairs, bool)
    seen[votes["pair"][votes["pair"] >= 0].to_numpy()] = True
    inconsistent = np.zeros(n_pairs, bool)
    inconsistent[bad_pairs] = True
    has_votes = final.counts.sum(axis=1) > 0
    pair_buckets = {
        "out": int(keep.sum()),
        "no_usable_votes": int((seen & ~inconsistent & ~has_votes).sum()),
        "inconsistent_pair_id": int(inconsistent.sum()),
        "min_votes": int((has_votes & ~final.eligible).sum()),
        "tie": int((is_tie & ~keep).sum()),
    }
    if vote_counts.sum() != n_in or sum(pair_buckets.values()) != seen.sum() or len(pairs) != keep.sum():
        raise RuntimeError(f"aggregate lost track of votes or pairs: {vote_counts} {pair_buckets}")

    report = _report(
        settings, votes, dict(zip(VOTE_BUCKETS, map(int, vote_counts))), pair_buckets, first, final, pairs,
        annotators, excluded,
    )
    log.info(
        "%d votes on %d pairs -> %d pairs (%d below min_votes, %d ties dropped, %d ties kept soft, %d annotators flagged)",
        n_in, report["n_pairs_in"], len(pairs), report["n_dropped_min_votes"], report["n_dropped_tie"],
        report["n_tie_kept_soft"], report["n_flagged"],
    )
    return Aggregation(pairs=pairs, report=report, annotators=annotators)


# --------------------------------------------------------------------------- too much dropped

# Why pairs were dropped, in words, and the param a person changes to keep them.
_DROP_REASONS = {
    "min_votes": ("fewer than min_votes={min_votes} votes each",
                  "lower aggregate.min_votes or deliver more votes per pair (a pairwise dataset of already-judged "
                  "prompt/chosen/rejected rows is exempt: check those rows are not delivered as A/B vote rows)"),
    "tie": ("a tie by majority (aggregate.tie_policy=drop)", "set aggregate.tie_policy: soft to keep ties at soft label 0.5"),
    "no_usable_votes": ("no usable vote (malformed, identical responses, duplicate or excluded annotators)",
                        "see the votes buckets in reports/annotators.json"),
    "inconsistent_pair_id": ("a pair_id naming different response pairs in different votes",
                             "fix the pair_id column or leave it out so collect derives it"),
}


def check_dropped(report: dict[str, Any], settings: AggregateSettings) -> None:
    """DataError when aggregation dropped every pair, or more than `max_dropped_share` of them: the stage
    that emptied the data says so, with the reason, the count and the param, instead of a later stage."""
    n_in, n_out = report["n_pairs_in"], report["n_pairs_out"]
    dropped = n_in - n_out
    if n_in == 0 or (n_out > 0 and dropped / n_in <= settings.max_dropped_share):
        return
    causes = sorted(((report["pairs"][key], key) for key in _DROP_REASONS if report["pairs"].get(key)), reverse=True)
    reasons = "; ".join(f"{count:,} {'with ' if key != 'tie' else ''}{_DROP_REASONS[key][0].format(min_votes=settings.min_votes)}"
                        for count, key in causes)
    fix = _DROP_REASONS[causes[0][1]][1] if causes else "see reports/annotators.json"
    over = "" if n_out == 0 else f" (over aggregate.max_dropped_share={settings.max_dropped_share:g})"
    raise DataError(f"aggregate dropped {dropped:,} of {n_in:,} pairs{over}: {reasons}. To keep them: {fix}"
                    + ("" if n_out == 0 else "; or raise aggregate.max_dropped_share"))


# --------------------------------------------------------------------------- report


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), digits)


def _report(settings, votes, vote_buckets, pair_buckets, first, final, pairs, annotators, excluded) -> dict[str, Any]:
    labels = final.label[final.eligible]
    n_tie_pairs = int((labels == TIE).sum())
    choices = votes["label"] >= 0
    n_choices = max(int(choices.sum()), 1)
    n_a = int(votes["chose_a"][choices].sum())
    n_tie_votes = int((votes["label"][choices] == TIE).sum())

    def mean_of(column: str) -> float | None:
        return _round(pairs[column].mean()) if len(pairs) else None

    report: dict[str, Any] = {
        "method": settings.method,
        "tie_policy": settings.tie_policy,
        "min_votes": settings.min_votes,
        "n_votes_in": len(votes),
        "n_pairs_in": sum(pair_buckets.values()),
        "n_votes_used": vote_buckets["used"],
        "n_pairs_out": len(pairs),
        "n_pairs_prejudged": int(pairs["prejudged"].sum()) if len(pairs) else 0,
        "max_dropped_share": settings.max_dropped_share,
        "n_dropped_min_votes": pair_buckets["min_votes"],
        "n_dropped_tie": pair_buckets["tie"],
        "n_tie_pairs": n_tie_pairs,
        "n_tie_kept_soft": n_tie_pairs if settings.tie_policy == "soft" else 0,
        "votes": vote_buckets,
        "pairs": pair_buckets,
        "labels": {name: int((labels == code).sum()) for code, name in enumerate(LABELS)},
        "vote_choices": {
            "a": _round(n_a / n_choices),
            "b": _round((n_choices - n_a - n_tie_votes) / n_choices),
            "tie": _round(n_tie_votes / n_choices),
        },
        "votes_per_pair": {
            "mean": mean_of("n_votes"),
            "min": int(pairs["n_votes"].min()) if len(pairs) else None,
            "max": int(pairs["n_votes"].max()) if len(pairs) else None,
        },
        "mean_agreement": mean_of("agreement"),
        "mean_soft_label": mean_of("soft_label"),
        "mean_margin": mean_of("margin"),
        "krippendorff_alpha": krippendorff_alpha(first.counts),
        "n_annotators": len(annotators),
        "n_flagged": int(annotators["flagged"].sum()),
        "agreement_floor": settings.agreement_floor,
        "share_ceiling": settings.share_ceiling,
        "exclude_flagged": settings.exclude_flagged,
        "exclude_annotators": list(settings.exclude_annotators),
        "excluded_annotators": excluded,
        "n_votes_excluded": vote_buckets["excluded_annotator"],
    }
    if excluded:
        report["krippendorff_alpha_after_exclusion"] = krippendorff_alpha(final.counts)
    report["annotators"] = {
        row.annotator_id: {
            "votes": int(row.votes),
            "share": _round(row.share),
            "agreement": _round(row.agreement),
            "n_compared": int(row.n_compared),
            "choice_a_share": _round(row.choice_a_share),
            "flagged": bool(row.flagged),
            "reason": row.reason,
            "excluded": row.annotator_id in excluded,
        }
        for row in annotators.sort_values(["votes", "annotator_id"], ascending=[False, True]).itertuples()
    }
    return report


def _fmt(x: float | None, pattern: str = "{:.2f}") -> str:
    return "-" if x is None else pattern.format(x)


def annotator_markdown(report: dict[str, Any]) -> str:
    """reports/annotators.md: the summary, then one table row per annotator."""
    votes, pairs = report["votes"], report["pairs"]
    dropped_votes = ", ".join(f"{k} {n}" for k, n in votes.items() if k != "used" and n) or "none"
    dropped_pairs = ", ".join(f"{k} {n}" for k, n in pairs.items() if k != "out" and n) or "none"
    choices = report["vote_choices"]
    lines = [
        "# Annotator report",
        "",
        f"Method **{report['method']}**, tie policy **{report['tie_policy']}**, min_votes {report['min_votes']}.",
        "",
        f"- votes: {report['n_votes_in']} in, {votes['used']} used; not used: {dropped_votes}",
        f"- pairs: {report['n_pairs_in']} in, {pairs['out']} out; dropped: {dropped_pairs}",
        f"- ties: {report['n_tie_pairs']} (kept with soft label 0.5: {report['n_tie_kept_soft']})",
        f"- Krippendorff's alpha (nominal): {_fmt(report['krippendorff_alpha'], '{:.3f}')}",
        f"- share of votes picking position A / B / tie: "
        f"{_fmt(choices['a'])} / {_fmt(choices['b'])} / {_fmt(choices['tie'])}",
        f"- flagged: {report['n_flagged']} of {report['n_annotators']} annotators "
        f"(agreement < {report['agreement_floor']:g} or share of votes > {report['share_ceiling']:g})",
    ]
    if report["excluded_annotators"]:
        lines.append(
            f"- excluded (exclude_flagged / exclude_annotators): {', '.join(report['excluded_annotators'])}: "
            f"{report['n_votes_excluded']} votes removed; alpha without them "
            f"{_fmt(report.get('krippendorff_alpha_after_exclusion'), '{:.3f}')}"
        )
    lines += [
        "",
        "Agreement = share of an annotator's votes, on pairs with at least 2 votes, that match the aggregated label.",
        "",
        "| annotator | votes | share | agreement | compared | picks A | flagged | reason |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, a in report["annotators"].items():
        flag = "excluded" if a["excluded"] else ("yes" if a["flagged"] else "")
        lines.append(
            f"| {str(name).replace('|', chr(92) + '|')} | {a['votes']} | {_fmt(a['share'])} | {_fmt(a['agreement'])} | "
            f"{a['n_compared']} | {_fmt(a['choice_a_share'])} | {flag} | {a['reason'] or ''} |"
        )
    return "\n".join(lines) + "\n"
