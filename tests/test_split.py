"""The prompt-hash split: pure, stable under new batches, leak-free, faithful to the fractions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from rmpipe.core.errors import ConfigError, DataError
from rmpipe.core.paths import ProjectPaths, read_splits
from rmpipe.core.schema import SPLITS, canonical_prompt, prompt_hash
from rmpipe.data.split import (
    assign_splits,
    check_fractions,
    split_frames,
    split_pairs,
    split_report,
)

ROOT = Path(__file__).resolve().parents[1]
FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
SALT = "rmpipe-v1"


def pairs_for(prompts: list[str], pairs_per_prompt: int = 2) -> pd.DataFrame:
    """A small aggregated-pairs table: `pairs_per_prompt` comparisons for each prompt."""
    rows = []
    for i, text in enumerate(prompts):
        for j in range(pairs_per_prompt):
            rows.append(
                {
                    "pair_id": f"p{i}-{j}",
                    "prompt": canonical_prompt(text),
                    "chosen": f"good answer {j}",
                    "rejected": f"bad answer {j}",
                    "prompt_hash": prompt_hash(text),
                }
            )
    return pd.DataFrame(rows)


def split_of(table: pd.DataFrame) -> dict[str, str]:
    """prompt_hash -> split, asserting on the way that no prompt sits in two splits."""
    per_prompt = table.groupby("prompt_hash")["split"].unique()
    assert (per_prompt.map(len) == 1).all(), "a prompt landed in two splits"
    return per_prompt.map(lambda s: s[0]).to_dict()


prompt_text = st.text(min_size=1, max_size=40).filter(lambda s: s.strip())


@settings(max_examples=60, deadline=None)
@given(
    batch_a=st.lists(prompt_text, min_size=1, max_size=30, unique=True),
    batch_b=st.lists(prompt_text, min_size=0, max_size=30),
)
def test_adding_a_batch_never_moves_a_prompt(batch_a, batch_b):
    before = split_of(split_pairs(pairs_for(batch_a), SALT, FRACTIONS))
    after = split_of(split_pairs(pairs_for(batch_a + batch_b, pairs_per_prompt=3), SALT, FRACTIONS))
    assert {h: after[h] for h in before} == before


def test_realised_fractions_close_to_params_on_10k_prompts():
    hashes = pd.Series([prompt_hash(f"question number {i}") for i in range(10_000)])
    counts = pd.Series(assign_splits(hashes, SALT, FRACTIONS)).value_counts(normalize=True)
    for name, target in FRACTIONS.items():
        # binomial sd at n=10k is <= 0.004; 0.015 is > 3.5 sd
        assert abs(counts[name] - target) < 0.015, (name, counts[name])


def test_salt_changes_the_assignment_and_is_deterministic():
    hashes = pd.Series([prompt_hash(f"q{i}") for i in range(2_000)])
    first = assign_splits(hashes, SALT, FRACTIONS)
    assert (assign_splits(hashes, SALT, FRACTIONS) == first).all()
    other = assign_splits(hashes, "another-salt", FRACTIONS)
    moved = (other != first).mean()
    # independent assignments at 0.8/0.1/0.1 disagree ~34% of the time
    assert 0.25 < moved < 0.45


def test_prompts_differing_only_by_nfkc_or_whitespace_share_a_split():
    variants = ["What is  2+2?", " What is 2+2? ", "What is\u00a02+2?", "What is 2\uff0b2?",
                [{"role": "User", "content": "What is 2+2?\n"}]]
    hashes = pd.Series([prompt_hash(v) for v in variants])
    assert hashes.nunique() == 1
    many = [f"Ｑｕｅｓｔｉｏｎ {i}" for i in range(200)]  # fullwidth: NFKC maps to ASCII
    plain = pd.Series([prompt_hash(f"Question  {i}\t") for i in range(200)])
    fancy = pd.Series([prompt_hash(p) for p in many])
    assert (assign_splits(fancy, SALT, FRACTIONS) == assign_splits(plain, SALT, FRACTIONS)).all()


def test_zero_fraction_split_stays_empty():
    hashes = pd.Series([prompt_hash(f"q{i}") for i in range(3_000)])
    assigned = assign_splits(hashes, SALT, {"train": 0.9, "val": 0.1, "test": 0.0})
    assert set(assigned) == {"train", "val"}


@pytest.mark.parametrize(
    "fractions, words",
    [
        ({"train": 0.8, "val": 0.1, "test": 0.2}, ["sum to 1", "test=0.2", "sum 1.1"]),
        ({"train": 1.2, "val": -0.1, "test": -0.1}, ["non-negative", "val=-0.1"]),
        ({"train": 0.8, "val": 0.2}, ["exactly", "test"]),
        ({"train": 0.8, "val": "0.1", "test": 0.1}, ["split.fractions.val", "'0.1'"]),
        ([0.8, 0.1, 0.1], ["must map"]),
    ],
)
def test_bad_fractions_raise_config_error_naming_the_values(fractions, words):
    with pytest.raises(ConfigError) as err:
        check_fractions(fractions)
    for word in words:
        assert word in str(err.value)


def test_fractions_within_tolerance_are_accepted():
    assert check_fractions({"train": 0.7, "val": 0.2, "test": 0.1 + 5e-7})["test"] == 0.1 + 5e-7


def test_missing_prompt_hash_is_a_data_error():
    table = pairs_for(["a", "b"])
    with pytest.raises(DataError, match="prompt_hash"):
        split_pairs(table.drop(columns="prompt_hash"), SALT, FRACTIONS)
    table.loc[1, "prompt_hash"] = None
    with pytest.raises(DataError, match="1 of 4 pairs"):
        split_pairs(table, SALT, FRACTIONS)


def test_report_counts_pairs_and_prompts_per_split():
    table = split_pairs(pairs_for([f"q{i}" for i in range(500)], pairs_per_prompt=3), SALT, FRACTIONS)
    report = split_report(table, FRACTIONS)
    frames = split_frames(table)
    assert report["pairs"] == 1500 and report["prompts"] == 500
    assert sum(report[s]["pairs"] for s in SPLITS) == 1500
    for name in SPLITS:
        assert report[name]["pairs"] == len(frames[name]) == 3 * report[name]["prompts"]
        assert (frames[name]["split"] == name).all()
    assert sum(report[s]["prompt_fraction"] for s in SPLITS) == pytest.approx(1.0)


def test_stage_writes_three_splits_and_report(tmp_path):
    """`python -m stages.split` end to end in a scratch project folder."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"split": params["split"]}))
    table = pairs_for([f"prompt {i}" for i in range(300)])
    table["batch_ids"] = [["b1"]] * len(table)
    (tmp_path / "data/aggregated").mkdir(parents=True)
    table.to_parquet(tmp_path / "data/aggregated/pairs.parquet", index=False)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "stages.split"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    written = {p.relative_to(tmp_path / "data/split").as_posix() for p in (tmp_path / "data/split").rglob("*")}
    assert written == {"train", "val", "test", "train/pairs.parquet", "val/pairs.parquet", "test/pairs.parquet"}
    parts = list(read_splits(ProjectPaths.at(tmp_path)).values())  # one part each: the pairs are one file
    assert sum(map(len, parts)) == len(table)
    assert set.intersection(*(set(p["prompt_hash"]) for p in parts)) == set()
    assert list(parts[0]["batch_ids"].iloc[0]) == ["b1"]
    report = json.loads((tmp_path / "reports/split.json").read_text())
    assert report["pairs"] == len(table) and report["train"]["pairs"] == len(parts[0])
    # no temp folders left beside the output
    assert [p.name for p in (tmp_path / "data").iterdir() if p.name.startswith(".")] == []


def test_stage_without_input_says_what_to_run(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"split": {"salt": "s", "fractions": FRACTIONS}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "stages.split"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "aggregate" in run.stderr and "Traceback" not in run.stderr


def test_stage_streams_in_chunks_with_the_whole_table_result(tmp_path, monkeypatch):
    """Reading pairs.parquet a few rows at a time (rows of one prompt in different chunks, a split empty in
    some chunks) writes the tables and report of the whole-table split; as one chunk, the very bytes."""
    import stages.split as stage

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"split": {"salt": SALT, "fractions": FRACTIONS}}))
    table = pairs_for([f"prompt {i % 37}" for i in range(120)], pairs_per_prompt=1)
    table["pair_id"] = [f"p{i:03d}" for i in range(len(table))]
    table["batch_ids"] = [["b1", "b2"]] * len(table)
    (tmp_path / "data/aggregated").mkdir(parents=True)
    table.to_parquet(tmp_path / "data/aggregated/pairs.parquet", index=False)
    monkeypatch.chdir(tmp_path)

    whole = split_pairs(table, SALT, FRACTIONS)
    expected = split_frames(whole)
    for name, frame in expected.items():
        frame.to_parquet(tmp_path / f"expected-{name}.parquet", index=False)  # today's one-piece write
    for rows in (7, 10**6):
        monkeypatch.setattr(stage, "BATCH_ROWS", rows)
        report = stage.run(tmp_path / "params.yaml")
        assert report == split_report(whole, FRACTIONS)
        for name in SPLITS:
            written = tmp_path / f"data/split/{name}/pairs.parquet"
            pd.testing.assert_frame_equal(pd.read_parquet(written), expected[name])
            if rows == 10**6:
                assert written.read_bytes() == (tmp_path / f"expected-{name}.parquet").read_bytes()
