"""The bundled sample data: deterministic, realistic crowd behaviour, learnable flaws, every input shape."""

from __future__ import annotations

import csv
import json
import re
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.cli import main as cli_main
from rmpipe.data.sample import batches as sd
from rmpipe.data.sample import vocab
from rmpipe.core.errors import UserError
from rmpipe.evaluation.pathology import load_battery

CFG = {"seed": 20261122, "n_pairs": 3000, "n_batches": 2, "pair_rows": 100}


@pytest.fixture(scope="module")
def votes() -> pd.DataFrame:
    return sd.generate_votes(CFG)


@pytest.fixture(scope="module")
def pairs(votes) -> pd.DataFrame:
    """One row per comparison: the good and the flawed response, the prompt, the flaw kind."""
    first = votes.drop_duplicates("true_pair")
    good_in_a = (first["true_choice"] == "a").to_numpy()
    return pd.DataFrame(
        {
            "prompt": first["prompt"].to_numpy(),
            "good": np.where(good_in_a, first["response_a"], first["response_b"]),
            "bad": np.where(good_in_a, first["response_b"], first["response_a"]),
            "flaw": first["true_flaw"].to_numpy(),
        }
    )


def _user_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(tmp_path):
    small = {**CFG, "n_pairs": 200, "pair_rows": 20}
    first = sd.write_sample_batches(tmp_path / "one", small)
    second = sd.write_sample_batches(tmp_path / "two", small)
    other = sd.write_sample_batches(tmp_path / "three", {**small, "seed": 1})
    assert [p.name for p in first] == ["batch-0001.jsonl", "batch-0002.csv", "batch-0003-pairs.parquet"]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert first[0].read_bytes() != other[0].read_bytes()


def test_files_hold_every_input_shape_and_no_ground_truth(tmp_path):
    paths = sd.write_sample_batches(tmp_path, {**CFG, "n_pairs": 400, "pair_rows": 30})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)  # nothing else there

    rows = [json.loads(line) for line in paths[0].read_text(encoding="utf-8").splitlines()]
    assert {"prompt", "response_a", "response_b", "annotator_id", "choice"} <= set(rows[0])
    assert not any(key.startswith("true_") for row in rows for key in row)
    kinds = {type(row["prompt"]) for row in rows}
    assert kinds == {str, list}  # string and chat prompts in one file
    assert any(len(row["prompt"]) > 2 for row in rows if isinstance(row["prompt"], list))  # multi-turn

    with paths[1].open(newline="", encoding="utf-8") as fh:
        records = list(csv.DictReader(fh))
    assert not any(key.startswith("true_") for key in records[0])
    assert any(r["prompt"].startswith('[{"role"') for r in records)  # chat prompt as JSON in the cell
    assert any("\n" in r["prompt"] for r in records)  # quoted multi-line cells
    assert len(rows) + len(records) == len(sd.generate_votes({**CFG, "n_pairs": 400}))

    table = pq.read_table(paths[2])
    assert table.schema.names == ["prompt", "chosen", "rejected", "annotator_id", "margin"]
    assert str(table.schema.field("prompt").type).startswith("list<")
    assert table.num_rows == 2 * 30  # two annotators per pair


def test_refuses_to_write_beside_other_batch_files(tmp_path):
    (tmp_path / "batch-0009.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match="batch-0009.jsonl"):
        sd.write_sample_batches(tmp_path, CFG)


def test_cli_writes_the_default_batches(tmp_path, project_root):
    params = yaml.safe_load((project_root / "params.yaml").read_text())
    params["sample_data"].update(n_pairs=150, pair_rows=10)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cli_main(["--params", str(tmp_path / "params.yaml"), "sample-data", "--out", str(tmp_path / "in")])
    assert len(list((tmp_path / "in").iterdir())) == params["sample_data"]["n_batches"] + 1


def test_crowd_has_the_annotators_the_aggregate_stage_must_handle(votes):
    agrees = (votes["choice"] == votes["true_choice"]).groupby(votes["annotator_id"]).mean()
    share = votes["annotator_id"].value_counts(normalize=True)
    assert len(share) == 12
    assert share[sd.DOMINANT_ANNOTATOR] > 0.3
    assert agrees[sd.DOMINANT_ANNOTATOR] > 0.9  # the dominant annotator is a good one
    assert 0.35 < agrees[sd.CARELESS_ANNOTATOR] < 0.65  # near random
    always_a = votes[votes["annotator_id"] == sd.ALWAYS_A_ANNOTATOR]
    assert len(always_a) > 100 and (always_a["choice"] == "a").all()
    good = agrees.drop([sd.CARELESS_ANNOTATOR, sd.ALWAYS_A_ANNOTATOR])
    assert good.between(0.88, 0.97).all(), good


def test_majority_vote_recovers_the_truth(votes):
    right = votes["choice"] == votes["true_choice"]
    tie = votes["choice"] == "tie"
    counts = pd.DataFrame({"right": right, "wrong": ~right & ~tie, "tie": tie}).groupby(votes["true_pair"]).sum()
    recovered = (counts["right"] > counts["wrong"]) & (counts["right"] > counts["tie"])  # strict plurality
    assert recovered.mean() >= 0.97


def test_votes_per_pair_ties_and_independent_ab_order(votes):
    per_pair = votes.groupby("true_pair").agg(n=("annotator_id", "size"), distinct=("annotator_id", "nunique"))
    assert per_pair["n"].min() >= 3 and per_pair["n"].max() <= 5
    assert (per_pair["n"] == per_pair["distinct"]).all()  # nobody judges a pair twice
    assert 0.02 <= (votes["choice"] == "tie").mean() <= 0.08
    order_mix = (votes["true_choice"] == "a").groupby(votes["true_pair"]).mean()
    assert 0.45 < (votes["true_choice"] == "a").mean() < 0.55
    assert ((order_mix > 0) & (order_mix < 1)).mean() > 0.5  # most pairs shown both ways
    assert set(votes["strength"].dropna()) == set(vocab.STRENGTHS)


def test_strength_labels_follow_how_blatant_the_flaw_is(votes):
    level = votes["strength"].map({s: i for i, s in enumerate(vocab.STRENGTHS)})
    by_flaw = level.groupby(votes["true_flaw"]).mean()
    assert by_flaw["off_topic"] > by_flaw["refusal"] > by_flaw["rude"] > by_flaw["wrong_fact"]


def test_length_is_not_the_signal(pairs):
    good_len, bad_len = pairs["good"].str.len(), pairs["bad"].str.len()
    assert 0.4 <= (good_len > bad_len).mean() <= 0.6
    assert (good_len < bad_len).mean() >= 0.25
    waffle = pairs["flaw"] == "waffle"
    assert (good_len[waffle] < bad_len[waffle]).all()  # the direct answer is the shorter one


def _asked_fact(prompt) -> vocab.Fact:
    user = _user_text(prompt)
    return next(f for f in vocab.FACTS if f.question in user)


def test_each_flaw_kind_leaves_its_trace(pairs):
    assert pairs["flaw"].value_counts(normalize=True).min() > 0.1
    assert set(pairs["flaw"]) == set(vocab.FLAW_KINDS)
    for row in pairs.itertuples():
        if row.flaw == "refusal":
            assert any(row.bad.startswith(r) for r in vocab.REFUSALS)
        elif row.flaw == "rude":
            assert any(row.bad.startswith(r) for r in vocab.RUDE_OPENERS)
        elif row.flaw == "off_topic":
            assert any(row.bad.startswith(s) for s in vocab.OFF_TOPIC_SENTENCES)
        elif row.flaw == "wrong_fact":  # the asked fact, stated rightly in one phrasing, wrongly in the other
            fact = _asked_fact(row.prompt)
            assert any(
                form.format(fact.right) in row.good
                and row.bad == row.good.replace(form.format(fact.right), form.format(fact.wrong), 1)
                for form in fact.phrasings
            ), (row.good, row.bad)
    wrong_fact = pairs[pairs["flaw"] == "wrong_fact"]
    assert len({_asked_fact(p).question for p in wrong_fact["prompt"]}) >= 35  # the whole fact table recurs
    phrasings = {form for p, good in zip(wrong_fact["prompt"], wrong_fact["good"])
                 for form in _asked_fact(p).phrasings if form.format(_asked_fact(p).right) in good}
    assert len(phrasings) >= 20  # each fact is stated in several ways, not one template


def test_flaws_come_in_many_phrasings(pairs):
    """Hundreds of refusal / rude / waffle / off-topic phrasings: the signal is general, not a few strings."""
    def first_sentence(text: str) -> str:
        return SENTENCE_END.split(text)[0]

    by_flaw = pairs.groupby("flaw")["bad"]
    assert by_flaw.get_group("refusal").map(first_sentence).nunique() >= 200
    assert by_flaw.get_group("rude").map(lambda t: " ".join(SENTENCE_END.split(t)[:2])).nunique() >= 60
    assert by_flaw.get_group("off_topic").map(first_sentence).nunique() >= 50
    waffle = {s for t in by_flaw.get_group("waffle") for s in SENTENCE_END.split(t)}
    assert len(waffle) >= 300  # hedges combined with the subject asked about
    rude = by_flaw.get_group("rude")
    assert (rude.map(lambda t: len(SENTENCE_END.split(t))) <= 3).mean() > 0.3  # curt or no answer at all, too


SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def test_the_unit_battery_is_not_in_the_sample_data(pairs, project_root):
    """The evaluation battery tests generalization: none of its prompts, responses or sentences (3+ words)
    is copied from the sample data the model trains on (shared style and short phrases are fine)."""
    battery = load_battery(project_root / "data" / "battery.jsonl")
    extra = sd.generate_pair_rows(CFG)
    texts = pd.concat([pairs["good"], pairs["bad"], pairs["prompt"].map(_user_text),
                       extra["chosen"], extra["rejected"], extra["prompt"].map(lambda p: p[-1]["content"])])
    sample_sentences = {s for t in texts for s in SENTENCE_END.split(t)}
    for item in battery:
        user = json.loads(item["prompt"])[-1]["content"]
        for text in (user, item["chosen"], item["rejected"]):
            assert text not in sample_sentences and not texts.eq(text).any(), (item["name"], text)
            copied = [s for s in SENTENCE_END.split(text) if len(s.split()) >= 3 and s in sample_sentences]
            assert not copied, (item["name"], copied)


def test_prompts_are_varied_short_and_sometimes_shared(pairs):
    users = pairs["prompt"].map(_user_text)
    keys = pairs["prompt"].map(lambda p: p if isinstance(p, str) else json.dumps(p))
    assert keys.nunique() >= 2000
    assert keys.value_counts().max() >= 2
    assert 0.15 < pairs["prompt"].map(lambda p: isinstance(p, list)).mean() < 0.25
    words = users.str.split().str.len()
    assert words.min() >= 3 and words.max() <= 40
    response_words = pd.concat([pairs["good"], pairs["bad"]]).str.split().str.len()
    assert response_words.min() >= 3 and response_words.max() <= 80


def test_long_texts_mode_scales(tmp_path):
    """Linear in the number of pairs: 10x the pairs may cost up to 30x the time (a noisy shared machine),
    not the ~100x of a quadratic step. Absolute speed is bench/data_stages.py's business, not a test's."""
    def timed(n_pairs: int) -> tuple[float, pd.DataFrame]:
        started = time.process_time()  # this process's CPU time: other jobs on the machine do not count
        votes = sd.generate_votes({**CFG, "n_pairs": n_pairs, "long_texts": True, "votes_per_pair": {4: 1.0}})
        return time.process_time() - started, votes

    small_s, small = timed(2_500)
    elapsed, votes = timed(25_000)
    assert len(small) == 10_000 and len(votes) == 100_000
    assert elapsed < 30 * max(small_s, 0.05), f"10x the pairs took {elapsed / small_s:.1f}x the time"
    first = votes.drop_duplicates("true_pair")
    prompt_chars = first["prompt"].map(lambda p: sum(len(m["content"]) for m in p) if isinstance(p, list) else len(p))
    assert prompt_chars.min() >= 300 and prompt_chars.max() <= 3500 and prompt_chars.median() > 700
    response_chars = pd.concat([first["response_a"], first["response_b"]]).str.len()
    assert response_chars.min() >= 150 and response_chars.median() > 300
    # one string object per comparison, however many votes repeat it: memory is the distinct texts
    assert votes["response_a"].map(id).nunique() <= 2 * first.shape[0]
