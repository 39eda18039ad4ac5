"""Hugging Face datasets as batches: save_to_disk folders, hub-style shard folders and `rmpipe import`,
read through `datasets` into the same vote table, with the same refusals and accounting as files.
(No network here: `rmpipe import` is exercised on a local dataset folder, which load_dataset accepts.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pytest
import yaml

from pipeline.cli import main as cli
from rmpipe.data.collect import run as collect
from rmpipe.core import schema

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = yaml.safe_load((ROOT / "params.yaml").read_text())
datasets.disable_progress_bars()

PAIRS = {"prompt": ["One?", "Two?", "Three?"], "chosen": ["1", "2", "3"], "rejected": ["x", "y", "z"]}


def _cfg(incoming: Path, **overrides) -> dict:
    return {**DEFAULTS["collect"], "incoming_dir": str(incoming), **overrides}


def _collect(incoming: Path, **overrides):
    votes, quarantine, report = collect.collect_dir(incoming, _cfg(incoming, **overrides))
    assert all(e["rows_read"] == e["rows_normalized"] + e["rows_quarantined"] for e in report["batches"])
    return votes, quarantine, report


def _entry(report: dict, batch_id: str) -> dict:
    return next(e for e in report["batches"] if e["batch_id"] == batch_id)


def test_save_to_disk_dataset_and_dataset_dict_folders_are_batches(tmp_path):
    incoming = tmp_path / "incoming"
    datasets.Dataset.from_dict(PAIRS).save_to_disk(str(incoming / "vendor-pairs"))
    ranked = datasets.Dataset.from_dict({"prompt": ["Rank"], "responses": [["a", "b", "c"]], "ranking": [[2, 0, 1]]})
    bad = datasets.Dataset.from_dict({"prompt": ["Q"], "responses": [["only one"]], "ranking": [[0]]})
    datasets.DatasetDict({"train": ranked, "test": bad}).save_to_disk(str(incoming / "ranked-dict"))

    votes, quarantine, report = _collect(incoming)
    assert [(e["batch_id"], e["format"], e["status"]) for e in report["batches"]] == [
        ("ranked-dict", "hf_disk", "accepted"), ("vendor-pairs", "hf_disk", "accepted")]
    assert quarantine == [] and report["skipped_files"] == []
    pairs = votes[votes["batch_id"] == "vendor-pairs"]
    assert list(zip(pairs["line"], pairs["response_a"], pairs["response_b"])) == [(1, "1", "x"), (2, "2", "y"), (3, "3", "z")]
    assert pairs["prejudged"].all()
    group = votes[votes["batch_id"] == "ranked-dict"]  # train split by default: c > a > b
    assert {(r.response_a, r.response_b, r.choice) for r in group.itertuples()} == {
        ("a", "b", "a"), ("a", "c", "b"), ("b", "c", "b")}
    assert _entry(report, "ranked-dict")["shapes"]["votes_from_ranked_rows"] == 3

    # collect.hf_split picks another split; one that is not there rejects the batch, saying which there are
    _, quarantine, report = _collect(incoming, hf_split="test", on_rejected_batch="skip")
    assert [q["code"] for q in quarantine] == ["bad_group"] and quarantine[0]["batch_id"] == "ranked-dict"
    _, _, report = _collect(incoming, hf_split="validation", on_rejected_batch="skip")
    entry = _entry(report, "ranked-dict")
    assert entry["status"] == "rejected"
    assert "has no split 'validation' (it has train, test): set collect.hf_split" in entry["message"]


def test_hub_style_shard_folders_parquet_and_jsonl(tmp_path):
    incoming = tmp_path / "incoming"
    data = incoming / "hub-parquet" / "data"
    data.mkdir(parents=True)
    full = datasets.Dataset.from_dict(PAIRS)
    full.select([0, 1]).to_parquet(str(data / "train-00000-of-00002.parquet"))
    full.select([2]).to_parquet(str(data / "train-00001-of-00002.parquet"))
    datasets.Dataset.from_dict({"prompt": ["Held out?"], "chosen": ["h"], "rejected": ["j"]}).to_parquet(
        str(data / "test-00000-of-00001.parquet"))
    (incoming / "hub-jsonl" / "data").mkdir(parents=True)
    (incoming / "hub-jsonl" / "data" / "train-00000-of-00001.jsonl").write_text(
        json.dumps({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."})
        + "\n" + json.dumps({"chosen": "no prompt here", "rejected": "none"}) + "\n")
    (incoming / "notes").mkdir()
    (incoming / "notes" / "README.txt").write_text("not data")

    votes, quarantine, report = _collect(incoming, max_bad_share=0.5)
    assert {e["batch_id"]: (e["format"], e["status"], e["rows_read"]) for e in report["batches"]} == {
        "hub-jsonl": ("hf_shards", "accepted", 2), "hub-parquet": ("hf_shards", "accepted", 3)}
    assert report["skipped_files"][0]["file"] == "notes"
    assert sorted(votes.loc[votes["batch_id"] == "hub-parquet", "prompt"].map(
        lambda p: schema.prompt_messages(p)[0]["content"])) == ["One?", "Three?", "Two?"]  # train shards only
    hh = votes[votes["batch_id"] == "hub-jsonl"].iloc[0]
    assert schema.prompt_messages(hh["prompt"]) == [{"role": "user", "content": "Hi"}]
    assert (hh["response_a"], hh["response_b"]) == ("Hello.", "Go away.")
    assert [(q["batch_id"], q["line"], q["code"]) for q in quarantine] == [("hub-jsonl", 2, "missing_field")]


def test_folder_refusals_and_content_duplicates(tmp_path):
    incoming = tmp_path / "incoming"
    datasets.Dataset.from_dict(PAIRS).save_to_disk(str(incoming / "a-original"))
    shutil.copytree(incoming / "a-original", incoming / "b-copy")
    datasets.Dataset.from_dict(PAIRS).save_to_disk(str(tmp_path / "outside"))
    (incoming / "c-linked").mkdir()
    for f in (tmp_path / "outside").iterdir():
        (incoming / "c-linked" / f.name).symlink_to(f)
    (incoming / "d-folder-link").symlink_to(tmp_path / "outside")
    _, _, report = _collect(incoming, on_rejected_batch="skip")
    status = {e["batch_id"]: e["status"] for e in report["batches"]}
    assert status == {"a-original": "accepted", "b-copy": "duplicate_of:a-original", "c-linked": "refused",
                      "d-folder-link": "refused"}
    assert "holds symbolic links" in _entry(report, "c-linked")["message"]
    assert "is a symbolic link" in _entry(report, "d-folder-link")["message"]
    _, _, report = _collect(incoming, on_rejected_batch="skip", max_file_mb=0.001)
    assert "dataset folder is" in _entry(report, "a-original")["message"]


def test_import_writes_a_batch_and_its_source_record_that_collect_reports(tmp_path, capsys):
    source = tmp_path / "some-dataset"
    (source / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(PAIRS).to_parquet(str(source / "data" / "train-00000-of-00001.parquet"))
    incoming = tmp_path / "incoming"
    cli(["import", str(source), "--split", "train", "--out", str(incoming), "--name", "imported"])
    assert capsys.readouterr().out.splitlines()[0] == str(incoming / "imported.parquet")
    record = json.loads((incoming / "imported.parquet.source.json").read_text())
    assert record["dataset_id"] == str(source) and record["split"] == "train" and record["rows"] == 3
    assert list(record["source_files"]) == ["data/train-00000-of-00001.parquet"]
    assert len(record["batch_sha256"]) == 64

    votes, quarantine, report = _collect(incoming)
    entry = _entry(report, "imported.parquet")
    assert entry["status"] == "accepted" and len(votes) == 3 and report["skipped_files"] == []
    assert entry["source"]["dataset_id"] == str(source) and entry["sha256"] == record["batch_sha256"]

    with pytest.raises(SystemExit) as info:  # the same name again: refused, one line, the file kept
        cli(["import", str(source), "--out", str(incoming), "--name", "imported"])
    assert info.value.code == 2 and "exists already" in capsys.readouterr().err


def test_sample_data_is_never_written_beside_a_dataset_folder(tmp_path):
    """`make repro` writes samples only into an empty inbox, and `rmpipe sample-data` itself refuses to
    mix them with a batch, a dataset folder included."""
    from rmpipe.core.errors import UserError
    from rmpipe.data.sample.batches import write_sample_batches

    datasets.Dataset.from_dict(PAIRS).save_to_disk(str(tmp_path / "mine"))
    with pytest.raises(UserError, match=r"already holds other batch files \(mine\)"):
        write_sample_batches(tmp_path, {**DEFAULTS["sample_data"], "n_pairs": 10})
    makefile = (ROOT / "Makefile").read_text()
    assert 'if [ -z "$$(ls data/incoming 2>/dev/null)" ]; then' in makefile
