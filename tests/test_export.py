"""Export: plain-transformers parity, pad-token safety, lineage/verify/score, crash safety, promotion gate.

Runs the real evaluate and export stages in a temporary project holding a tiny Llama reward model
saved in the train stage's layout (built by the helpers of test_evaluate).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import transformers
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import rmpipe.export.export
from pipeline.cli import main as cli_main
from rmpipe.evaluation.evaluate import load_checkpoint, reward_fn_of, score_token_rows
from rmpipe.export.hf import EXPORT_PAD, load_golden
from rmpipe.audit.lineage import describe, read_manifest, verify_export
from rmpipe.export.promotion import promotion_decision
from rmpipe.model.render import encode_rows
from rmpipe.core.settings import ExportSettings
from stages import evaluate as evaluate_stage
from stages import export as export_stage
from test_evaluate import BATTERY, ROOT, make_pairs, save_reward_model


def make_project(root: Path, model_src: Path) -> Path:
    """A project folder with params, splits, the battery and a trained-model folder."""
    root.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["max_length"] = 128
    params["evaluate"]["battery_file"] = "data/battery.jsonl"
    params["export"]["golden_pairs"] = 4
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "data" / "split").mkdir(parents=True)
    shutil.copy(BATTERY, root / "data" / "battery.jsonl")
    for name, n, seed in (("train", 8, 0), ("val", 6, 1), ("test", 12, 2)):
        make_pairs(n, seed).assign(split=name, batch_ids=[[f"batch-{name}.jsonl"]] * n).to_parquet(
            root / "data" / "split" / f"{name}.parquet", index=False)
    shutil.copytree(model_src, root / "models" / "reward_model")
    return root


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """Run evaluate + export once for the module; tests that modify the project copy it first."""
    src = save_reward_model(tmp_path_factory.mktemp("src"))
    project = make_project(tmp_path_factory.mktemp("project"), src)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        evaluate_stage.run()
        export_stage.run()
    return project


def test_export_loads_in_one_line_with_matching_rewards(exported):
    export = exported / "models" / "export"
    hf = AutoModelForSequenceClassification.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert hf.config.num_labels == 1 and hf.score.out_features == 1 and hf.score.bias is None
    assert hf.config.pad_token_id == tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|pad|>")
    assert tokenizer.chat_template and (export / "model.safetensors").exists()
    assert isinstance(hf.config.reward_mean, float) and hf.config.reward_std > 0
    assert hf.config.reward_stats_split == "val"

    golden = load_golden(export)
    assert {g["source"] for g in golden} == {"test", "battery", "eos_in_text"}
    model, rm_tokenizer = load_checkpoint(exported / "models" / "reward_model")
    rows, _ = encode_rows(tokenizer, [g["prompt"] for g in golden], [g["response"] for g in golden], 128)
    for side in ("right", "left"):
        exported_rewards = score_token_rows(reward_fn_of(hf.eval()), rows, tokenizer.pad_token_id, 8, side)
        trained = score_token_rows(model, rows, rm_tokenizer.pad_token_id, 8, side)
        assert abs(exported_rewards - trained).max() <= 1e-4
    assert abs(exported_rewards - [g["reward"] for g in golden]).max() <= 1e-4


def test_stage_outputs_and_manifest(exported):
    metrics = json.loads((exported / "metrics" / "eval.json").read_text())
    full = json.loads((exported / "reports" / "eval.json").read_text())
    from rmpipe.evaluation.evaluate import HEADLINE

    assert list(metrics) == list(HEADLINE) and metrics["n_pairs"] == 12  # what runs are compared by, accuracy first
    assert {"checks", "accuracy_by_agreement", "margin"} <= set(full) and {k: full[k] for k in HEADLINE} == metrics
    for name in ("reward_hist", "calibration", "reward_vs_length"):
        assert (exported / "plots" / "eval" / f"{name}.csv").stat().st_size > 0
    assert (exported / "reports" / "eval.md").read_text().startswith("# Reward-model evaluation")

    manifest = read_manifest(exported / "models" / "export")
    assert manifest["batch_ids"]["train"] == ["batch-train.jsonl"]
    assert manifest["params"]["export"]["golden_pairs"] == 4
    assert manifest["packages"]["transformers"] == transformers.__version__ and manifest["packages"]["torch"]
    assert not any(key in json.dumps(manifest) for key in ("HF_HUB_OFFLINE", "PATH=", "HOME="))  # no environment
    assert manifest["git"] is None  # the temp project is not a git work tree
    assert manifest["parity"]["max_abs_diff"] <= 1e-4
    assert set(manifest["files"]) >= {"config.json", "model.safetensors", "golden.jsonl", "README.md"}
    assert "lineage.json" not in manifest["files"]
    # An untrained model fails evaluation: the export is still written, but not promoted, and says why.
    assert manifest["promotion"]["promoted"] is False and "evaluation failed" in manifest["promotion"]["reason"]
    promoted = exported / "models" / "promoted"
    assert not (promoted / "config.json").exists()
    assert json.loads((promoted / "promotion.json").read_text())["reason"] == "no model has been promoted yet"
    card = (exported / "models" / "export" / "README.md").read_text()
    assert "## Limits" in card and "not promoted" in card and "battery" in card
    # the card's metadata reads back as the hub reads it: how to load the model, and its held-out accuracy
    from huggingface_hub import ModelCard

    data = ModelCard.load(exported / "models" / "export" / "README.md").data
    assert (data.library_name, data.pipeline_tag) == ("transformers", "text-classification")
    assert "reward-model" in data.tags
    (result,) = data.eval_results
    assert (result.metric_type, result.metric_value) == ("accuracy", metrics["accuracy"])
    assert "batch-train.jsonl" in card and f"{metrics['accuracy']:.4f} on 12 pairs" in card
    text = describe(manifest)
    assert "batch-train.jsonl" in text and "not in git" in text


def test_verify_passes_then_catches_tampering(exported, tmp_path, capsys, monkeypatch):
    export = tmp_path / "export"
    shutil.copytree(exported / "models" / "export", export)
    assert verify_export(export) == []
    monkeypatch.chdir(tmp_path)
    cli_main(["verify", str(export)])
    assert "ok:" in capsys.readouterr().out

    config = json.loads((export / "config.json").read_text())
    config["reward_mean"] = 123.0
    (export / "config.json").write_text(json.dumps(config))
    (export / "extra.bin").write_bytes(b"x")
    problems = verify_export(export)
    assert any(p.startswith("export file changed: config.json") for p in problems)
    assert "export file not in manifest: extra.bin" in problems
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["verify", str(export)])
    assert exit_info.value.code != 0
    assert "export file changed: config.json" in capsys.readouterr().out


def test_verify_rehashes_recorded_inputs(exported, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(exported / "models" / "export", export)
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    input_file = project / "data" / "pairs.parquet"
    input_file.write_bytes(b"original bytes")
    manifest = read_manifest(export)
    import hashlib
    manifest["inputs"] = {"data/pairs.parquet": {"md5": hashlib.md5(b"original bytes").hexdigest(), "size": 14, "stage": "aggregate"}}
    (export / "lineage.json").write_text(json.dumps(manifest))
    assert verify_export(export, project) == []
    input_file.write_bytes(b"changed bytes")
    assert verify_export(export, project) == [
        f"input changed since export: data/pairs.parquet (md5 {hashlib.md5(b'changed bytes').hexdigest()}, "
        f"recorded {hashlib.md5(b'original bytes').hexdigest()})"]


def test_lineage_and_score_commands(exported, tmp_path, capsys):
    export = exported / "models" / "export"
    cli_main(["lineage", str(export)])
    out = capsys.readouterr().out
    assert "export files (sha256):" in out and "model.safetensors" in out
    golden = load_golden(export)[:3]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"prompt": json.loads(g["prompt"]), "response": g["response"]}) for g in golden)
                    + "\n" + json.dumps({"prompt": "hi", "chosen": "hello there", "rejected": "go away"}) + "\n")
    cli_main(["score", str(export), "--input", str(rows), "--output", str(tmp_path / "scores.jsonl")])
    scored = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [abs(s["reward"] - g["reward"]) <= 1e-4 for s, g in zip(scored, golden)] == [True] * 3
    assert scored[3]["margin"] == pytest.approx(scored[3]["reward_chosen"] - scored[3]["reward_rejected"])
    assert scored[3]["prompt"] == "hi" and scored[0]["prompt"] == json.loads(golden[0]["prompt"])  # echoed as given
    rows.write_text('{"response": "no prompt"}\n')
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["score", str(export), "--input", str(rows)])
    assert exit_info.value.code == 2 and "rows.jsonl:1" in capsys.readouterr().err


def test_crash_mid_export_leaves_previous_export_intact(exported, tmp_path, monkeypatch):
    project = tmp_path / "project"
    shutil.copytree(exported, project)
    before = {p.name: p.read_bytes() for p in (project / "models" / "export").iterdir()}

    def crash(*args, **kwargs):
        raise RuntimeError("injected crash while writing the model card")

    monkeypatch.setattr(rmpipe.export.export, "model_card", crash)
    monkeypatch.chdir(project)
    with pytest.raises(RuntimeError, match="injected crash"):
        export_stage.run()
    after = {p.name: p.read_bytes() for p in (project / "models" / "export").iterdir()}
    assert after == before
    assert not [p for p in (project / "models").iterdir() if p.name.startswith(".")]  # no temp folder left


def test_pad_equal_to_eos_gets_a_dedicated_export_pad(tmp_path, monkeypatch):
    """The SmolLM2 trap: pad == eos == <|im_end|>, which every rendered row contains."""
    src = save_reward_model(tmp_path / "src", pad_equals_eos=True)
    project = make_project(tmp_path / "project", src)
    monkeypatch.chdir(project)
    evaluate_stage.run()
    manifest = export_stage.run()
    tokenizer = AutoTokenizer.from_pretrained(project / "models" / "export")
    hf = AutoModelForSequenceClassification.from_pretrained(project / "models" / "export")
    assert tokenizer.pad_token == EXPORT_PAD != tokenizer.eos_token
    assert hf.config.pad_token_id == tokenizer.pad_token_id
    assert hf.get_input_embeddings().num_embeddings > tokenizer.pad_token_id
    assert manifest["parity"]["max_abs_diff"] <= 1e-4 and not manifest["parity"]["pad_in_text"]
    # Rows whose last real token is eos (templates that end a turn with it): with pad == eos, plain
    # transformers would skip those tokens and score an earlier one; the dedicated pad keeps parity.
    golden = load_golden(project / "models" / "export")
    rows, _ = encode_rows(tokenizer, [g["prompt"] for g in golden], [g["response"] for g in golden], 120)
    rows = [row + [tokenizer.eos_token_id] for row in rows]
    model, _ = load_checkpoint(project / "models" / "reward_model")
    trained = score_token_rows(model, rows, 0, 8)
    exported_rewards = score_token_rows(reward_fn_of(hf.eval()), rows, tokenizer.pad_token_id, 8)
    assert abs(exported_rewards - trained).max() <= 1e-4
    hf.config.pad_token_id = tokenizer.eos_token_id  # what exporting SmolLM2's tokenizer as-is would do
    naive = score_token_rows(reward_fn_of(hf), rows, tokenizer.eos_token_id, 8)
    assert abs(naive - trained).max() > 1e-3


def test_the_gate_rescores_the_promoted_export_on_the_candidates_pairs(exported, tmp_path):
    """The prod model is scored the way it was exported (plain transformers), on the candidate's test split
    and battery; the same model judged against itself is never refused (b = c = 0)."""
    from rmpipe.export.promotion import Baseline, export_scores
    from rmpipe.evaluation.pathology import load_battery

    test = make_pairs(12, seed=2)
    battery = load_battery(BATTERY)
    prod = export_scores(exported / "models" / "export", test, battery, 8)
    assert prod.correct.shape == (12,) and set(prod.battery) == {r["name"] for r in battery}
    s = ExportSettings(out_dir=tmp_path / "export", promoted_dir=tmp_path / "promoted", parity_tolerance=1e-4,
                       golden_pairs=4, promotion_tolerance=0.0)
    itself = promotion_decision({"accuracy": float(prod.correct.mean()), "passed": True, "checks": {}}, prod,
                                Baseline(prod, None, "models/export"), s)
    assert itself["promoted"] and itself["paired_test"]["b"] == itself["paired_test"]["c"] == 0
    assert itself["battery"]["regressions"] == []


def test_export_scored_grouped_by_prompt_equals_the_plain_path(exported):
    """The promotion gate re-scores the promoted export grouped by prompt, through its own backbone + head."""
    from rmpipe.evaluation.evaluate import packed_reward_model, score_pairs_grouped
    from test_evaluate import grouped_pairs

    export = exported / "models" / "export"
    hf = AutoModelForSequenceClassification.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert packed_reward_model(hf) is not None  # the packed view exists: the grouped path really runs
    pairs = grouped_pairs()
    rows, _ = encode_rows(tokenizer, list(pairs["prompt"]) * 2, list(pairs["chosen"]) + list(pairs["rejected"]), 128)
    plain = score_token_rows(reward_fn_of(hf), rows, tokenizer.pad_token_id, 8)
    r_c, r_r, _ = score_pairs_grouped(hf, tokenizer, pairs, 128, batch_size=4)
    assert np.abs(np.concatenate([r_c, r_r]) - plain).max() < 1e-5


def test_passing_model_is_promoted_then_one_that_fails_evaluation_is_not(exported, tmp_path, monkeypatch):
    project = tmp_path / "project"
    shutil.copytree(exported, project)
    monkeypatch.chdir(project)
    metrics_file = project / "reports" / "eval.json"  # the whole evaluation: what export reads
    metrics = json.loads(metrics_file.read_text())
    metrics_file.write_text(json.dumps({**metrics, "passed": True}))
    first = export_stage.run()
    promoted = project / "models" / "promoted"
    assert first["promotion"]["promoted"] and (promoted / "model.safetensors").exists()
    assert verify_export(promoted) == []  # the promoted copy carries the same manifest
    assert json.loads((promoted / "promotion.json").read_text())["reason"].startswith("passed; no previously promoted model")

    # the same model again: compared with the promoted copy on the same pairs, identical, promoted
    again = export_stage.run()
    assert again["promotion"]["promoted"] and again["promotion"]["paired_test"]["c"] == 0

    metrics_file.write_text(json.dumps({**metrics, "passed": False, "checks": {"padding_canary": False}}))
    second = export_stage.run()
    assert not second["promotion"]["promoted"] and second["promotion"]["reason"] == "evaluation failed: padding_canary"
    assert read_manifest(promoted)["created_at"] == again["created_at"]  # the promoted model stayed


def test_the_manuals_snippet_scores_like_rmpipe_score(exported, tmp_path, capsys):
    """The manual's transformers block (docs/pipeline.md), run as written on an export, gives `rmpipe score`'s reward."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "docs" / "pipeline.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "AutoModelForSequenceClassification" in b]
    export = exported / "models" / "export"
    namespace: dict = {}
    exec(block.replace('"models/export"', repr(str(export))), namespace)
    printed = capsys.readouterr()
    assert printed.out == f"reward {namespace['reward']:.4f}\n"  # the snippet says what it computed, nothing else
    assert "Loading weights" not in printed.err

    chat = namespace["chat"]
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": chat[0]["content"], "response": chat[1]["content"]}) + "\n")
    cli_main(["score", str(export), "--input", str(rows)])
    (scored,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert scored["prompt"] == chat[0]["content"]
    assert abs(namespace["reward"] - scored["reward"]) <= 1e-4
    # Without the chat template the reward differs: the README's rendering is what makes them agree.
    raw = namespace["tokenizer"](chat[0]["content"] + chat[1]["content"], return_tensors="pt")
    assert abs(namespace["model"](**raw).logits[0, 0].item() - scored["reward"]) > 1e-3
