"""LoRA reward models (train.lora, PEFT): settings, learning, resume, 2 ranks, and the exports (merged: plain
transformers; adapter: PEFT on the backbone) scoring like the trained, still-adapted model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from test_evaluate import ROOT, save_reward_model
from test_export import make_project as make_export_project
from test_train import (
    MAX_LENGTH,
    TINY,
    loss_curve,
    make_pairs,
    make_project,
    paths_in,
    run_stage,
    set_train,
    weights,
)
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from rmpipe.core.errors import ConfigError
from rmpipe.core.params import load_params
from rmpipe.core.settings import LoraSettings, ModelSettings, TrainSettings
from rmpipe.evaluation.evaluate import reward_fn_of, score_token_rows
from rmpipe.export.adapter import load_adapter
from rmpipe.export.hf import EXPORT_PAD, load_golden
from rmpipe.model.backbones import build_tiny_backbone
from rmpipe.model.lora import is_adapted, trainable_parameters, with_adapters
from rmpipe.model.render import encode_rows
from rmpipe.model.reward_model import RewardModel
from rmpipe.training.checkpoint import find_resumable, fingerprint
from stages import evaluate as evaluate_stage
from stages import export as export_stage
from stages.train import run

LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


# --- settings ---------------------------------------------------------------------------------
@pytest.mark.parametrize("lora, message", [
    ({"r": -1}, "'train.lora.r' must be at least 0, got -1"),
    ({"r": 4, "alpha": 0}, "'train.lora.alpha' must be greater than 0"),
    ({"r": 4, "target_modules": []}, "'train.lora.target_modules' is empty"),
    ({"rank": 4}, "'train.lora.rank' is not a setting rmpipe knows"),
])
def test_bad_lora_settings_are_one_line_errors(lora, message):
    train = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as caught:
        TrainSettings.from_section({**train, "lora": lora})
    assert "\n" not in str(caught.value)
    assert TrainSettings.from_section(train).lora.r == 0  # the shipped default: full fine-tuning


def test_unknown_target_module_names_the_backbones_linear_layers(tmp_path):
    model, _ = load_reward_model(save_reward_model(tmp_path))
    with pytest.raises(ConfigError, match=r"\['qkv'\].*use some of \[.*'q_proj'.*'v_proj'\]"):
        with_adapters(model, LoraSettings(r=4, target_modules=("q_proj", "qkv")))
    assert not is_adapted(model.backbone)


def load_reward_model(folder: Path) -> tuple[RewardModel, object]:
    return RewardModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


# --- training ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    """test_train's tiny backbone (built from its toy pairs)."""
    texts = pd.concat([make_pairs(64, 0).chosen, make_pairs(64, 0).rejected]).tolist()
    return build_tiny_backbone(texts, ModelSettings.from_section({"max_length": MAX_LENGTH, "tiny": TINY}),
                               tmp_path_factory.mktemp("backbone"))


def test_lora_trains_adapters_and_head_only_and_lowers_the_loss(tmp_path, backbone):
    project = make_project(tmp_path, backbone, epochs=3, lr=1e-2, lora=LORA)
    record = run(str(project / "params.yaml"), paths_in(project))
    losses = loss_curve(project)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1
    assert record["trainable_parameters"] < record["total_parameters"] / 10
    # models/reward_model: a plain backbone with the adapters merged, the head trained, the adapter beside it
    out = project / "models/reward_model"
    assert (out / "adapter/adapter_config.json").exists()
    merged = RewardModel.from_pretrained(out)
    before = RewardModel.from_pretrained(out).backbone.__class__.from_pretrained(backbone)
    changed = {k for k, v in merged.backbone.state_dict().items() if not torch.equal(v, before.state_dict()[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    assert json.loads((out / "training.json").read_text())["params"]["train"]["lora"]["r"] == 4


def test_killed_lora_run_resumes_to_identical_weights(tmp_path, backbone):
    straight = make_project(tmp_path / "straight", backbone, lora=LORA)
    run(str(straight / "params.yaml"), paths_in(straight))
    killed = make_project(tmp_path / "killed", backbone, lora=LORA, checkpoint_every=4, stop_after_steps=6)
    assert run(str(killed / "params.yaml"), paths_in(killed)) is None
    saved = torch.load(killed / "checkpoints/train/step4/mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert saved and all(".lora_" in k or k == "head.weight" for k in saved)  # adapters + head, no frozen backbone
    set_train(killed, stop_after_steps=None)
    record = run(str(killed / "params.yaml"), paths_in(killed))
    a, b = weights(straight), weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    # the LoRA settings are in the fingerprint: a checkpoint of another rank is never resumed
    set_train(killed, lora={**LORA, "r": 8})
    assert find_resumable(killed / "checkpoints/train", record["fingerprint"]) is not None
    assert fingerprint_of(killed, backbone) != record["fingerprint"]


def fingerprint_of(project: Path, backbone_dir: Path) -> str:
    params = load_params(project / "params.yaml")
    return fingerprint(ModelSettings.parse(params), TrainSettings.parse(params), project / "data/split/train.parquet",
                       backbone_dir, 1)


@pytest.mark.slow
def test_two_rank_zero2_lora_run_completes(tmp_path, backbone):
    project = make_project(tmp_path, backbone, epochs=1, num_procs=2, zero_stage=2, lora=LORA)
    done = run_stage(project, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    training = json.loads((project / "models/reward_model/training.json").read_text())
    assert training["world_size"] == 2 and training["params"]["train"]["lora"]["r"] == 4
    assert (project / "models/reward_model/adapter/adapter_model.safetensors").exists()


@pytest.mark.slow
def test_lora_on_smollm2_lowers_the_loss(tmp_path):
    """The real SFT backbone (its pad is its EOS, 30 layers of grouped-query attention), r = 4 on q and v."""
    from rmpipe.model import backbones

    backbones.ignore_from_git(ROOT / "models/.cache")
    smollm2 = backbones.materialize_smollm2(ROOT / backbones.SMOLLM2_CACHE)
    project = make_project(tmp_path, smollm2, n_train=16, n_val=8, epochs=3, lr=2e-3, lora=LORA)
    record = run(str(project / "params.yaml"), paths_in(project))
    losses = loss_curve(project)
    assert len(losses) == 6 and sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.05, losses
    assert record["trainable_parameters"] < record["total_parameters"] / 100


# --- export -----------------------------------------------------------------------------------
def adapted_reward_model(folder: Path) -> tuple[Path, Path, RewardModel]:
    """A tiny reward model with LoRA adapters that change its rewards (B != 0), saved like the train stage saves
    one; pad == eos, so the export adds its own pad and the adapter's base grows by that row."""
    plain = save_reward_model(folder, pad_equals_eos=True)
    model = RewardModel.from_backbone(AutoModel.from_pretrained(folder / "_backbone"), seed=0)
    model = with_adapters(model, LoraSettings(**LORA))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    trainable, total = trainable_parameters(model)
    assert 0 < trainable < total
    out = folder / "lora_model"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(plain).save_pretrained(out)
    (out / "training.json").write_text(json.dumps({"params": {"train": {"lora": LORA}}, "trainable_parameters": trainable,
                                                   "total_parameters": total}))
    return out, folder / "_backbone", model.eval()


@pytest.fixture(scope="module")
def lora_export(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    model_dir, backbone_dir, adapted = adapted_reward_model(src)
    project = make_export_project(tmp_path_factory.mktemp("project"), model_dir)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["model"]["backbone"] = str(backbone_dir)
    params["export"]["save_adapter"] = True
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        evaluate_stage.run()
        manifest = export_stage.run()
    return project, backbone_dir, adapted, manifest


def golden_token_rows(export_dir: Path, tokenizer) -> list[list[int]]:
    golden = load_golden(export_dir)
    return encode_rows(tokenizer, [g["prompt"] for g in golden], [g["response"] for g in golden], 128)[0]


def test_merged_export_loads_in_plain_transformers_and_scores_like_the_adapted_model(lora_export):
    project, _, adapted, manifest = lora_export
    export = project / "models/export"
    hf = AutoModelForSequenceClassification.from_pretrained(export).eval()  # no PEFT involved
    assert not any("lora" in k for k in hf.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert tokenizer.pad_token == EXPORT_PAD
    rows = golden_token_rows(export, tokenizer)
    with torch.no_grad():
        trained = score_token_rows(adapted, rows, 0, 8)  # the unmerged, adapted model (mask-pooled: any pad id)
        exported = score_token_rows(reward_fn_of(hf), rows, tokenizer.pad_token_id, 8)
        base = score_token_rows(RewardModel.from_backbone(AutoModel.from_pretrained(lora_export[1]), seed=0).eval(),
                                rows, 0, 8)
    assert abs(exported - trained).max() <= 1e-4
    assert abs(base - trained).max() > 1e-2  # the adapters matter: a merge that dropped them would fail above
    assert manifest["parity"]["max_abs_diff"] <= 1e-4
    card = (export / "README.md").read_text()
    assert "LoRA r=4" in card and "q_proj, v_proj" in card


def test_adapter_export_loads_with_peft_on_the_backbone_and_matches(lora_export):
    project, backbone_dir, adapted, manifest = lora_export
    adapter_dir = project / "models/export/adapter"
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    model, tokenizer, _ = load_adapter(adapter_dir, backbone_dir)
    rows = golden_token_rows(project / "models/export", tokenizer)
    with torch.no_grad():
        trained = score_token_rows(adapted, rows, 0, 8)
        peft_scored = score_token_rows(reward_fn_of(model), rows, tokenizer.pad_token_id, 8)
    assert abs(peft_scored - trained).max() <= 1e-4
    assert manifest["parity"]["adapter"]["max_abs_diff"] <= 1e-4


def test_save_adapter_without_lora_is_a_clear_error(tmp_path, monkeypatch):
    project = make_export_project(tmp_path / "project", save_reward_model(tmp_path / "src"))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["model"]["backbone"] = str(tmp_path / "src/_backbone")
    params["export"]["save_adapter"] = True
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(project)
    evaluate_stage.run()
    with pytest.raises(Exception, match="holds no LoRA adapter: train with train.lora.r > 0"):
        export_stage.run()
    assert not (project / "models/export").exists() or not (project / "models/export/adapter").exists()
    shutil.rmtree(project, ignore_errors=True)


def test_an_adapter_folder_without_safetensors_weights_is_refused_before_peft_reads_it(tmp_path):
    """PEFT falls back to a pickled adapter_model.bin; rmpipe loads adapters from safetensors only."""
    from rmpipe.core.errors import DataError
    from rmpipe.export.adapter import safetensors_adapter

    (tmp_path / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(DataError, match="safetensors only"):
        safetensors_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    assert safetensors_adapter(tmp_path) == str(tmp_path)
