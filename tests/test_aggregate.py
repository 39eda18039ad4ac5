"""The aggregate stage: orientation, crowd-kit labels, ties, margins, annotator report, the stage itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import krippendorff
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rmpipe.data.aggregate.run import (
    OUTPUT_COLUMNS,
    PY_WHITESPACE,
    AggregateSettings,
    aggregate,
    annotator_markdown,
    canonical_key,
    krippendorff_alpha,
    orient_votes,
    aggregate_file,
    read_votes,
)
from rmpipe.core.errors import ConfigError
from rmpipe.core.params import load_params, section
from rmpipe.core.paths import ProjectPaths, pair_parts
from rmpipe.core.schema import VOTE_COLUMNS, canonical_prompt, normalize_text, pair_id, prompt_hash

# ----------------------------------------------------------------------------- helpers


def vote(prompt, response_a, response_b, annotator, choice, strength=None, margin=np.nan, batch="b1.jsonl"):
    """One vote row as the collect stage writes it (pair_id from the unordered responses)."""
    return {
        "batch_id": batch,
        "line": 0,
        "pair_id": pair_id(prompt, response_a, response_b),
        "prompt": canonical_prompt(prompt),
        "prompt_hash": prompt_hash(prompt),
        "response_a": response_a,
        "response_b": response_b,
        "annotator_id": annotator,
        "choice": choice,
        "strength": strength,
        "margin": margin,
        "meta": "{}",
    }


def for_response(prompt, winner, loser, annotator, shown_first=True, **kw):
    """A vote for `winner`, presented in A (shown_first) or in B."""
    if shown_first:
        return vote(prompt, winner, loser, annotator, "a", **kw)
    return vote(prompt, loser, winner, annotator, "b", **kw)


def frame(rows) -> pd.DataFrame:
    df = pd.DataFrame(rows).reindex(columns=VOTE_COLUMNS)  # pre-judged columns absent: their defaults
    df["line"] = np.arange(1, len(df) + 1)
    return df


def swap(row: dict) -> dict:
    """The same judgement with the two responses shown the other way round."""
    flipped = {"a": "b", "b": "a", "tie": "tie"}[row["choice"]]
    return {**row, "response_a": row["response_b"], "response_b": row["response_a"], "choice": flipped}


def by_pair(result, prompt, r1, r2) -> pd.Series:
    rows = result.pairs[result.pairs["pair_id"] == pair_id(prompt, r1, r2)]
    assert len(rows) == 1, f"pair {prompt!r} not in output"
    return rows.iloc[0]


def without_position(report: dict) -> dict:
    """Report fields that do not depend on which side a response was shown on."""
    out = {k: v for k, v in report.items() if k not in ("vote_choices", "annotators")}
    out["annotators"] = {a: {k: v for k, v in s.items() if k != "choice_a_share"} for a, s in report["annotators"].items()}
    return out


MAJORITY = AggregateSettings(method="majority", min_votes=2, tie_policy="drop", share_ceiling=1.0)


# ----------------------------------------------------------------------------- orientation


@st.composite
def vote_tables(draw):
    n_pairs = draw(st.integers(1, 6))
    rows = []
    for _ in range(draw(st.integers(1, 25))):
        p = draw(st.integers(0, n_pairs - 1))
        # whitespace variants of one response are the same response (schema.normalize_text)
        pad = draw(st.sampled_from(["", " ", "\n", "\u00a0", "  "]))
        r1, r2 = f"{pad}answer {p} one", f"answer {p}{pad} two{pad}"
        first_shown = draw(st.booleans())
        a, b = (r1, r2) if first_shown else (r2, r1)
        rows.append(
            vote(
                f"question {p}",
                a,
                b,
                f"ann{draw(st.integers(0, 4))}",
                draw(st.sampled_from(["a", "b", "tie"])),
                strength=draw(st.sampled_from([None, "slight", "strong", "very_strong"])),
                margin=draw(st.sampled_from([np.nan, np.nan, 0.25])),
                batch=draw(st.sampled_from(["b1.jsonl", "b2.csv"])),
            )
        )
    swapped = draw(st.lists(st.booleans(), min_size=len(rows), max_size=len(rows)))
    method = draw(st.sampled_from(["majority", "dawid_skene"]))
    policy = draw(st.sampled_from(["drop", "soft"]))
    min_votes = draw(st.integers(1, 3))
    return rows, swapped, AggregateSettings(method=method, tie_policy=policy, min_votes=min_votes)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(vote_tables())
def test_swapping_presentation_order_changes_nothing(case):
    rows, swapped, cfg = case
    original = frame(rows)
    presented = frame([swap(r) if s else r for r, s in zip(rows, swapped)])
    before, after = aggregate(original, cfg), aggregate(presented, cfg)
    pd.testing.assert_frame_equal(before.pairs, after.pairs)
    assert without_position(before.report) == without_position(after.report)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list(PY_WHITESPACE) + list("ab\ufb01\u2460Å")), max_size=12) | st.text())
def test_canonical_key_is_schema_normalize_text(text):
    assert canonical_key(pa.array([text])).to_pylist() == [normalize_text(text)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.none() | st.text(alphabet=st.sampled_from(list(" \t\nab\u00a0\ufb01\x7f")), max_size=8), max_size=8))
def test_canonical_key_on_a_column_of_normal_and_other_texts(texts):
    """Already-normal texts skip NFKC and the regex; the rest are normalized and put back in place."""
    expected = [None if t is None else normalize_text(t) for t in texts]
    assert canonical_key(pa.array(texts, pa.string())).to_pylist() == expected
    assert canonical_key(pa.chunked_array([texts[:3], texts[3:]], pa.string())).to_pylist() == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.none() | st.text(alphabet=st.sampled_from(list("  ab\n")), max_size=6), max_size=10),
       st.integers(0, 10), st.integers(0, 10), st.sampled_from([pa.string(), pa.large_string()]))
def test_canonical_key_on_a_slice_of_a_column(texts, start, length, type_):
    """The double-space scan reads the string bytes through the offsets: a slice (record batches are slices of
    a column) must see only its own texts, and "a " + " b" in adjacent texts is no double space."""
    part = pa.array(texts, type_).slice(start, length)
    expected = [None if t is None else normalize_text(t) for t in texts[start:start + length]]
    assert canonical_key(part).to_pylist() == expected


@pytest.mark.parametrize("type_", [pa.string(), pa.large_string()])
def test_canonical_key_on_every_slice_of_a_column_with_double_spaces(type_):
    texts = ["ab", "a  b", None, "c", "d  e  f", "", "g h", "x  "]
    column = pa.array(texts, type_)
    for start in range(len(texts)):
        for stop in range(start, len(texts) + 1):
            expected = [None if t is None else normalize_text(t) for t in texts[start:stop]]
            assert canonical_key(column.slice(start, stop - start)).to_pylist() == expected


def test_whitespace_list_is_what_python_calls_whitespace():
    assert set(PY_WHITESPACE) == {chr(c) for c in range(0x110000) if chr(c).isspace()}


def test_reading_parquet_in_batches_matches_in_memory(tmp_path):
    rng = np.random.default_rng(3)
    rows = [
        for_response(f"q{p}", f"good {p}", f"bad {p}", f"ann{k}", shown_first=bool(rng.integers(2)))
        for p in range(40)
        for k in range(3)
    ]
    votes = frame(rows).sample(frac=1.0, random_state=1)  # votes of a pair scattered over the file
    path = tmp_path / "votes.parquet"
    votes.to_parquet(path, index=False, row_group_size=16)
    streamed = aggregate(read_votes(path, batch_rows=7), MAJORITY)
    in_memory = aggregate(orient_votes(votes), MAJORITY)
    pd.testing.assert_frame_equal(streamed.pairs, in_memory.pairs)
    assert len(streamed.pairs) == 40 and (streamed.pairs["chosen"].str.startswith("good")).all()


def test_spilling_pair_texts_in_buckets_and_writing_in_chunks_changes_nothing(tmp_path, monkeypatch):
    """The stage's streaming path (texts spilled to disk in buckets of pair codes, a pairs part written a
    bucket at a time) gives the in-memory table and report, whatever the bucket size."""
    from rmpipe.data.aggregate import parts as aggregate_parts

    rng = np.random.default_rng(5)
    rows = [
        for_response(f"q{p % 23}", f"good {p}", f"bad {p}", f"ann{k}", shown_first=bool(rng.integers(2)),
                     batch=f"b{rng.integers(3)}.jsonl")
        for p in range(60)
        for k in range(int(rng.integers(1, 4)))
    ]
    rows.append(dict(rows[0]))  # a duplicate vote, far from its first copy
    votes = frame(rows).sample(frac=1.0, random_state=2)
    path = tmp_path / "votes.parquet"
    votes.to_parquet(path, index=False, row_group_size=10)
    in_memory = aggregate(orient_votes(votes), MAJORITY)
    written = set()
    for bucket_bytes in (1, 2_000, 10**9):  # one pair per bucket .. everything in one
        monkeypatch.setattr(aggregate_parts, "BUCKET_BYTES", bucket_bytes)
        out = tmp_path / f"pairs-{bucket_bytes}"
        decision = aggregate_file(path, out, MAJORITY, batch_rows=7)
        assert [p.name for p in out.iterdir()] == ["votes.parquet"]  # one votes part: one pairs part, its name
        pd.testing.assert_frame_equal(pd.read_parquet(out / "votes.parquet"), in_memory.pairs)
        assert decision.report == in_memory.report
        written.add((out / "votes.parquet").read_bytes())
    assert len(written) == 1  # a part's bytes depend on its rows, not on how its texts were bucketed
    assert in_memory.report["votes"]["duplicate_vote"] == 1 and len(in_memory.pairs) > 30
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".aggregate-")]  # the spill folder is gone


def test_vote_table_without_prompt_hash_gets_it_computed(tmp_path):
    """A votes.parquet from before collect carried prompt_hash, or a hand-built table missing some."""
    rows = [for_response(f"  q{p}\n\n", f"good {p}", f"bad {p}", f"ann{k}") for p in range(5) for k in range(2)]
    carried = aggregate(frame(rows), MAJORITY).pairs
    old = tmp_path / "old-votes.parquet"
    frame(rows).drop(columns="prompt_hash").to_parquet(old, index=False)
    partly = frame(rows).assign(prompt_hash=lambda f: f["prompt_hash"].where(f.index % 3 != 0, None))
    for pairs in (aggregate(read_votes(old), MAJORITY).pairs, aggregate(partly, MAJORITY).pairs):
        pd.testing.assert_frame_equal(pairs, carried)
    assert carried["prompt_hash"].tolist() == [prompt_hash(p) for p in carried["prompt"]]


# ----------------------------------------------------------------------------- labels, ties, counts


def test_majority_picks_the_response_most_annotators_preferred():
    rows = [
        for_response("q", "Paris.", "Lyon.", "ann1", shown_first=True),
        for_response("q", "Paris.", "Lyon.", "ann2", shown_first=False),
        for_response("q", "Paris.", "Lyon.", "ann3", shown_first=False),
        for_response("q", "Lyon.", "Paris.", "ann4", shown_first=True),
    ]
    pair = by_pair(aggregate(frame(rows), MAJORITY), "q", "Paris.", "Lyon.")
    assert (pair.chosen, pair.rejected) == ("Paris.", "Lyon.")
    assert (pair.n_votes, pair.n_chosen, pair.n_rejected, pair.n_tie) == (4, 3, 1, 0)


@pytest.mark.parametrize("method", ["majority", "dawid_skene"])
def test_two_two_split_is_a_tie_under_both_policies(method):
    split = [
        for_response("q", "zeta", "alpha", "ann1", shown_first=True),
        for_response("q", "zeta", "alpha", "ann2", shown_first=False),
        for_response("q", "alpha", "zeta", "ann3", shown_first=True),
        for_response("q", "alpha", "zeta", "ann4", shown_first=False),
    ]
    clear = [for_response("q2", "yes", "no", f"ann{k}", shown_first=k % 2 == 0) for k in range(1, 5)]

    dropped = aggregate(frame(split + clear), AggregateSettings(method=method, tie_policy="drop", share_ceiling=1.0))
    assert pair_id("q", "zeta", "alpha") not in set(dropped.pairs["pair_id"])
    assert dropped.report["n_dropped_tie"] == 1 and dropped.report["n_tie_pairs"] == 1
    assert dropped.report["votes"]["in_dropped_tie_pairs"] == 4
    assert dropped.report["n_pairs_out"] == 1

    soft = aggregate(frame(split + clear), AggregateSettings(method=method, tie_policy="soft", share_ceiling=1.0))
    tie = by_pair(soft, "q", "zeta", "alpha")
    assert tie.soft_label == 0.5 and tie.margin == 0.0
    assert (tie.chosen, tie.rejected) == ("alpha", "zeta")  # canonical (sorted) order, not crowd-kit's pick
    assert (tie.n_chosen, tie.n_rejected, tie.n_tie) == (2, 2, 0)
    assert soft.report["n_tie_kept_soft"] == 1 and soft.report["n_dropped_tie"] == 0


def test_response_level_with_tie_votes_is_a_tie_not_crowd_kits_first_column():
    rows = [
        for_response("q", "zeta", "alpha", "ann1"),
        for_response("q", "zeta", "alpha", "ann2", shown_first=False),
        vote("q", "zeta", "alpha", "ann3", "tie"),
        vote("q", "alpha", "zeta", "ann4", "tie"),
    ]
    result = aggregate(frame(rows), AggregateSettings(tie_policy="soft", share_ceiling=1.0))
    assert result.report["labels"] == {"first": 0, "second": 0, "tie": 1}
    pair = by_pair(result, "q", "zeta", "alpha")
    assert (pair.chosen, pair.soft_label, pair.agreement) == ("alpha", 0.5, 0.5)


def test_pairs_below_min_votes_are_dropped_and_counted():
    rows = [
        for_response("lonely", "x1", "y1", "ann1"),
        for_response("busy", "x2", "y2", "ann1"),
        for_response("busy", "x2", "y2", "ann2", shown_first=False),
    ]
    result = aggregate(frame(rows), MAJORITY)
    assert list(result.pairs["pair_id"]) == [pair_id("busy", "x2", "y2")]
    assert result.report["n_dropped_min_votes"] == 1
    assert result.report["votes"]["in_pairs_below_min_votes"] == 1
    assert result.report["pairs"] == {"out": 1, "no_usable_votes": 0, "inconsistent_pair_id": 0, "min_votes": 1, "tie": 0}
    assert len(aggregate(frame(rows), AggregateSettings(min_votes=1, share_ceiling=1.0)).pairs) == 2


def test_soft_label_agreement_and_margin_on_a_hand_computed_pair():
    rows = [
        for_response("q", "kind", "rude", "ann1", strength="strong"),  # 0.67
        for_response("q", "kind", "rude", "ann2", shown_first=False, strength="moderate"),  # 0.33
        for_response("q", "kind", "rude", "ann3"),  # no strength: not in the margin mean
        for_response("q", "rude", "kind", "ann4", strength="very_strong"),  # disagrees: not in the margin mean
        vote("q", "kind", "rude", "ann5", "tie"),
    ]
    pair = by_pair(aggregate(frame(rows), MAJORITY), "q", "kind", "rude")
    assert (pair.chosen, pair.n_votes, pair.n_chosen, pair.n_rejected, pair.n_tie) == ("kind", 5, 3, 1, 1)
    assert pair.agreement == pytest.approx(3 / 5)
    assert pair.soft_label == pytest.approx(3 / 4)
    assert pair.margin == pytest.approx((0.67 + 0.33) / 2)
    assert list(pair.batch_ids) == ["b1.jsonl"]


def test_explicit_margins_from_pair_rows_win_and_no_strength_means_zero():
    rows = [
        # pair rows (already judged): choice "a" with an explicit margin
        vote("q", "kind", "rude", "pairs", "a", margin=0.8, batch="public.parquet"),
        for_response("q", "kind", "rude", "ann1", strength="very_strong"),
        for_response("q2", "short", "long", "ann1"),
        for_response("q2", "short", "long", "ann2", shown_first=False),
    ]
    result = aggregate(frame(rows), MAJORITY)
    pair = by_pair(result, "q", "kind", "rude")
    assert pair.margin == pytest.approx(0.8)
    assert list(pair.batch_ids) == ["b1.jsonl", "public.parquet"]
    assert by_pair(result, "q2", "short", "long").margin == 0.0


def test_output_columns_types_and_prompt_hash():
    rows = [for_response("What is 2+2?", "4", "5", f"ann{k}", shown_first=k == 1) for k in range(3)]
    pairs = aggregate(frame(rows), MAJORITY).pairs
    assert list(pairs.columns) == OUTPUT_COLUMNS
    row = pairs.iloc[0]

    assert row.prompt == canonical_prompt("What is 2+2?") and row.prompt_hash == prompt_hash("What is 2+2?")
    assert pairs["n_votes"].dtype == np.int64 and pairs["soft_label"].dtype == np.float64


def test_every_vote_is_accounted_for_including_bad_rows():
    good = [for_response("q", "good", "bad", f"ann{k}", shown_first=k % 2 == 0) for k in range(3)]
    rows = good + [
        {**good[0], "choice": "maybe"},  # malformed
        vote("q3", "same", "same ", "ann1", "a"),  # identical once normalized
        {**good[1]},  # the same annotator again on the same pair
        {**vote("q", "other", "texts", "ann7", "a"), "pair_id": "reused"},
        {**vote("q", "different", "responses!", "ann8", "b"), "pair_id": "reused"},
    ]
    report = aggregate(frame(rows), MAJORITY).report
    assert report["votes"] == {
        "used": 3,
        "malformed": 1,
        "identical_responses": 1,
        "duplicate_vote": 1,
        "inconsistent_pair_id": 2,
        "excluded_annotator": 0,
        "in_pairs_below_min_votes": 0,
        "in_dropped_tie_pairs": 0,
    }
    assert sum(report["votes"].values()) == report["n_votes_in"] == len(rows)
    assert report["pairs"]["inconsistent_pair_id"] == 1 and report["pairs"]["no_usable_votes"] == 1
    assert sum(report["pairs"].values()) == report["n_pairs_in"] == 3


# ----------------------------------------------------------------------------- annotators


def good_answer(p: int) -> str:
    return f"{'aa' if p % 2 else 'zz'} good answer {p}"  # sorts before the bad answer for odd p only


def bad_answer(p: int) -> str:
    return f"mm bad answer {p}"


def _crowd_with_bad_annotators():
    """4 careful annotators, one who always picks A, one who is right every other time.

    Pairs 0-29: 3 careful votes each (truth wins either way). Pairs 30-35 ("traps"): 2 careful
    votes for the truth, and both bad annotators against it: a 2-2 tie until they are excluded.
    """
    rows = []
    for p in range(36):
        good, bad = good_answer(p), bad_answer(p)
        careful = [f"careful{(p + k) % 4}" for k in range(3 if p < 30 else 2)]
        rows += [for_response(f"q{p}", good, bad, name, shown_first=(p + k) % 2 == 0) for k, name in enumerate(careful)]
        trap = p >= 30
        rows.append(vote(f"q{p}", bad if trap or p % 2 else good, good if trap or p % 2 else bad, "always_a", "a"))
        careless_right = p % 2 == 0 and not trap
        rows.append(for_response(f"q{p}", good if careless_right else bad, bad if careless_right else good, "careless"))
    return frame(rows)


def test_exclude_flagged_drops_always_a_and_careless_and_fixes_trapped_pairs():
    votes = _crowd_with_bad_annotators()
    base = AggregateSettings(min_votes=2, tie_policy="drop", agreement_floor=0.6, share_ceiling=0.5)
    kept = aggregate(votes, base)
    flagged = {a for a, s in kept.report["annotators"].items() if s["flagged"]}
    assert flagged == {"always_a", "careless"}
    assert kept.report["annotators"]["always_a"]["choice_a_share"] == 1.0
    assert kept.report["annotators"]["careless"]["reason"].startswith("agreed with the majority on ")
    assert kept.report["annotators"]["careless"]["reason"].endswith("of compared votes (floor 60%)")
    trap_ids = {pair_id(f"q{p}", good_answer(p), bad_answer(p)) for p in range(30, 36)}
    assert not trap_ids & set(kept.pairs["pair_id"])  # 2-2 ties, dropped
    assert kept.report["excluded_annotators"] == []

    cleaned = aggregate(votes, AggregateSettings(**{**base.__dict__, "exclude_flagged": True}))
    assert sorted(cleaned.report["excluded_annotators"]) == ["always_a", "careless"]
    assert cleaned.report["n_votes_excluded"] == 72 == cleaned.report["votes"]["excluded_annotator"]
    assert trap_ids <= set(cleaned.pairs["pair_id"])
    assert cleaned.pairs["chosen"].str.contains("good answer").all() and len(cleaned.pairs) == 36
    assert cleaned.report["krippendorff_alpha_after_exclusion"] == 1.0
    assert "excluded (exclude_flagged / exclude_annotators): always_a, careless: 72 votes removed" in annotator_markdown(cleaned.report)


def test_share_ceiling_flags_a_dominant_annotator():
    rows = [for_response(f"q{p}", "good", "bad", "heavy", shown_first=p % 2 == 0) for p in range(10)]
    rows += [for_response(f"q{p}", "good", "bad", f"ann{p}", shown_first=True) for p in range(10)]
    report = aggregate(frame(rows), AggregateSettings(share_ceiling=0.3)).report
    assert report["annotators"]["heavy"]["flagged"] and report["annotators"]["heavy"]["share"] == 0.5
    assert report["annotators"]["heavy"]["reason"] == "cast 50% of all votes (ceiling 30%)"
    assert report["n_flagged"] == 1
    from rmpipe.data.aggregate.run import _pct
    assert _pct(0.304, 0.3) == "30.4%" and _pct(0.31, 0.3) == "31%"  # just over the line still reads as over


def test_dawid_skene_does_at_least_as_well_as_majority_with_an_adversary():
    rng = np.random.default_rng(7)
    truth_first = rng.integers(0, 2, 300).astype(bool)
    rows = []
    for p, first_wins in enumerate(truth_first):
        good, bad = (f"a{p}", f"b{p}") if first_wins else (f"b{p}", f"a{p}")
        for name in rng.choice([f"ok{k}" for k in range(6)], 2, replace=False):
            right = rng.random() < 0.75
            rows.append(for_response(f"q{p}", good if right else bad, bad if right else good, name, bool(rng.integers(2))))
        rows.append(for_response(f"q{p}", bad, good, "adversary", bool(rng.integers(2))))  # always wrong
    votes = frame(rows)

    def accuracy(method):
        pairs = aggregate(votes, AggregateSettings(method=method, share_ceiling=1.0)).pairs
        good = {pair_id(f"q{p}", f"a{p}", f"b{p}"): (f"a{p}" if t else f"b{p}") for p, t in enumerate(truth_first)}
        return sum(good[pid] == chosen for pid, chosen in zip(pairs["pair_id"], pairs["chosen"])) / len(good)

    majority, dawid_skene = accuracy("majority"), accuracy("dawid_skene")
    assert dawid_skene >= majority
    assert dawid_skene > 0.8  # it learns the adversary's confusion matrix and reads its votes backwards


def test_krippendorff_alpha_near_one_when_all_agree_and_near_zero_when_random():
    rows = [for_response(f"q{p}", f"x{p}", f"y{p}", f"ann{k}", shown_first=k == p % 3) for p in range(20) for k in range(3)]
    rows += [for_response(f"r{p}", f"y{p}", f"x{p}", f"ann{k}", shown_first=k == 0) for p in range(20) for k in range(3)]
    assert aggregate(frame(rows), MAJORITY).report["krippendorff_alpha"] == 1.0

    rng = np.random.default_rng(0)
    random = [
        vote(f"q{p}", f"x{p}", f"y{p}", f"ann{k}", ["a", "b"][rng.integers(2)]) for p in range(600) for k in range(3)
    ]
    assert abs(aggregate(frame(random), MAJORITY).report["krippendorff_alpha"]) < 0.05


def test_alpha_from_counts_equals_alpha_on_the_reliability_matrix():
    rng = np.random.default_rng(1)
    matrix = rng.integers(0, 3, size=(5, 30)).astype(float)  # 5 annotators x 30 pairs, labels 0/1/2
    matrix[rng.random(matrix.shape) < 0.4] = np.nan
    counts = np.stack([(matrix == v).sum(axis=0) for v in range(3)], axis=1)
    expected = krippendorff.alpha(reliability_data=matrix, level_of_measurement="nominal")
    assert krippendorff_alpha(counts) == pytest.approx(expected, abs=1e-4)


# ----------------------------------------------------------------------------- config and the stage


def test_invalid_method_or_policy_is_a_config_error(project_root):
    cfg = section(load_params(project_root / "params.yaml"), "aggregate")
    assert AggregateSettings.from_section(cfg).method in ("majority", "dawid_skene")
    with pytest.raises(ConfigError, match="aggregate.method"):
        AggregateSettings.from_section({**cfg, "method": "mean"})
    with pytest.raises(ConfigError, match="tie_policy"):
        AggregateSettings.from_section({**cfg, "tie_policy": "keep"})
    with pytest.raises(ConfigError, match="very_strong"):
        AggregateSettings.from_section({**cfg, "strength_margin": {"slight": 0.0}})
    with pytest.raises(ConfigError, match="aggregate.method"):
        aggregate(frame([vote("q", "x", "y", "a", "a")]), AggregateSettings(method="median"))


def _stage_dir(tmp_path: Path, project_root: Path, votes: pd.DataFrame | None) -> Path:
    shutil.copy(project_root / "params.yaml", tmp_path / "params.yaml")
    if votes is not None:
        (tmp_path / "data" / "collected").mkdir(parents=True)
        votes.to_parquet(tmp_path / "data" / "collected" / "votes.parquet", index=False)
    return tmp_path


def _run_stage(cwd: Path, project_root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(project_root)}
    return subprocess.run(
        [sys.executable, "-m", "stages.aggregate"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_stage_writes_pairs_and_reports(tmp_path, project_root):
    votes = _crowd_with_bad_annotators()
    cwd = _stage_dir(tmp_path, project_root, votes)
    done = _run_stage(cwd, project_root)
    assert done.returncode == 0, done.stderr
    pairs = pd.concat([pd.read_parquet(part) for part in pair_parts(ProjectPaths.at(cwd))], ignore_index=True)
    assert list(pairs.columns) == OUTPUT_COLUMNS and len(pairs) == 30  # the 6 trap pairs are ties
    text = (cwd / "reports" / "annotators.json").read_text()
    report = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in annotators.json is not JSON"))
    assert report["n_votes_in"] == len(votes) and report["n_pairs_out"] == 30
    assert report["annotators"]["careful0"]["reason"] is None
    assert "| always_a |" in (cwd / "reports" / "annotators.md").read_text()


def test_stage_without_votes_exits_with_a_readable_error(tmp_path, project_root):
    done = _run_stage(_stage_dir(tmp_path, project_root, None), project_root)
    assert done.returncode != 0
    assert "error:" in done.stderr and "collect" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("seed", range(5))
def test_majority_labels_from_counts_are_crowd_kits(seed):
    """Majority labels come from the group-by counts (local and data.engine: dask alike); crowd-kit's
    MajorityVote stays the reference: the same label on every pair, ties included."""
    from rmpipe.data.aggregate.labels import _crowd_labels, count_pairs, majority_labels

    rng = np.random.default_rng(seed)
    n_votes, n_pairs = 3000, 700
    votes = pd.DataFrame({"pair": rng.integers(0, n_pairs, n_votes), "annotator": rng.integers(0, 40, n_votes),
                          "label": rng.choice([0, 1, 2], n_votes, p=[0.45, 0.4, 0.15])})
    votes = votes.drop_duplicates(["pair", "annotator"])
    counts = count_pairs(votes["pair"].to_numpy(), votes["label"].to_numpy(), np.ones(len(votes)),
                         np.zeros(len(votes), bool), n_pairs)[0].reshape(n_pairs, 3)
    crowd = _crowd_labels(votes, MAJORITY)
    ours = majority_labels(counts[crowd.index.to_numpy()])
    assert (ours == crowd.to_numpy()).all()
    assert (ours == 2).sum() > 20  # shared tops (ties) were exercised
