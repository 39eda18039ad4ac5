"""The preference shapes people already have: a small hand-written batch per shape and the exact pairs it
must become (collect -> aggregate with the default params), plus what each malformed row is quarantined as."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import orjson
import pandas as pd
import pytest
import yaml
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from rmpipe.data.collect import run as collect

from rmpipe.data.collect import formats

from rmpipe.core import schema
from rmpipe.data.aggregate.run import AggregateSettings, aggregate, check_dropped
from rmpipe.core.errors import DataError
from rmpipe.model.render import conversation

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = yaml.safe_load((ROOT / "params.yaml").read_text())


def _cfg(incoming: Path, **overrides) -> dict:
    return {**DEFAULTS["collect"], "incoming_dir": str(incoming), **overrides}


def _settings(**overrides) -> AggregateSettings:
    return AggregateSettings.from_section({**DEFAULTS["aggregate"], **overrides})


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def _msgs(*turns: str) -> list[dict]:
    """user, assistant, user, ... alternating."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def _collect(folder: Path, **overrides):
    votes, quarantine, report = collect.collect_dir(folder, _cfg(folder, **overrides))
    for entry in report["batches"]:  # the accounting holds for every shape
        assert entry["rows_read"] == entry["rows_normalized"] + entry["rows_quarantined"], entry
    return votes, quarantine, report


def _pairs(votes: pd.DataFrame, **overrides) -> dict[tuple, dict]:
    """{(prompt messages as JSON, chosen, rejected): pair row} after aggregation with default params."""
    result = aggregate(votes, _settings(**overrides))
    return {(json.dumps(schema.prompt_messages(r["prompt"])), r["chosen"], r["rejected"]): r
            for r in result.pairs.to_dict("records")}


def _key(messages: list[dict] | str, chosen: str, rejected: str) -> tuple:
    return (json.dumps(schema.prompt_messages(schema.canonical_prompt(messages))), chosen, rejected)


def _reasons(quarantine: list[dict]) -> dict[int, tuple[str, str]]:
    return {row["line"]: (row["code"], row["reason"]) for row in quarantine}


# ----------------------------------------------------------------------------- explicit prompt


def test_explicit_prompt_pairs_strings_and_conversational(tmp_path):
    _jsonl(tmp_path / "explicit.jsonl", [
        {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."},
        {"prompt": _msgs("Capital of France?"),  # TRL conversational: each response is one assistant message
         "chosen": [{"role": "assistant", "content": "Paris."}], "rejected": [{"role": "assistant", "content": "Lyon."}]},
        {"prompt": _msgs("Hi.", "Hello! How can I help?", "Name a colour."),
         "chosen": [{"role": "assistant", "content": "Blue."}], "rejected": [{"role": "assistant", "content": "Seven."}]},
        {"prompt": "\n\nHuman: What is the boiling point of water?\n\nAssistant:",  # HH prompt + its open cue
         "chosen": "100 C at sea level.", "rejected": "50 C."},
        {"prompt": "Two?", "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
         "rejected": "c"},                                                                           # line 5
        {"prompt": "\n\nHuman: one\n\nHuman: two\n\nAssistant:", "chosen": "x", "rejected": "y"},    # line 6
    ])
    votes, quarantine, report = _collect(tmp_path, max_bad_share=0.5)
    assert _reasons(quarantine) == {
        5: ("bad_conversation", "chosen holds 2 message(s) (assistant, user); with a separate prompt it must be one "
                                "assistant message"),
        6: ("bad_transcript", "prompt transcript turn 2 is Human: where Assistant: was expected (turns must alternate, "
                              "starting with Human:)"),
    }
    pairs = _pairs(votes)
    assert set(pairs) == {
        _key("What is 2+2?", "4.", "5."),
        _key(_msgs("Capital of France?"), "Paris.", "Lyon."),
        _key(_msgs("Hi.", "Hello! How can I help?", "Name a colour."), "Blue.", "Seven."),
        _key(_msgs("What is the boiling point of water?"), "100 C at sea level.", "50 C."),
    }
    # pre-judged: one judgement each, kept under the default min_votes: 2
    assert all(p["prejudged"] and p["n_votes"] == 1 for p in pairs.values())
    assert report["batches"][0]["shapes"] == {"vote_rows": 0, "pair_rows": 4, "ranked_rows": 0,
                                              "votes_from_ranked_rows": 0}


def test_a_prompt_column_beside_whole_conversations_ultrafeedback_binarized(tmp_path):
    """UltraFeedback-binarized keeps `prompt` and also the whole conversation in chosen / rejected: split the
    conversations at the turn, and check the prompt column names the same prompt (or its last turns)."""
    _jsonl(tmp_path / "uf.jsonl", [
        {"prompt": "Name a prime.", "chosen": _msgs("Name a prime.", "7."), "rejected": _msgs("Name a prime.", "8."),
         "score_chosen": 8.0, "score_rejected": 2.0},
        {"prompt": "And another?", "chosen": _msgs("Name a prime.", "7.", "And another?", "11."),
         "rejected": _msgs("Name a prime.", "7.", "And another?", "12.")},                # the last turn only
        {"prompt": "Something else?", "chosen": _msgs("Name a prime.", "7."), "rejected": _msgs("Name a prime.", "9.")},
    ])
    votes, quarantine, _ = _collect(tmp_path, max_bad_share=0.5)
    assert [(q["line"], q["code"]) for q in quarantine] == [(3, "bad_conversation")]
    assert "the prompt column is not the turns chosen and rejected share" in quarantine[0]["reason"]
    assert set(_pairs(votes)) == {_key(_msgs("Name a prime."), "7.", "8."),
                                  _key(_msgs("Name a prime.", "7.", "And another?"), "11.", "12.")}


# ----------------------------------------------------------------------------- implicit prompt / HH


HH_CHOSEN = ("\n\nHuman: I need a cake recipe.\n\nAssistant: What kind of cake?"
             "\n\nHuman: Chocolate, please.\n\nAssistant: I think the best one uses dark chocolate and butter.")
HH_REJECTED = ("\n\nHuman: I need a cake recipe.\n\nAssistant: What kind of cake?"
               "\n\nHuman: Chocolate, please.\n\nAssistant: I think the best one is from a box.")


def test_implicit_prompt_hh_transcripts_and_message_lists(tmp_path):
    shared_prefix = _msgs("Say something about cats.")
    _jsonl(tmp_path / "hh.jsonl", [
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
        # responses that open with the same words: the prompt is cut at a turn, never inside the answers
        {"chosen": shared_prefix + [{"role": "assistant", "content": "Cats are great companions."}],
         "rejected": shared_prefix + [{"role": "assistant", "content": "Cats are loud."}]},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hey\n\nAssistant: Hello."},  # 3
        {"chosen": _msgs("Q", "A", "Q2", "A2"), "rejected": _msgs("Q", "A")},                                  # 4
        {"chosen": "\n\nHuman: Q\n\nHuman: Q again\n\nAssistant: A", "rejected": "\n\nHuman: Q\n\nAssistant: B"},  # 5
        {"chosen": "just text", "rejected": "other text"},                                                      # 6
        {"chosen": _msgs("Q", "A", "Q2"), "rejected": _msgs("Q", "A", "Q3")},                                  # 7
    ])
    votes, quarantine, _ = _collect(tmp_path, max_bad_share=0.8)
    codes = {line: code for line, (code, _) in _reasons(quarantine).items()}
    assert codes == {3: "bad_conversation", 4: "bad_conversation", 5: "bad_transcript", 6: "missing_field",
                     7: "bad_conversation"}
    assert "differ before their final turn (first difference at turn 1)" in _reasons(quarantine)[3][1]
    assert "final turn of chosen is a 'user' turn" in _reasons(quarantine)[7][1]
    pairs = _pairs(votes)
    assert set(pairs) == {
        _key(_msgs("I need a cake recipe.", "What kind of cake?", "Chocolate, please."),
             "I think the best one uses dark chocolate and butter.", "I think the best one is from a box."),
        _key(shared_prefix, "Cats are great companions.", "Cats are loud."),
    }
    # the multi-turn prompt reaches the chat template as turns
    turns = schema.prompt_messages(votes.iloc[0]["prompt"])
    assert [t["role"] for t in turns] == ["user", "assistant", "user"]


def test_hh_transcript_in_a_vote_row_prompt_is_parsed_too(tmp_path):
    _jsonl(tmp_path / "votes.jsonl", [
        {"prompt": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant:", "response_a": "Knock knock.",
         "response_b": "No.", "annotator_id": "a1", "choice": "a"},
    ])
    votes, quarantine, _ = _collect(tmp_path)
    assert quarantine == []
    assert schema.prompt_messages(votes.iloc[0]["prompt"]) == _msgs("Hi", "Hello!", "Joke?")
    assert not votes.iloc[0]["prejudged"]


_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=30).filter(
    lambda t: t.strip() == t and t and "Human:" not in t and "Assistant:" not in t)


@seed(20261201)
@settings(max_examples=150, deadline=None)
@given(prefix=st.lists(_TEXT, min_size=0, max_size=3).map(lambda xs: xs * 2), first=_TEXT,
       answers=st.tuples(_TEXT, _TEXT).filter(lambda ab: schema.normalize_text(ab[0]) != schema.normalize_text(ab[1])),
       as_transcript=st.booleans())
def test_splitting_an_implicit_pair_and_rendering_it_again_gives_back_the_conversation(prefix, first, answers,
                                                                                        as_transcript):
    turns = _msgs(first, *prefix)  # user first, alternating; ends with a user turn (even prefix length)
    chosen = turns + [{"role": "assistant", "content": answers[0]}]
    rejected = turns + [{"role": "assistant", "content": answers[1]}]
    if as_transcript:
        def hh(messages):
            return "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages)
        row = formats.pair_row({"chosen": hh(chosen), "rejected": hh(rejected)})
    else:
        row = formats.pair_row({"chosen": chosen, "rejected": rejected})
    prompt = schema.canonical_prompt(row["prompt"])
    assert conversation(prompt, row["chosen"]) == chosen
    assert conversation(prompt, row["rejected"]) == rejected


# ----------------------------------------------------------------------------- scores beside a pair


def test_scores_are_kept_and_become_the_margin_only_when_asked(tmp_path):
    rows = [
        {"prompt": "Rate A", "chosen": "good", "rejected": "bad", "score_chosen": 9.0, "score_rejected": 6.5},
        {"prompt": "Rate B", "chosen": "fine", "rejected": "poor", "score_chosen": 7, "score_rejected": 7},
        {"prompt": "Rate C", "chosen": "ok", "rejected": "meh", "score_chosen": 3, "score_rejected": 8},   # line 3
    ]
    _jsonl(tmp_path / "rated.jsonl", rows)
    votes, quarantine, _ = _collect(tmp_path)
    assert quarantine == []  # without the switch the scores are just kept
    assert [json.loads(m) for m in votes["meta"]] == [{"score_chosen": 9.0, "score_rejected": 6.5},
                                                       {"score_chosen": 7, "score_rejected": 7},
                                                       {"score_chosen": 3, "score_rejected": 8}]
    assert {k[0:2]: p["margin"] for k, p in _pairs(votes).items()} == {
        (_key("Rate A", "", "")[0], "good"): 0.0, (_key("Rate B", "", "")[0], "fine"): 0.0,
        (_key("Rate C", "", "")[0], "ok"): 0.0}

    votes, quarantine, _ = _collect(tmp_path, margin_from_scores=True, max_bad_share=0.5)
    assert _reasons(quarantine) == {3: ("bad_score", "score_chosen 3 is below score_rejected 8: the scores contradict "
                                                     "the label")}
    margins = {k[1]: p["margin"] for k, p in _pairs(votes).items()}
    assert margins == {"good": 2.5, "fine": 0.0}


# ----------------------------------------------------------------------------- ranked and rated groups


RESPONSES = ["best", "second", "third", "fourth", "worst"]


def test_a_ranking_of_five_becomes_its_ten_comparisons(tmp_path):
    # responses listed in a shuffled order; the ranking (best first) names them by index
    shown = ["third", "best", "worst", "second", "fourth"]
    ranking = [shown.index(r) for r in RESPONSES]  # [1, 3, 0, 4, 2]
    _jsonl(tmp_path / "ranked.jsonl", [{"prompt": "Rank these.", "responses": shown, "ranking": ranking,
                                        "annotator_id": "r1", "source": "tool"}])
    votes, quarantine, report = _collect(tmp_path)
    assert quarantine == [] and len(votes) == 10 and set(votes["line"]) == {1}
    assert votes["group_id"].nunique() == 1 and votes["group_id"].iloc[0].startswith("g-")
    assert votes["prejudged"].all()
    entry = report["batches"][0]
    assert (entry["rows_read"], entry["rows_normalized"], entry["votes"]) == (1, 1, 10)
    assert entry["shapes"] == {"vote_rows": 0, "pair_rows": 0, "ranked_rows": 1, "votes_from_ranked_rows": 10}
    assert json.loads(votes["meta"].iloc[0])["source"] == "tool"
    pairs = _pairs(votes)
    expected = {_key("Rank these.", RESPONSES[i], RESPONSES[j]) for i in range(5) for j in range(i + 1, 5)}
    assert set(pairs) == expected
    assert {p["group_id"] for p in pairs.values()} == {votes["group_id"].iloc[0]}  # the pairs know their group


def test_scores_with_ties_and_two_annotators(tmp_path):
    responses = ["alpha", "beta", "gamma"]
    _jsonl(tmp_path / "rated.jsonl", [
        {"prompt": "Rate.", "responses": responses, "scores": [5, 5, 1], "annotator_id": "u1"},
        {"prompt": "Rate.", "responses": responses, "scores": [4, 3, 3.0], "annotator_id": "u2"},
    ])
    votes, quarantine, _ = _collect(tmp_path)
    assert quarantine == []
    by = {(r.annotator_id, r.response_a, r.response_b): r.choice for r in votes.itertuples()}
    assert by == {("u1", "alpha", "beta"): "tie", ("u1", "alpha", "gamma"): "a", ("u1", "beta", "gamma"): "a",
                  ("u2", "alpha", "beta"): "a", ("u2", "alpha", "gamma"): "a", ("u2", "beta", "gamma"): "tie"}
    assert votes["group_id"].nunique() == 1  # two annotators' judgements of one group share its id
    # alpha>gamma twice; alpha~beta and beta~gamma are 1 tie + 1 win each: a 1-1 split is a tie (dropped)
    pairs = _pairs(votes)
    assert set(pairs) == {_key("Rate.", "alpha", "gamma")}
    assert pairs[_key("Rate.", "alpha", "gamma")]["n_votes"] == 2
    soft = _pairs(votes, tie_policy="soft")
    assert len(soft) == 3 and {p["soft_label"] for p in soft.values()} == {1.0, 0.5}


def test_malformed_groups_are_quarantined_with_a_reason(tmp_path):
    _jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "P", "responses": ["a", "b", "c"], "ranking": [0, 0, 2]},
        {"prompt": "P", "responses": ["a", "b", "c"], "ranking": [1, 2, 3]},   # 1-based
        {"prompt": "P", "responses": ["a", "b", "c"], "scores": [1, 2]},
        {"prompt": "P", "responses": ["a", "b", "a "], "scores": [1, 2, 3]},
        {"prompt": "P", "responses": ["a"], "ranking": [0]},
        {"prompt": "P", "responses": ["a", "b"], "ranking": [0, 1], "scores": [1, 0]},
        {"prompt": "P", "responses": ["a", "b"]},
        {"prompt": "P", "responses": ["a", "b"], "scores": [1, True]},
        {"prompt": "P", "responses": ["a", ""], "scores": [1, 0]},
        {"prompt": "P", "responses": ["a", "b"], "ranking": [1, 0], "choice": "a"},
        {"prompt": "P", "responses": ["x", "y"], "ranking": [1, 0]},   # the one good row
    ])
    votes, quarantine, report = _collect(tmp_path, max_bad_share=1.0)
    got = _reasons(quarantine)
    assert {line: code for line, (code, _) in got.items()} == {
        1: "bad_group", 2: "bad_group", 3: "bad_group", 4: "bad_group", 5: "bad_group", 6: "bad_group",
        7: "missing_field", 8: "bad_group", 9: "empty_text", 10: "mixed_shape"}
    assert got[1][1] == "ranking [0, 0, 2] is not a permutation of the response indices 0..2 (best first)"
    assert got[4][1] == "responses[0] and responses[2] are the same text"
    assert got[5][1] == "a group needs at least 2 responses, got 1"
    assert len(votes) == 1 and votes.iloc[0]["choice"] == "b"
    assert report["batches"][0]["rows_normalized"] == 1 and report["batches"][0]["rows_quarantined"] == 10


def test_a_repeated_group_is_quarantined_whole(tmp_path):
    group = {"prompt": "P", "responses": ["a", "b", "c"], "ranking": [2, 1, 0], "annotator_id": "u1"}
    _jsonl(tmp_path / "g.jsonl", [group, {**group, "responses": ["c", "d", "a"]}])  # repeats u1's a-vs-c
    votes, quarantine, _ = _collect(tmp_path, max_bad_share=0.5)
    assert len(votes) == 3 and [q["code"] for q in quarantine] == ["duplicate_vote"]
    assert "this whole group is not" in quarantine[0]["reason"]


# ----------------------------------------------------------------------------- pre-judged vs vote-built


def test_prejudged_pairs_carry_their_own_count_and_the_mixed_rule(tmp_path):
    _jsonl(tmp_path / "mixed.jsonl", [
        {"prompt": "Vendor", "chosen": "yes", "rejected": "no", "n_votes": 5},          # pre-judged, 5 judgements
        {"prompt": "Single", "chosen": "up", "rejected": "down"},                        # pre-judged, 1
        {"prompt": "Lonely", "response_a": "l1", "response_b": "l2", "annotator_id": "a", "choice": "a"},  # 1 A/B vote
        # both shapes on one pair: vote-built, min_votes counts the pair row's judgement too
        {"prompt": "Both", "chosen": "b1", "rejected": "b2"},
        {"prompt": "Both", "response_a": "b2", "response_b": "b1", "annotator_id": "a", "choice": "b"},
        {"prompt": "Bad", "chosen": "x", "rejected": "y", "n_votes": 0},                 # line 6
    ])
    votes, quarantine, _ = _collect(tmp_path, max_bad_share=0.5)
    assert _reasons(quarantine) == {6: ("bad_n_votes", "n_votes 0 is not a whole number >= 1")}
    assert votes["prejudged"].tolist() == [True, True, False, True, False]
    assert votes["n_votes"].tolist() == [5, 1, 1, 1, 1]
    result = aggregate(votes, _settings())
    assert result.pairs["group_id"].isna().all()  # no ranked group here
    got = {r["chosen"]: (r["n_votes"], r["prejudged"]) for r in result.pairs.to_dict("records")}
    assert got == {"yes": (5, True), "up": (1, True), "b1": (2, False)}  # "Lonely" is below min_votes
    assert result.report["pairs"]["min_votes"] == 1 and result.report["n_pairs_prejudged"] == 2
    # a vote-built pair needs min_votes judgements, however many a pair row beside it claims
    strict = aggregate(votes, _settings(min_votes=3))
    assert {r["chosen"] for r in strict.pairs.to_dict("records")} == {"yes", "up"}


# ----------------------------------------------------------------------------- a stage that empties the data


def _stage(module: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT), "PATH": str(Path(sys.executable).parent)}
    return subprocess.run([sys.executable, "-m", module], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_aggregate_that_drops_every_pair_fails_there_naming_reason_count_and_param(tmp_path):
    rows = [{"prompt": f"Q{i}", "response_a": f"a{i}", "response_b": f"b{i}", "annotator_id": "ann", "choice": "a"}
            for i in range(2304)]
    _jsonl(tmp_path / "data" / "incoming" / "pairs-as-votes.jsonl", rows)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(DEFAULTS))
    assert _stage("stages.collect", tmp_path).returncode == 0
    run = _stage("stages.aggregate", tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith("error: aggregate dropped 2,304 of 2,304 pairs: 2,304 with fewer than min_votes=2 votes "
                           "each. To keep them: lower aggregate.min_votes"), line
    assert (tmp_path / "reports" / "annotators.json").exists()  # the report is there to read


def test_aggregate_over_the_dropped_share_and_ties(tmp_path):
    votes = pd.DataFrame([
        {"prompt": "T", "response_a": "x", "response_b": "y", "annotator_id": a, "choice": c}
        for a, c in (("1", "a"), ("2", "b"))] + [
        {"prompt": "K", "response_a": "k1", "response_b": "k2", "annotator_id": a, "choice": "a"} for a in "12"])
    _jsonl(tmp_path / "v.jsonl", votes.to_dict("records"))
    collected, _, _ = _collect(tmp_path)
    result = aggregate(collected, _settings(max_dropped_share=0.4))
    with pytest.raises(DataError) as info:
        check_dropped(result.report, _settings(max_dropped_share=0.4))
    assert str(info.value) == ("aggregate dropped 1 of 2 pairs (over aggregate.max_dropped_share=0.4): 1 a tie by "
                               "majority (aggregate.tie_policy=drop). To keep them: set aggregate.tie_policy: soft to "
                               "keep ties at soft label 0.5; or raise aggregate.max_dropped_share")
    check_dropped(result.report, _settings(max_dropped_share=0.5))  # at the share: fine


def test_split_left_empty_by_too_few_prompts_fails_in_the_split_stage(tmp_path):
    _jsonl(tmp_path / "data" / "incoming" / "few.jsonl",
           [{"prompt": f"Only {i}", "chosen": "good", "rejected": "bad"} for i in range(3)])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(DEFAULTS))
    for stage in ("stages.collect", "stages.aggregate"):
        assert _stage(stage, tmp_path).returncode == 0
    run = _stage("stages.split", tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith("error: split left "), line
    assert "empty: 3 distinct prompt(s) (3 pairs) over split.fractions train=0.8, val=0.1, test=0.1" in line
    assert "set split.fractions." in line


def test_csv_cells_holding_json_lists_are_read_as_lists(tmp_path):
    """Spreadsheet exports write lists as JSON text: ranked groups and conversations in a CSV batch."""
    import csv

    with (tmp_path / "sheet.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["prompt", "responses", "scores", "chosen", "rejected"])
        writer.writerow(["Rate.", json.dumps(["p", "q"]), json.dumps([1, 2]), "", ""])
        writer.writerow(["", "", "", json.dumps(_msgs("Hi", "Yo.")), json.dumps(_msgs("Hi", "Go."))])
        writer.writerow(["Code?", "", "", "[1, 2, 3]", "[3, 2, 1]"])  # responses that are JSON arrays stay text
    votes, quarantine, _ = _collect(tmp_path)
    assert quarantine == []
    got = [(schema.prompt_messages(v.prompt), v.response_a, v.response_b, v.choice) for v in votes.itertuples()]
    assert got == [(_msgs("Rate."), "p", "q", "b"), (_msgs("Hi"), "Yo.", "Go.", "a"),
                   (_msgs("Code?"), "[1, 2, 3]", "[3, 2, 1]", "a")]
