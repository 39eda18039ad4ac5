"""Bring your own data, end to end: a pairwise dataset as a new user has it (one judgement per pair, no
vote rows), dropped into data/incoming/ as a `save_to_disk` folder, a hub-style shard folder and an
`rmpipe import`ed batch, run through a real `dvc repro` with the default data params, gives an
exported reward model whose lineage names every batch."""

from __future__ import annotations

import json

import datasets
import pandas as pd
import pytest
import yaml

from rmpipe.core.paths import ProjectPaths, read_splits
from rmpipe.data.sample.batches import generate_pair_rows
from rmpipe.data.sample.texts import ranked_groups
from tests.test_dvc_pipeline import BIN, copy_project, ran_stages, run

pytestmark = pytest.mark.slow
datasets.disable_progress_bars()

# The fast model/training knobs of test_dvc_pipeline; every data param (min_votes 2, tie_policy drop, ...) stays default.
FAST = {("train", "epochs"): 1, ("model", "max_length"): 128}


def _one_judgement_per_pair(n: int, seed: int) -> pd.DataFrame:
    """`n` comparisons, each judged once (the sample generator's dominant annotator): prompt messages, chosen, rejected."""
    rows = generate_pair_rows({"seed": seed, "n_pairs": 1, "n_batches": 1, "pair_rows": n})
    return rows.groupby("true_pair", sort=True).first().reset_index(drop=True)[["prompt", "chosen", "rejected"]]


def test_pairwise_dataset_folders_train_with_default_params_and_lineage_names_them(tmp_path):
    proj = copy_project(tmp_path / "proj", FAST)
    run([str(BIN / "dvc"), "config", "--local", "core.no_scm", "true"], proj)
    incoming = proj / "data" / "incoming"
    pairs = _one_judgement_per_pair(460, seed=7)
    disk, shards, imported = pairs.iloc[:200], pairs.iloc[200:400], pairs.iloc[400:]

    # TRL conversational, explicit prompt, as a DatasetDict folder (the train split is read by default)
    conversational = {"prompt": list(disk["prompt"]),
                      "chosen": [[{"role": "assistant", "content": c}] for c in disk["chosen"]],
                      "rejected": [[{"role": "assistant", "content": r}] for r in disk["rejected"]]}
    held_out = {k: v[:1] for k, v in conversational.items()}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(conversational),
                          "test": datasets.Dataset.from_dict(held_out)}).save_to_disk(str(incoming / "vendor-disk"))
    # TRL conversational, implicit prompt, as hub-style parquet shards
    implicit = datasets.Dataset.from_dict({
        "chosen": [p + [{"role": "assistant", "content": c}] for p, c in zip(shards["prompt"], shards["chosen"])],
        "rejected": [p + [{"role": "assistant", "content": r}] for p, r in zip(shards["prompt"], shards["rejected"])]})
    (incoming / "hub-shards" / "data").mkdir(parents=True)
    implicit.select(range(100)).to_parquet(str(incoming / "hub-shards" / "data" / "train-00000-of-00002.parquet"))
    implicit.select(range(100, 200)).to_parquet(str(incoming / "hub-shards" / "data" / "train-00001-of-00002.parquet"))
    # a local dataset folder imported with `rmpipe import` (a hub id takes the same path with network)
    source = tmp_path / "downloaded"
    (source / "data").mkdir(parents=True)
    datasets.Dataset.from_pandas(imported, preserve_index=False).to_parquet(str(source / "data" / "train-00000-of-00001.parquet"))
    run([str(BIN / "rmpipe"), "import", str(source), "--name", "imported"], proj)

    first = run([str(BIN / "dvc"), "repro"], proj)
    stages = list(yaml.safe_load((proj / "dvc.yaml").read_text())["stages"])
    assert ran_stages(first) == stages

    collected = json.loads((proj / "reports" / "collect.json").read_text())
    assert {e["batch_id"]: (e["format"], e["rows_read"], e["rows_normalized"]) for e in collected["batches"]} == {
        "hub-shards": ("hf_shards", 200, 200), "imported.parquet": ("parquet", 60, 60),
        "vendor-disk": ("hf_disk", 200, 200)}
    annotators = json.loads((proj / "reports" / "annotators.json").read_text())
    assert annotators["n_pairs_out"] == annotators["n_pairs_prejudged"] == 460  # none lost to min_votes: 2
    assert json.loads((proj / "reports" / "validation.json").read_text())["success"] is True

    lineage = json.loads((proj / "models" / "export" / "lineage.json").read_text())
    named = {b for ids in lineage["batch_ids"].values() for b in ids}
    assert named == {"hub-shards", "imported.parquet", "vendor-disk"}
    assert lineage["data"]["batches"]["imported.parquet"]["source"]["dataset_id"] == str(source)
    assert lineage["data"]["batches"]["vendor-disk"]["format"] == "hf_disk"
    assert all(s["prejudged"] == s["pairs"] > 0 for s in lineage["data"]["splits"].values())
    assert "data/incoming" in lineage["inputs"]  # the folders are hashed by DVC as part of data/incoming
    shown = run([str(BIN / "rmpipe"), "lineage", "models/export"], proj).stdout
    assert "hub-shards" in shown and f"<- {source} split train" in shown
    assert (proj / "models" / "export" / "config.json").exists()


def _ranked_rows(n_prompts: int, seed: int) -> list[dict]:
    """Ranked groups of K = 4 in the `prompt, responses, ranking` shape of rating/ranking datasets."""
    return [{"prompt": prompt, "responses": responses, "ranking": [0, 1, 2, 3]}
            for prompt, responses in ranked_groups(n_prompts, seed)]


def test_ranked_groups_through_dvc_repro_train_with_the_groups_layout(tmp_path):
    """Issue 11's end to end: a ranked batch (K = 4 per prompt) dropped into data/incoming, default params
    (`train.packing: auto`), `dvc repro train`: every comparison of a prompt reaches the split together and
    the trainer picks the `groups` layout (the prompt once, each response once)."""
    proj = copy_project(tmp_path / "proj", FAST)
    run([str(BIN / "dvc"), "config", "--local", "core.no_scm", "true"], proj)
    rows = _ranked_rows(120, seed=11)
    (proj / "data" / "incoming" / "ranked.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    run([str(BIN / "dvc"), "repro", "train"], proj)
    collected = json.loads((proj / "reports" / "collect.json").read_text())
    assert [(e["batch_id"], e["rows_read"], e["rows_normalized"]) for e in collected["batches"]] == [
        ("ranked.jsonl", 120, 120)]
    train = read_splits(ProjectPaths.at(proj), ("train",))["train"]  # the split's parts, in order
    per_prompt = train.groupby("prompt_hash").size()
    assert len(train) > 0 and (per_prompt == 6).all()  # all C(4, 2) comparisons of a prompt, in one split
    record = json.loads((proj / "models" / "reward_model" / "training.json").read_text())
    assert record["params"]["train"]["packing"] == "auto" and record["packing"] == "groups"
    assert record["packing_errors"]["groups"] <= 1e-4  # measured exact against the stacked forward on this backbone
