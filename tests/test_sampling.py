"""Candidate sampling: prompts -> tiny SFT backbone samples -> A/B annotation tasks in the vote-row shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rmpipe.model.backbones import build_tiny_backbone, chatml, load_backbone
from rmpipe.core.errors import ConfigError, DataError
from rmpipe.core.schema import canonical_prompt, normalize_text, pair_id
from rmpipe.model.sampling import pair_tasks, read_prompts, sample_tasks
from rmpipe.core.settings import ModelSettings, SamplingSettings

MODEL_CFG = {
    "backbone": "tiny",
    "head_init": "normal",
    "max_length": 256,
    "trust_remote_code": False,
    "tiny": {"vocab_size": 400, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "seed": 0},
}
SAMPLING = {"n_completions": 3, "temperature": 1.0, "top_p": 0.95, "max_new_tokens": 8, "seed": 0}
PROMPTS = [canonical_prompt("Tell me about rivers."), canonical_prompt([{"role": "user", "content": "Name a bird."}])]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    corpus = [chatml([{"role": "user", "content": f"Question {i} about rivers and birds?"},
                      {"role": "assistant", "content": f"Answer {i}: rivers flow, birds fly."}]) for i in range(40)]
    return build_tiny_backbone(corpus, ModelSettings.from_section(MODEL_CFG), tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def sampler(tiny_dir):
    return load_backbone(tiny_dir, lm_head=True)


def test_tasks_are_valid_distinct_pairs_with_schema_pair_ids(sampler):
    model, tokenizer = sampler
    tasks, report = sample_tasks(model, tokenizer, PROMPTS, SamplingSettings.from_section(SAMPLING), "tiny")
    assert report["prompts"] == 2 and report["completions"] == 6
    assert report["tasks"] == len(tasks) > 0
    assert report["tasks"] + report["identical_pairs_skipped"] <= 2 * 3  # at most C(3, 2) per prompt
    for task in tasks:
        assert "choice" not in task and "annotator_id" not in task
        assert task["response_a"] and task["response_b"]
        assert normalize_text(task["response_a"]) != normalize_text(task["response_b"])
        assert task["pair_id"] == pair_id(task["prompt"], task["response_a"], task["response_b"])
        assert canonical_prompt(task["prompt"]) in PROMPTS
        assert task["backbone"] == "tiny" and task["seed"] == 0 and task["temperature"] == 1.0
    assert len({t["task_id"] for t in tasks}) == len({t["pair_id"] for t in tasks}) == len(tasks)


def test_sampling_is_reproducible_and_per_prompt(sampler):
    model, tokenizer = sampler
    settings = SamplingSettings.from_section(SAMPLING)
    first, _ = sample_tasks(model, tokenizer, PROMPTS, settings, "tiny")
    again, _ = sample_tasks(model, tokenizer, PROMPTS, settings, "tiny")
    assert first == again
    # a prompt's samples depend on the seed and the prompt only, not on its neighbours in the file
    alone, _ = sample_tasks(model, tokenizer, PROMPTS[1:], settings, "tiny")
    assert alone == [t for t in first if canonical_prompt(t["prompt"]) == PROMPTS[1]]
    other_seed, _ = sample_tasks(model, tokenizer, PROMPTS, SamplingSettings.from_section({**SAMPLING, "seed": 1}), "tiny")
    assert {t["pair_id"] for t in other_seed} != {t["pair_id"] for t in first}


def test_prompt_too_long_for_the_backbone_is_skipped_and_counted(sampler):
    model, tokenizer = sampler
    long_prompt = canonical_prompt("word " * 400)
    tasks, report = sample_tasks(model, tokenizer, [long_prompt], SamplingSettings.from_section(SAMPLING), "tiny")
    assert tasks == [] and report["prompts_too_long"] == 1


def test_identical_and_empty_completions_are_not_paired():
    prompt = PROMPTS[0]
    tasks, counts = pair_tasks(prompt, ["Sure.", "Sure.  ", "No.", "", "Maybe."], {"backbone": "x"})
    pairs = {frozenset((t["response_a"], t["response_b"])) for t in tasks}
    assert pairs == {frozenset(("Sure.", "No.")), frozenset(("Sure.", "Maybe.")), frozenset(("No.", "Maybe."))}
    assert counts == {"empty_completions": 1, "identical_pairs_skipped": 3}  # C(4,2) - C(3,2)
    assert [t["task_id"].split("-")[1:] for t in tasks] == [["0", "2"], ["0", "4"], ["2", "4"]]


def test_read_prompts_accepts_jsonl_and_txt_and_dedupes(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join([json.dumps({"prompt": "Hi there"}),
                                json.dumps({"prompt": [{"role": "user", "content": "Hi  there"}], "extra": 1}),
                                "",
                                json.dumps({"prompt": [{"role": "system", "content": "Be brief."},
                                                       {"role": "user", "content": "Why?"}]})]) + "\n")
    prompts = read_prompts(jsonl)
    assert len(prompts) == 2  # "Hi there" as text and as a one-turn chat (whitespace aside) is one prompt
    assert json.loads(prompts[1])[0]["role"] == "system"
    txt = tmp_path / "p.txt"
    txt.write_text("First prompt\n\nSecond prompt\n")
    assert read_prompts(txt) == [canonical_prompt("First prompt"), canonical_prompt("Second prompt")]


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "ok"}\n{"text": "no prompt"}\n', r"p\.jsonl:2: .*'prompt' field"),
    ('{"prompt": "ok"}\nnot json\n', r"p\.jsonl:2: not valid JSON"),
    ('{"prompt": []}\n', r"p\.jsonl:1: .*empty"),
    ("\n\n", "holds no prompts"),
])
def test_bad_prompt_files_name_the_line(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_prompts(path)


def test_bad_sampling_params_are_config_errors():
    with pytest.raises(ConfigError, match="n_completions"):
        SamplingSettings.from_section({**SAMPLING, "n_completions": 1})
    with pytest.raises(ConfigError, match="top_p"):
        SamplingSettings.from_section({**SAMPLING, "top_p": 0})
    with pytest.raises(ConfigError, match="temperature"):
        SamplingSettings.from_section({**SAMPLING, "temperature": 0})
    assert SamplingSettings.from_section(SAMPLING) == SamplingSettings(n_completions=3, temperature=1.0, top_p=0.95, max_new_tokens=8, seed=0)


def test_cli_sample_pairs_writes_tasks(tiny_dir, tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"model": MODEL_CFG, "sampling": SAMPLING}))
    (tmp_path / "prompts.txt").write_text("Tell me about rivers.\nName a bird.\n")
    monkeypatch.chdir(tmp_path)
    main(["sample-pairs", "prompts.txt", "--backbone", str(tiny_dir), "--n-completions", "2"])
    out = tmp_path / "data/tasks/prompts.tasks.jsonl"
    assert capsys.readouterr().out.strip() == "data/tasks/prompts.tasks.jsonl"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert 0 < len(rows) <= 2 and all(r["n_completions"] == 2 for r in rows)
    assert all(r["backbone"] == str(tiny_dir) for r in rows)


def test_cli_with_an_unbuilt_tiny_backbone_exits_cleanly(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"model": MODEL_CFG, "sampling": SAMPLING}))
    (tmp_path / "prompts.txt").write_text("Hello\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["sample-pairs", "prompts.txt"])
    assert exit_info.value.code == 2
    assert "dvc repro backbone" in capsys.readouterr().err


def test_labelled_tasks_flow_through_collect(sampler, tmp_path):
    collect = pytest.importorskip("rmpipe.data.collect.run")
    model, tokenizer = sampler
    tasks, _ = sample_tasks(model, tokenizer, PROMPTS, SamplingSettings.from_section(SAMPLING), "tiny")
    labelled = [{**task, "choice": "ab"[i % 2], "annotator_id": f"ann-{i % 3}"} for i, task in enumerate(tasks)]
    batch = tmp_path / "sampled-batch-1.jsonl"
    batch.write_text("".join(json.dumps(row) + "\n" for row in labelled), encoding="utf-8")

    cfg = {"incoming_dir": str(tmp_path), "max_bad_share": 0.0, "max_field_chars": 100000,
           "max_file_mb": 16, "on_rejected_batch": "fail"}
    result = collect.check_batch(batch, cfg)
    assert result.accepted and result.quarantine == []
    assert len(result.votes) == len(tasks)
    assert list(result.votes["pair_id"]) == [t["pair_id"] for t in tasks]
    assert list(result.votes["choice"]) == [row["choice"] for row in labelled]
    meta = json.loads(result.votes["meta"].iloc[0])
    assert meta["task_id"] == tasks[0]["task_id"] and meta["backbone"] == "tiny"


def test_ranking_tasks_labelled_as_ranked_rows_flow_through_collect_as_the_same_pairs(sampler, tmp_path):
    """sample-pairs --groups: K completions per prompt; ranked by an annotator, collect expands each task into
    exactly the comparisons (same pair_ids, same texts) the A/B tasks of those completions would have been."""
    collect = pytest.importorskip("rmpipe.data.collect.run")
    model, tokenizer = sampler
    settings = SamplingSettings.from_section(SAMPLING)
    groups, report = sample_tasks(model, tokenizer, PROMPTS, settings, "tiny", groups=True)
    pairs, _ = sample_tasks(model, tokenizer, PROMPTS, settings, "tiny")
    assert report["tasks"] == len(groups) > 0 and all(len(g["responses"]) >= 2 for g in groups)
    labelled = [{**g, "ranking": list(reversed(range(len(g["responses"])))), "annotator_id": "ranker"} for g in groups]
    batch = tmp_path / "ranked-tasks.jsonl"
    batch.write_text("".join(json.dumps(row) + "\n" for row in labelled), encoding="utf-8")

    cfg = {"incoming_dir": str(tmp_path), "max_bad_share": 0.0, "max_field_chars": 100000,
           "max_file_mb": 16, "on_rejected_batch": "fail"}
    result = collect.check_batch(batch, cfg)
    assert result.accepted and result.quarantine == []
    votes = result.votes
    assert sorted(votes["pair_id"]) == sorted(t["pair_id"] for t in pairs)
    by_pair = {t["pair_id"]: t for t in pairs}
    for vote in votes.itertuples():
        task = by_pair[vote.pair_id]
        assert (vote.response_a, vote.response_b) == (task["response_a"], task["response_b"])
        assert vote.choice == "b"  # the later completion ranked better by the reversed ranking
        assert vote.prompt == canonical_prompt(task["prompt"])
    assert votes.groupby("group_id")["line"].nunique().eq(1).all()  # one group per labelled task


@pytest.mark.slow
def test_the_manuals_smollm2_sampling_example_runs_as_written_on_a_default_project(tmp_path):
    """`--backbone smollm2-135m-instruct` loads SmolLM2 whatever models/backbone holds (here the tiny model
    `make repro` builds by default), on the project's own params (only fewer, shorter completions)."""
    import os
    import re
    import shlex
    import subprocess
    import sys

    from rmpipe.model import backbones

    root = Path(__file__).resolve().parents[1]
    (line,) = re.findall(r"^rmpipe sample-pairs [^\n#]*--backbone smollm2-135m-instruct[^\n#]*",
                         (root / "docs" / "configuration.md").read_text(), flags=re.M)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["sampling"].update(n_completions=2, max_new_tokens=8)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / "dvc.yaml").write_text((root / "dvc.yaml").read_text())
    built = tmp_path / backbones.BACKBONE_DIR
    built.mkdir(parents=True)
    (built / backbones.MANIFEST).write_text(json.dumps(  # what the backbone stage leaves after `make repro`
        {"backbone": "tiny", "params": backbones.expected_manifest_params(ModelSettings.parse(params))}))
    prompts = [{"prompt": "Name a river in Europe."}, {"prompt": [{"role": "user", "content": "Say hi."}]}]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    backbones.ignore_from_git(root / "models/.cache")  # de-quantized once per checkout, shared with test_backbones
    cache = backbones.materialize_smollm2(root / backbones.SMOLLM2_CACHE)
    (tmp_path / backbones.SMOLLM2_CACHE).parent.mkdir(parents=True)
    (tmp_path / backbones.SMOLLM2_CACHE).symlink_to(cache)

    args = shlex.split(line)
    args[0] = str(Path(sys.executable).parent / "rmpipe")
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(root)})

    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "data/tasks/prompts.tasks.jsonl"
    tasks = [json.loads(t) for t in (tmp_path / "data/tasks/prompts.tasks.jsonl").read_text().splitlines()]
    assert tasks and all(t["backbone"] == "smollm2-135m-instruct" for t in tasks)
    assert {canonical_prompt(t["prompt"]) for t in tasks} <= {canonical_prompt(p["prompt"]) for p in prompts}
