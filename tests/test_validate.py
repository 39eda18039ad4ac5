"""The Great Expectations contract over the splits: real GX runs, one per scenario, shared by module fixtures."""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from rmpipe.core.errors import ConfigError, DataError
from rmpipe.core.schema import SPLITS, canonical_prompt, pair_id, prompt_hash
from rmpipe.core.settings import ValidateSettings
from rmpipe.data.split import split_frames, split_pairs
from rmpipe.data.validate.contract import validate_splits
from rmpipe.data.validate.run import ContractParams, contract_params

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ContractParams(min_votes=2, min_response_chars=1, max_response_chars=500, chosen_longer_share=(0.25, 0.75))


def clean_pairs(n_prompts: int = 300) -> pd.DataFrame:
    """Aggregated pairs that honour the contract; the chosen response is the longer one half the time."""
    rows = []
    for i in range(n_prompts):
        prompt = f"Question {i}: how do I keep a reward model honest?"
        for j in range(2):
            short, long = f"Answer {i}.{j}.", f"A longer answer {i}.{j} with detail."
            chosen, rejected = (long, short) if (i + j) % 2 else (short, long)
            rows.append({
                "pair_id": pair_id(prompt, chosen, rejected),
                "prompt": canonical_prompt(prompt),
                "chosen": chosen,
                "rejected": rejected,
                "n_votes": 3, "n_chosen": 2, "n_rejected": 1, "n_tie": 0,
                "agreement": 2 / 3, "soft_label": 2 / 3, "margin": 0.0,
                "prompt_hash": prompt_hash(prompt),
                "batch_ids": ["batch-1.jsonl"],
            })
    return pd.DataFrame(rows)


def clean_splits() -> dict[str, pd.DataFrame]:
    table = split_pairs(clean_pairs(), "rmpipe-v1", {"train": 0.8, "val": 0.1, "test": 0.1})
    return split_frames(table)


def defective_splits() -> tuple[dict[str, pd.DataFrame], dict[str, object]]:
    """Clean splits with one planted defect each; returns the splits and the planted values."""
    splits = clean_splits()
    train, val = splits["train"].copy(), splits["val"].copy()
    planted = {}
    # val: every chosen response longer -> chosen-longer share 1.0
    val["chosen"] = val["rejected"] + " and then some more words"
    val.loc[0, "agreement"] = 1.3
    val.loc[1, "n_votes"] = 1
    # train: a null, an identical pair, an over-long response, a wrong type, duplicates
    train.loc[0, "chosen"] = None
    train.loc[1, "rejected"] = train.loc[1, "chosen"]
    planted["same_pair"] = train.loc[1, "pair_id"]
    train.loc[2, "chosen"] = "x" * 501
    train.loc[3, "pair_id"] = val.loc[2, "pair_id"]  # one pair_id in two splits
    planted["shared_pair_id"] = val.loc[2, "pair_id"]
    twin = train.iloc[[4]].assign(pair_id="twin-of-row-4")  # same (prompt, chosen, rejected), new id
    planted["twin"] = "twin-of-row-4"
    leaked = train.iloc[[5]].assign(pair_id="leaked-into-val", split="val")
    leaked["chosen"] = leaked["rejected"] + " and a longer leaked tail"  # keeps val's share at 1.0
    planted["leaked_hash"] = leaked["prompt_hash"].iloc[0]
    train = pd.concat([train, twin], ignore_index=True)
    val = pd.concat([val, leaked], ignore_index=True)
    train["n_tie"] = train["n_tie"].astype(float)
    # test: empty, and missing a column
    test = splits["test"].iloc[:0].drop(columns="margin")
    return {"train": train, "val": val, "test": test}, planted


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    docs = tmp_path_factory.mktemp("clean_docs")
    splits = clean_splits()
    return validate_splits(splits, PARAMS, docs), docs, splits


@pytest.fixture(scope="module")
def defect_run(tmp_path_factory):
    splits, planted = defective_splits()
    result = validate_splits(splits, PARAMS, tmp_path_factory.mktemp("defect_docs"))
    return result, planted, splits


def test_clean_splits_pass(clean_run):
    result, _, splits = clean_run
    assert result.failures == []
    assert result.success
    assert result.n_expectations > 50
    assert result.rows == {name: len(splits[name]) for name in SPLITS}
    assert all(result.rows[name] > 0 for name in SPLITS)


def test_data_docs_site_is_written(clean_run):
    _, docs, _ = clean_run
    index = docs / "index.html"
    assert index.is_file() and "train_values" in index.read_text()
    pages = {p.name for p in docs.rglob("*.html")}
    assert any("train_schema" in name for name in pages) and any("prompts" in name for name in pages)


def _line(failures: list[str], prefix: str) -> str:
    matches = [f for f in failures if f.startswith(prefix)]
    assert len(matches) == 1, f"expected one line starting {prefix!r}, got {matches} in\n" + "\n".join(failures)
    return matches[0]


def test_each_planted_defect_fails_with_a_readable_line(defect_run):
    result, planted, splits = defect_run
    f = result.failures
    n_train, n_val = len(splits["train"]), len(splits["val"])
    assert _line(f, "FAIL train: chosen not null") == f"FAIL train: chosen not null — 1 of {n_train} rows null"
    assert _line(f, "FAIL train: chosen != rejected") == (
        f"FAIL train: chosen != rejected — 1 of {n_train} rows have chosen == rejected (e.g. {planted['same_pair']})"
    )
    # the null chosen is not a length defect: nulls are the not-null check's business
    assert _line(f, "FAIL train: chosen length") == (
        f"FAIL train: chosen length in [1, 500] chars — 1 of {n_train} rows outside (e.g. 501)"
    )
    assert _line(f, "FAIL train: n_tie is an integer") == "FAIL train: n_tie is an integer — observed float64"
    assert _line(f, "FAIL val: agreement in [0, 1]") == f"FAIL val: agreement in [0, 1] — 1 of {n_val} rows outside (e.g. 1.3)"
    assert _line(f, "FAIL val: n_votes >= 2") == f"FAIL val: n_votes >= 2 — 1 of {n_val} rows below (e.g. 1)"
    assert _line(f, "FAIL val: chosen-longer share in [0.25, 0.75]") == "FAIL val: chosen-longer share in [0.25, 0.75] — observed 1.0"
    shared = _line(f, "FAIL all splits: pair_id unique across splits")
    assert "2 of" in shared and "share a pair_id" in shared and planted["shared_pair_id"][:10] in shared
    twin = _line(f, "FAIL all splits: (prompt, chosen, rejected) unique across splits")
    assert "2 of" in twin and "twin-of-row-4" in twin
    leak = _line(f, "FAIL prompts: each prompt_hash in exactly one split")
    assert "1 of" in leak and "prompts in several splits" in leak and planted["leaked_hash"][:12] in leak
    assert _line(f, "FAIL test: split non-empty") == "FAIL test: split non-empty — observed 0 rows"
    assert _line(f, "FAIL test: contract columns present") == "FAIL test: contract columns present — missing margin"


def test_nothing_but_the_planted_defects_fails(defect_run):
    result, _, _ = defect_run
    assert not result.success
    assert len(result.failures) == 12, "\n".join(result.failures)
    summary = result.summary()
    assert summary["n_failed"] == 12 and summary["success"] is False
    assert summary["rows"]["test"] == 0


def test_contract_params_from_params_yaml():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    p = contract_params(ValidateSettings.parse(params), params["aggregate"]["min_votes"])
    assert p.min_votes == params["aggregate"]["min_votes"]
    assert p.chosen_longer_share == tuple(params["validate"]["chosen_longer_share"])


@pytest.mark.parametrize(
    "override, words",
    [
        ({"chosen_longer_share": [0.8, 0.2]}, "chosen_longer_share"),
        ({"chosen_longer_share": 0.5}, "'validate.chosen_longer_share' must be a list, got 0.5"),
        ({"min_response_chars": True}, "'validate.min_response_chars' must be a whole number, got True"),
        ({"max_chars": 5}, "'validate.max_chars' is not a setting rmpipe knows"),
        ({"min_response_chars": 10, "max_response_chars": 5}, "0 <= min <= max"),
    ],
)
def test_bad_validate_params_raise_config_error(override, words):
    section = {"min_response_chars": 1, "max_response_chars": 100, "chosen_longer_share": [0.2, 0.8], **override}
    with pytest.raises(ConfigError, match=re.escape(words)):
        ValidateSettings.from_section(section)


def _write_project(folder: Path, splits: dict[str, pd.DataFrame]) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (folder / "params.yaml").write_text(yaml.safe_dump({"aggregate": params["aggregate"], "validate": params["validate"]}))
    (folder / "data/split").mkdir(parents=True)
    for name, frame in splits.items():
        frame.to_parquet(folder / f"data/split/{name}.parquet", index=False)


def test_stage_exits_nonzero_with_failure_lines_and_no_traceback(tmp_path):
    splits = clean_splits()
    splits["val"].loc[0, "agreement"] = 1.3
    _write_project(tmp_path, splits)
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(home), "GX_ANALYTICS_ENABLED": "true"}
    run = subprocess.run([sys.executable, "-m", "stages.validate"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr
    assert "FAIL val: agreement in [0, 1] — 1 of" in run.stderr and "(e.g. 1.3)" in run.stderr
    assert "error: 1 of" in run.stderr and "expectations failed" in run.stderr
    assert "Traceback" not in run.stderr and "Calculating Metrics" not in run.stderr
    report = json.loads((tmp_path / "reports/validation.json").read_text())
    assert report["success"] is False and report["n_failed"] == 1
    assert report["failures"][0].startswith("FAIL val: agreement")
    assert report["rows"] == {name: len(splits[name]) for name in SPLITS}
    assert (tmp_path / "reports/data_docs/index.html").is_file()
    # GX left nothing in the home folder, and no project folder or temp dirs beside the outputs
    assert list(home.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [".rmpipe", "data", "home", "params.yaml", "reports"]
    # the parts' memo, the file-hash ledger and the remembered code hash (run state)
    assert sorted(p.name for p in (tmp_path / ".rmpipe/memo").iterdir()) == ["code-hashes.json", "file-hashes.json",
                                                                          "validate"]
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["data_docs", "validation.json"]


def test_stage_without_splits_says_what_to_run(tmp_path, monkeypatch):
    from stages.validate import run

    _write_project(tmp_path, {})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="run the split stage first"):
        run()


def test_min_votes_applies_to_vote_built_pairs_only(tmp_path):
    """Pre-judged pairs (pair rows, ranked groups) carry their own n_votes: one judgement passes; a
    vote-built pair with one vote still fails, named as such."""
    splits = clean_splits()
    for name, frame in splits.items():
        splits[name] = frame.assign(prejudged=True, n_votes=1, n_chosen=1, n_rejected=0, agreement=1.0, soft_label=1.0)
    val = splits["val"]
    val.loc[0, "prejudged"] = False  # one vote-built pair with a single vote
    result = validate_splits(splits, PARAMS, tmp_path / "docs")
    assert result.failures == [f"FAIL val: n_votes >= 2 (vote-built pairs) — 1 of {len(val)} rows below (e.g. 1)"]


def test_splits_given_in_chunks_report_what_the_whole_splits_do(defect_run, tmp_path):
    """The stage reads each split a chunk at a time and runs its suites on groups of chunks (here two chunks
    of 100 rows a run), merging each suite's results (counts summed, first examples kept, the share taken
    on the whole split). Every planted defect (a null in one chunk, duplicates across chunks and splits,
    a leak, an empty split) reads the same."""
    whole, _, _ = defect_run
    splits, _ = defective_splits()
    chunked = validate_splits(splits, PARAMS, tmp_path, chunk_rows=100, gx_rows=150)
    assert chunked.summary() == whole.summary()
    assert len(whole.failures) == 12


def _write_splits(folder: Path, splits: dict[str, pd.DataFrame]) -> dict[str, Path]:
    folder.mkdir()
    for name, frame in splits.items():
        frame.to_parquet(folder / f"{name}.parquet", index=False)
    return {name: folder / f"{name}.parquet" for name in splits}


@pytest.mark.parametrize("bucket_rows", [65_536, 8])
def test_duplicates_in_other_chunks_and_splits_are_found_from_the_files_at_any_chunk_size(tmp_path, monkeypatch,
                                                                                         bucket_rows):
    """The stage's path: splits read from their files 100 rows at a time, ids coded in one bucket or in ~75. A
    pair_id twice in one split (rows 0 and 450: five chunks apart), a pair_id in two splits and three prompts
    shared by val and test (train not involved) read as over whole in-memory splits, with the real ids as
    examples, the leaked prompts in the order they first appear."""
    from rmpipe.data.validate import ids as validate_ids

    monkeypatch.setattr(validate_ids, "BUCKET_ROWS", bucket_rows)
    splits = clean_splits()
    train, val, test = (splits[name].copy() for name in SPLITS)
    train.loc[450, "pair_id"] = train.loc[0, "pair_id"]
    val.loc[len(val) - 1, "pair_id"] = test.loc[0, "pair_id"]
    leaks = [(3, 2), (10, 8), (20, 5)]  # (val row, test row whose prompt it takes)
    for v, t in leaks:
        val.loc[v, "prompt_hash"] = test.loc[t, "prompt_hash"]
    splits = {"train": train, "val": val, "test": test}
    whole = validate_splits(splits, PARAMS, tmp_path / "whole")
    files = _write_splits(tmp_path / "split", splits)
    chunked = validate_splits(files, PARAMS, tmp_path / "chunked", chunk_rows=100, gx_rows=100)
    assert chunked.summary() == whole.summary()
    n = sum(map(len, splits.values()))
    n_prompts = len(set(train.prompt_hash) | set(val.prompt_hash) | set(test.prompt_hash))
    leaked = ", ".join(f"{test.loc[t, 'prompt_hash'][:23]}…" for _, t in leaks)
    assert chunked.failures == [
        f"FAIL all splits: pair_id unique across splits — 4 of {n} rows share a pair_id "
        f"(e.g. {train.loc[0, 'pair_id']}, {test.loc[0, 'pair_id']})",
        f"FAIL prompts: each prompt_hash in exactly one split — 3 of {n_prompts} prompts in several splits (e.g. {leaked})",
    ]


def test_the_chosen_longer_share_is_the_whole_splits_at_any_chunk_size(tmp_path):
    """Train sorted chosen-longer first: every 100-row chunk's own share is 1.0 or near 0, the split's ~0.5 passes;
    with most chosen-shorter rows dropped the split's share fails, and the line gives the split's figure."""
    splits = clean_splits()
    train = splits["train"]
    longer = train["chosen"].str.len() > train["rejected"].str.len()
    sorted_train = pd.concat([train[longer], train[~longer]], ignore_index=True)
    passing = validate_splits({**splits, "train": sorted_train}, PARAMS, tmp_path / "a", chunk_rows=100, gx_rows=100)
    assert passing.failures == []
    biased = pd.concat([train[longer], train[~longer].iloc[: (~longer).sum() // 4]], ignore_index=True)
    failing = validate_splits({**splits, "train": biased}, PARAMS, tmp_path / "b", chunk_rows=100, gx_rows=100)
    share = round(longer.sum() / len(biased), 4)
    assert failing.failures == [f"FAIL train: chosen-longer share in [0.25, 0.75] — observed {share}"]
    assert validate_splits({**splits, "train": biased}, PARAMS, tmp_path / "c").failures == failing.failures


def _docs_page(docs: Path, suite: str) -> str:
    pages = list((docs / "validations/rmpipe" / suite).rglob("*.html"))
    assert len(pages) == 1, pages
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", pages[0].read_text())).split())


def test_chunked_runs_leave_one_docs_page_per_suite_with_the_whole_splits_figures(tmp_path):
    """Each suite's merged result is its one page in the data docs: the whole split's counts, the real ids."""
    splits, planted = defective_splits()
    validate_splits(splits, PARAMS, tmp_path, chunk_rows=100, gx_rows=150)
    suites = {p.name for p in (tmp_path / "validations/rmpipe").iterdir()}
    assert suites == {f"{n}_{s}" for n in SPLITS for s in ("schema", "values")} | {"all_splits", "prompts"}
    values = _docs_page(tmp_path, "train_values")
    assert "Status: Failed" in values and f"of {len(splits['train'])} total rows" in values
    cross = _docs_page(tmp_path, "all_splits")
    assert planted["shared_pair_id"] in cross and f"of {sum(map(len, splits.values()))} total rows" in cross


@pytest.mark.parametrize("bucket_rows", [65_536, 1])
def test_id_codes_are_equal_exactly_where_the_strings_are(monkeypatch, bucket_rows):
    """Codes across splits (one bucket, or a bucket per row): equal exactly where the strings are; a null or a
    split without the column is -1; each code reads back as its string."""
    from rmpipe.data.validate import ids as validate_ids

    monkeypatch.setattr(validate_ids, "BUCKET_ROWS", bucket_rows)
    values = ["ab", "b", None, "ab", None, None, "c", "b", "ba"]
    sources = [pd.DataFrame({"x": values[:4]}), pd.DataFrame({"y": [1, 2]}), pd.DataFrame({"x": values[6:]})]
    coded = validate_ids.encode(sources, "x", [4, 2, 3])
    codes = coded.codes.tolist()
    assert [c < 0 for c in codes] == [v is None for v in values]
    pairs = [(i, j) for i in range(9) for j in range(9) if values[i] is not None and values[j] is not None]
    assert all((codes[i] == codes[j]) == (values[i] == values[j]) for i, j in pairs)
    assert [coded.decode(c) for c in codes if c >= 0] == [v for v in values if v is not None]
    assert coded.series().isna().tolist() == [v is None for v in values]


def test_schema_frame_keeps_names_dtypes_and_nulls_but_no_text():
    """The schema suite reads a column's name, dtype and nulls only (an `object` column's type value by
    value): the frame GX fingerprints keeps exactly those, and no text, so hashing it costs nothing."""
    from rmpipe.data.validate.contract import _VALUE_TYPED
    from rmpipe.data.validate.frames import schema_frame

    split = clean_splits()["train"]
    split.loc[0, "chosen"] = None
    split.loc[1, "batch_ids"] = None
    split["rejected"] = split["rejected"].astype(object)
    split.loc[2, "rejected"] = 7  # an object column whose type GX checks value by value: kept as it is
    frame = schema_frame(split, _VALUE_TYPED)
    assert list(frame.columns) == list(split.columns) and (frame.dtypes == split.dtypes).all()
    assert frame.isna().equals(split.isna())
    assert set(frame["chosen"].dropna()) == set(frame["prompt"]) == {""}
    assert set(frame["batch_ids"].dropna()) == {""}
    assert frame["rejected"].equals(split["rejected"])


def test_a_non_text_value_in_a_text_column_still_fails(tmp_path):
    splits = clean_splits()
    train = splits["train"].astype({"rejected": object})
    train.loc[3, "rejected"] = 7
    result = validate_splits({**splits, "train": train}, PARAMS, tmp_path)
    assert _line(result.failures, "FAIL train: rejected is text") == (
        f"FAIL train: rejected is text — 1 of {len(train)} rows fail (e.g. 7)")
