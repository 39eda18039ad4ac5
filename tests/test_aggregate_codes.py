"""Aggregate's coded path (int codes, bool masks, chunked sums) against straightforward pandas / library code."""

from __future__ import annotations

import krippendorff
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rmpipe.data.aggregate.run import AggregateSettings, aggregate, orient_votes
from rmpipe.data.aggregate.codes import codes_of, input_order
from rmpipe.data.aggregate.labels import nominal_alpha
from rmpipe.data.aggregate.vocab import IDENTICAL, MALFORMED, TIE, VOTE_BUCKETS
from rmpipe.core.schema import VOTE_COLUMNS, pair_id


@st.composite
def hostile_votes(draw):
    """Repeat votes, reused pair ids, missing ids, odd choices, lines out of order, groups, pair rows."""
    texts = ["yes", "no", " yes", "x" * 40]  # few pairs: several votes each, so votes disagree
    rows = []
    for _ in range(draw(st.integers(1, 50))):
        a, b = draw(st.sampled_from(texts)), draw(st.sampled_from(texts))
        rows.append({
            "batch_id": draw(st.sampled_from(["b2.csv", "b1.jsonl", "b10.parquet"])), "line": draw(st.integers(1, 6)),
            "pair_id": draw(st.sampled_from([pair_id("q", a, b)] * 3 + ["reused", None])),
            "prompt": "q", "prompt_hash": None, "response_a": a, "response_b": b,
            "annotator_id": draw(st.sampled_from(["a1", "a2", "a3", "é", None])),
            "choice": draw(st.sampled_from(["a", "b", "tie", "tie", "x", None])),
            "strength": draw(st.sampled_from([None, "slight", "strong"])),
            "margin": draw(st.sampled_from([np.nan, 0.5, -1.0])), "meta": "{}",
            "prejudged": draw(st.booleans()), "n_votes": draw(st.sampled_from([1, 1, 3])),
            "group_id": draw(st.sampled_from([None, None, "g2", "g1"])),
        })
    cfg = AggregateSettings(method="majority", tie_policy=draw(st.sampled_from(["drop", "soft"])),
                            min_votes=draw(st.integers(1, 3)), share_ceiling=1.0, agreement_floor=0.0,
                            exclude_annotators=draw(st.sampled_from([[], ["a2"]])))
    return pd.DataFrame(rows, columns=VOTE_COLUMNS), cfg


def reference(df: pd.DataFrame, cfg: AggregateSettings) -> tuple[dict, pd.DataFrame]:
    """Vote buckets and per-pair columns the plain pandas way (orientation, shared with aggregate, aside)."""
    oriented = orient_votes(df).codes
    df = df.reset_index(drop=True).assign(label=oriented.label, lf=oriented.len_first, ls=oriented.len_second)
    bucket = pd.Series("used", index=df.index, dtype=object)
    bucket[df["label"] == MALFORMED] = "malformed"
    bucket[df["label"] == IDENTICAL] = "identical_responses"
    candidates = df[bucket == "used"].sort_values(["batch_id", "line"], kind="stable")
    bucket[candidates.index[candidates.duplicated(["pair_id", "annotator_id"])]] = "duplicate_vote"
    lengths = df[bucket.isin(["used", "identical_responses"])].groupby("pair_id")[["lf", "ls"]].nunique()
    bad = lengths.index[(lengths > 1).any(axis=1)]
    bucket[(bucket == "used") & df["pair_id"].isin(bad)] = "inconsistent_pair_id"
    bucket[(bucket == "used") & df["annotator_id"].isin(cfg.exclude_annotators)] = "excluded_annotator"
    used = df[bucket == "used"]
    by_pair = used.groupby("pair_id")
    counts = pd.DataFrame({k: (used["label"] == k).groupby(used["pair_id"]).sum() for k in (0, 1, 2)})
    pairs = pd.DataFrame({"n_votes": by_pair["n_votes"].sum(), "n_first": counts[0], "n_second": counts[1],
                          "n_tie": counts[2], "all_prejudged": by_pair["prejudged"].all()})
    top = counts.max(axis=1)
    label = np.where((counts.eq(top, axis=0).sum(axis=1) > 1) | ((counts[0] == counts[1]) & (counts[0] >= counts[2])),
                     TIE, counts.to_numpy().argmax(axis=1))
    pairs["label"] = label
    eligible = pairs["all_prejudged"] | (pairs["n_votes"] >= cfg.min_votes)
    keep = eligible & ((pairs["label"] != TIE) | (cfg.tie_policy == "soft"))
    bucket[(bucket == "used") & df["pair_id"].isin(pairs.index[~eligible])] = "in_pairs_below_min_votes"
    bucket[(bucket == "used") & df["pair_id"].isin(pairs.index[eligible & ~keep])] = "in_dropped_tie_pairs"
    pairs["batch_ids"] = by_pair["batch_id"].agg(lambda b: sorted(set(b)))
    pairs["group_id"] = used.dropna(subset=["group_id"]).groupby("pair_id")["group_id"].first()
    agree = used[used["label"].to_numpy() == pairs.loc[used["pair_id"], "label"].to_numpy()]
    explicit = agree.assign(margin=agree["margin"].astype(float)).dropna(subset=["margin"]).groupby("pair_id")["margin"].mean()
    from_strength = agree.assign(m=agree["strength"].map(cfg.strength_margin).astype(float)).dropna(subset=["m"]).groupby("pair_id")["m"].mean()
    pairs["margin"] = explicit.reindex(pairs.index).fillna(from_strength).fillna(0.0).where(pairs["label"] != TIE, 0.0)
    return {name: int((bucket == name).sum()) for name in VOTE_BUCKETS}, pairs[keep].sort_index()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_votes())
def test_coded_aggregation_equals_plain_pandas_on_hostile_votes(case):
    votes, cfg = case
    try:
        result = aggregate(votes, cfg)
    except Exception as exc:  # the empty / nothing-left errors: the reference must agree there is nothing
        buckets, _ = reference(votes, cfg)
        assert buckets["used"] + buckets["excluded_annotator"] == 0 or "excluded" in str(exc), exc
        return
    buckets, pairs = reference(votes, cfg)
    assert result.report["votes"] == buckets
    out = result.pairs.set_index("pair_id")
    assert out.index.tolist() == pairs.index.tolist()
    assert out["n_votes"].tolist() == pairs["n_votes"].tolist()
    assert (out["n_chosen"] + out["n_rejected"]).tolist() == (pairs["n_first"] + pairs["n_second"]).tolist()
    assert out["n_tie"].tolist() == pairs["n_tie"].tolist()
    assert [list(b) for b in out["batch_ids"]] == pairs["batch_ids"].tolist()
    assert [None if pd.isna(g) else g for g in out["group_id"]] == [None if pd.isna(g) else g for g in pairs["group_id"]]
    np.testing.assert_allclose(out["margin"].to_numpy(), pairs["margin"].to_numpy(), rtol=1e-12)


@pytest.mark.parametrize("chunk_rows", [1, 7, 1 << 16])
def test_nominal_alpha_summed_in_chunks_is_krippendorffs_bit_for_bit(chunk_rows):
    rng = np.random.default_rng(chunk_rows)
    for _ in range(20):
        counts = rng.integers(0, 6, (int(rng.integers(2, 3000)), 3))
        counts = counts[counts.sum(axis=1) >= 2]
        assert nominal_alpha(counts, chunk_rows) == krippendorff.alpha(value_counts=counts, level_of_measurement="nominal")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["b", "a", "", "é", "z", "A", None]), max_size=30), st.integers(1, 4))
def test_codes_of_are_pandas_sorted_categorical_codes(values, n_chunks):
    """Codes into sorted distinct names, from plain strings or per-chunk dictionaries alike."""
    cuts = sorted({0, len(values), *np.linspace(0, len(values), n_chunks + 1).astype(int)})
    column = pa.chunked_array([pa.array(values[a:b], pa.string()) for a, b in zip(cuts, cuts[1:])], pa.string())
    expected = pd.Categorical(pd.Series(values, dtype=object))
    per_chunk = pa.chunked_array([c.dictionary_encode() for c in column.chunks], pa.dictionary(pa.int32(), pa.string()))
    for encoded in (column, per_chunk):
        codes, names = codes_of(encoded)
        assert names.to_pylist() == list(expected.categories)
        assert codes.tolist() == expected.codes.tolist()


def test_input_order_is_the_stable_sort_by_batch_then_line():
    rng = np.random.default_rng(0)
    batch, line = rng.integers(0, 3, 500), rng.integers(0, 20, 500)
    assert (input_order(batch, line) == np.lexsort((line, batch))).all()
    ordered = np.lexsort((line, batch))
    assert input_order(batch[ordered], line[ordered]) is None  # already in order: no permutation kept
