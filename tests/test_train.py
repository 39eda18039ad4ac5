"""The train stage on real DeepSpeed and real transformers (CPU): learning, resume, non-finite steps,
clean errors, and 2-rank ZeRO-2/3 runs that match one process."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from rmpipe.model.backbones import build_tiny_backbone
from rmpipe.training.checkpoint import find_resumable
from rmpipe.core.errors import ConfigError, DataError
from rmpipe.core.paths import ProjectPaths
from rmpipe.model.reward_model import RewardModel
from rmpipe.core.schema import canonical_prompt
from rmpipe.core.settings import ModelSettings, TrainSettings
from rmpipe.training.loop import LN2, stuck_at_ln2
from stages.train import run

ROOT = Path(__file__).resolve().parents[1]
MAX_LENGTH = 64
TINY = {"vocab_size": 320, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "seed": 0}
TOPICS = ["the moon", "tea", "rain", "chess", "bread", "owls", "maps", "rivers"]


def make_pairs(n: int, seed: int) -> pd.DataFrame:
    """Learnable toy preferences: a helpful answer beats a refusal, a rude reply or an off-topic one."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        chosen = f"Sure, {topic} is fun." + " More on it." * rng.randint(0, 3)
        rejected = rng.choice(["I cannot help.", "No, go away.", "Let us talk about cheese."])
        rows.append({"pair_id": f"p{seed}-{i}", "prompt": canonical_prompt(f"About {topic}? ({i})"),
                     "chosen": chosen, "rejected": rejected, "margin": 0.0, "soft_label": 1.0})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    texts = pd.concat([make_pairs(64, 0).chosen, make_pairs(64, 0).rejected]).tolist()
    return build_tiny_backbone(texts, ModelSettings.from_section({"max_length": MAX_LENGTH, "tiny": TINY}), tmp_path_factory.mktemp("backbone"))


def make_project(folder: Path, backbone: Path, n_train: int = 48, n_val: int = 16, **train) -> Path:
    """A project folder: data/split/*.parquet and a params.yaml (model -> `backbone`, train overrides)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update({"backbone": str(backbone), "max_length": MAX_LENGTH, "head_init": "normal"})
    params["train"].update({"epochs": 2, "lr": 3e-3, "warmup_ratio": 0.1, "tokens_per_batch": 1024,
                            "max_pairs_per_batch": 8, "checkpoint_every": 1000, "zero_stage": 0, **train})
    (folder / "data/split").mkdir(parents=True, exist_ok=True)
    make_pairs(n_train, 1).to_parquet(folder / "data/split/train.parquet")
    make_pairs(n_val, 2).to_parquet(folder / "data/split/val.parquet")
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    return folder


def paths_in(folder: Path) -> ProjectPaths:
    return ProjectPaths.at(folder)


def set_train(folder: Path, **train) -> None:
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["train"].update(train)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))


def loss_curve(folder: Path) -> list[float]:
    table = pd.read_csv(folder / "dvclive/train/plots/metrics/train/loss.tsv", sep="\t")
    return table["loss"].tolist()


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return RewardModel.from_pretrained(folder / "models/reward_model").state_dict()


# --- single process, in this process ---------------------------------------------------------
def test_training_lowers_loss_and_writes_outputs(tmp_path, backbone):
    project = make_project(tmp_path, backbone, epochs=3)
    record = run(str(project / "params.yaml"), paths_in(project))

    losses = loss_curve(project)
    assert len(losses) >= 9  # 48 pairs at <= 8 per batch, 3 epochs
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1
    training = json.loads((project / "models/reward_model/training.json").read_text())
    metrics = json.loads((project / "metrics/train.json").read_text())
    assert training["steps"] == metrics["steps"] == len(losses)
    assert metrics["val_accuracy"] >= 0.75 and metrics["truncated_pairs"] == 0
    assert training["fingerprint"] == record["fingerprint"]
    # the folder reloads with its tokenizer beside the weights
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(project / "models/reward_model").pad_token == "<|pad|>"
    model = RewardModel.from_pretrained(project / "models/reward_model")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_killed_run_resumes_to_identical_weights(tmp_path, backbone):
    straight = make_project(tmp_path / "straight", backbone)
    run(str(straight / "params.yaml"), paths_in(straight))

    killed = make_project(tmp_path / "killed", backbone, checkpoint_every=4, stop_after_steps=6)
    assert run(str(killed / "params.yaml"), paths_in(killed)) is None  # "killed" after step 6, last checkpoint at 4
    assert (killed / "checkpoints/train/latest").read_text() == "step4"
    assert not (killed / "models/reward_model").exists()
    # a kill in the middle of writing the next checkpoint leaves a partial folder that `latest` never names
    (killed / "checkpoints/train/step8").mkdir()
    (killed / "checkpoints/train/step8/mp_rank_00_model_states.pt").write_bytes(b"truncated")
    set_train(killed, stop_after_steps=None)
    record = run(str(killed / "params.yaml"), paths_in(killed))

    training = json.loads((killed / "models/reward_model/training.json").read_text())
    assert training["resumed_from_step"] == 4
    a, b = weights(straight), weights(killed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    # a checkpoint made under other params or data is never resumed
    assert find_resumable(killed / "checkpoints/train", record["fingerprint"]) is not None
    assert find_resumable(killed / "checkpoints/train", "0" * 64) is None

    # killed inside the last epoch: the checkpoint carries that epoch's sums, so the resumed run reports the
    # same train metrics as the run never killed (not those of the resumed part of the epoch alone)
    late = make_project(tmp_path / "late", backbone, checkpoint_every=4, stop_after_steps=10)
    run(str(late / "params.yaml"), paths_in(late))
    assert (late / "checkpoints/train/latest").read_text() == "step8"  # 6 batches an epoch: epoch 2, batch 3
    set_train(late, stop_after_steps=None)
    run(str(late / "params.yaml"), paths_in(late))
    straight_run = json.loads((straight / "models/reward_model/training.json").read_text())
    for folder in (killed, late):
        resumed = json.loads((folder / "models/reward_model/training.json").read_text())
        assert (resumed["train"], resumed["val"], resumed["steps"]) == (
            straight_run["train"], straight_run["val"], straight_run["steps"])
    c = weights(late)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_loop_state_saves_and_restores_every_field():
    """A checkpoint restores the whole loop state: each field survives state_dict -> JSON -> load_state_dict.
    A field left out of state_dict (or not restored) turns this red."""
    from dataclasses import fields

    from rmpipe.training.checkpoint import LoopState

    state = LoopState(epoch=1, next_batch=2, step=8, skipped=1, losses=[0.7, 0.5], ln2_history=[(0.69, 0.01)],
                      epoch_loss=3.5, epoch_correct=9.0, epoch_pairs=16.0, epoch_weight=14.0,
                      train={"loss": 0.4, "accuracy": 0.8}, val={"loss": 0.5, "accuracy": 0.75},
                      tokens=1234.0, pairs=64.0, busy_s=2.5)
    restored = LoopState()
    restored.load_state_dict(json.loads(json.dumps(state.state_dict())))
    assert "resumed_from_step" not in state.state_dict()
    for f in fields(LoopState):
        if f.name != "resumed_from_step":
            assert getattr(restored, f.name) == getattr(state, f.name) != getattr(LoopState(), f.name), f.name
    assert restored.resumed_from_step == 8
    restored.end_epoch()
    assert restored.train == {"loss": 3.5 / 14.0, "accuracy": 9.0 / 16.0} and restored.epoch_pairs == 0.0


def test_nonfinite_loss_skips_step_then_aborts(tmp_path, backbone):
    project = make_project(tmp_path, backbone, use_margin=True, max_nonfinite_steps=3, epochs=1)
    frame = pd.read_parquet(project / "data/split/train.parquet")
    frame.loc[0, "margin"] = float("nan")  # one bad pair poisons exactly one batch per epoch
    frame.to_parquet(project / "data/split/train.parquet")
    run(str(project / "params.yaml"), paths_in(project))
    training = json.loads((project / "models/reward_model/training.json").read_text())
    assert training["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in weights(project).values())

    frame["margin"] = float("nan")  # every batch bad: abort after max_nonfinite_steps
    frame.to_parquet(project / "data/split/train.parquet")
    with pytest.raises(DataError, match="non-finite"):
        run(str(project / "params.yaml"), paths_in(project))


def test_ln2_anchor_detects_identical_scores_only():
    stuck = [(LN2, 0.0)] * 8
    assert stuck_at_ln2(stuck)
    assert not stuck_at_ln2(stuck[:7])  # too early to tell
    assert not stuck_at_ln2([(LN2, 0.0)] * 7 + [(0.6, 0.3)])  # it learned
    assert not stuck_at_ln2([(LN2, 1e-3)] * 8)  # ln 2 by chance, but scores differ: pooling works


def test_too_long_max_length_is_refused_before_compute(tmp_path, backbone):
    project = make_project(tmp_path, backbone)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["model"]["max_length"] = 4 * MAX_LENGTH
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=f"at most {MAX_LENGTH} positions"):
        run(str(project / "params.yaml"), paths_in(project))


# --- the stage as a user runs it: clean errors, no traceback ---------------------------------
def run_stage(cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "CI": "1"}
    return subprocess.run([sys.executable, "-m", "stages.train"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("breakage, message", [
    ("no_splits", "dvc repro split"),
    ("empty_train", "holds no pairs"),
    ("bad_backbone", "could not load backbone"),
])
def test_stage_errors_are_one_clean_line(tmp_path, backbone, breakage, message):
    project = make_project(tmp_path, backbone)
    if breakage == "no_splits":
        (project / "data/split/train.parquet").unlink()
    elif breakage == "empty_train":
        make_pairs(0, 0).reindex(columns=make_pairs(1, 0).columns).to_parquet(project / "data/split/train.parquet")
    elif breakage == "bad_backbone":
        broken = tmp_path / "broken_backbone"
        broken.mkdir()
        (broken / "config.json").write_text("{ not json")
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["model"]["backbone"] = str(broken)
        (project / "params.yaml").write_text(yaml.safe_dump(params))
    done = run_stage(project)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not (project / "checkpoints").exists()  # nothing computed


# --- two CPU ranks through the DeepSpeed launcher ---------------------------------------------
@pytest.fixture(scope="module")
def one_process(tmp_path_factory, backbone) -> Path:
    project = make_project(tmp_path_factory.mktemp("one_rank"), backbone, epochs=1, lr=1e-3)
    run(str(project / "params.yaml"), paths_in(project))
    return project


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_ranks_match_one_process(tmp_path, backbone, one_process, zero_stage):
    """Same global batches (each rank takes every 2nd pair of each, its loss weighted by its share),
    so the per-step loss averaged over ranks must follow the one-process curve."""
    project = make_project(tmp_path, backbone, epochs=1, lr=1e-3, num_procs=2, zero_stage=zero_stage)
    done = run_stage(project, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    curve, one_process_curve = loss_curve(project), loss_curve(one_process)
    assert len(curve) == len(one_process_curve)
    # fp32 with a different summation order (gloo all-reduce of two half-batch gradients): 1e-4 absolute
    assert max(abs(a - b) for a, b in zip(curve, one_process_curve)) < 1e-4, (curve, one_process_curve)
    training = json.loads((project / "models/reward_model/training.json").read_text())
    assert training["world_size"] == 2
    assert all(math.isfinite(v) for v in curve)
    # the saved model is whole (ZeRO-3 gathers its partitions before saving) and the same model
    a, b = weights(one_process), weights(project)
    assert all(a[k].shape == b[k].shape for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


# --- the generated DeepSpeed config ----------------------------------------------------------
def test_ds_config_from_params(tmp_path):
    from torch import nn

    from rmpipe.training.ds_config import bf16_wanted, build_config, load_config, param_groups

    cfg = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]
    assert not bf16_wanted("auto", "cpu") and not bf16_wanted(True, "cpu")  # never on CPU
    ds = build_config(TrainSettings.from_section({**cfg, "zero_stage": 3, "offload_optimizer": True}), world_size=2,
                      bf16=False)
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}}
    assert ds["train_micro_batch_size_per_gpu"] == 1 and ds["gradient_accumulation_steps"] == 1
    assert ds["train_batch_size"] == 2 and ds["gradient_clipping"] == cfg["grad_clip"]
    assert "scheduler" not in ds  # rmpipe's own schedule goes to deepspeed.initialize
    with pytest.raises(ConfigError, match="offload_optimizer"):  # refused where the section is parsed
        TrainSettings.from_section({**cfg, "zero_stage": 0, "offload_optimizer": True})

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="batches by tokens"):
        load_config(user, world_size=1)
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}}))
    assert load_config(user, world_size=2)["train_batch_size"] == 2

    model = nn.Module()
    model.backbone = nn.Linear(4, 4)
    model.head = nn.Linear(4, 1, bias=False)
    groups = param_groups(model, lr=1e-3, weight_decay=0.1, head_lr_mult=10.0)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0, 0.1]  # matrices, bias, head
    assert groups[2]["lr"] == pytest.approx(1e-2) and groups[2]["params"] == [model.head.weight]


# --- packing and the tokenized cache ---------------------------------------------------------
def test_packing_changes_the_speed_not_the_model(tmp_path, backbone):
    """With a budget that does not bind, every layout sees the same batches: same curve, same weights."""
    projects = {mode: make_project(tmp_path / mode, backbone, packing=mode, tokens_per_batch=100_000)
                for mode in ("none", "shared_prompt")}
    records = {mode: run(str(p / "params.yaml"), paths_in(p)) for mode, p in projects.items()}
    assert records["shared_prompt"]["packing"] == "shared_prompt"
    curves = {mode: loss_curve(p) for mode, p in projects.items()}
    assert len(curves["none"]) == len(curves["shared_prompt"])
    assert max(abs(a - b) for a, b in zip(curves["none"], curves["shared_prompt"])) < 1e-4
    a, b = weights(projects["none"]), weights(projects["shared_prompt"])
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def make_ranked_pairs(n_prompts: int, seed: int) -> pd.DataFrame:
    """K = 4 responses per prompt, all 6 comparisons (what a ranked row aggregates to), with prompt hashes."""
    from rmpipe.core.schema import prompt_hash

    rng = random.Random(seed)
    rows = []
    for g in range(n_prompts):
        topic = rng.choice(TOPICS)
        prompt = canonical_prompt(f"About {topic}? ({seed}-{g})")
        ranked = [f"Sure, {topic} is fun." + " More on it." * rng.randint(1, 3), f"Sure, {topic}.",
                  "Let us talk about cheese.", "No, go away."]
        rows += [{"pair_id": f"g{seed}-{g}-{i}{j}", "prompt": prompt, "prompt_hash": prompt_hash(prompt),
                  "chosen": ranked[i], "rejected": ranked[j], "margin": 0.0, "soft_label": 1.0}
                 for i in range(4) for j in range(i + 1, 4)]
    return pd.DataFrame(rows)


def test_grouped_data_trains_with_groups_and_the_same_model(tmp_path, backbone):
    """Prompts with 6 comparisons each: auto picks `groups`; with one batch per epoch (a budget that does not
    bind) it trains the same curve and weights as the stacked layout; group weighting is another objective."""
    projects = {}
    for name, train in {"none": {"packing": "none"}, "auto": {"packing": "auto"},
                        "group_weighted": {"packing": "auto", "loss_weighting": "group"}}.items():
        project = make_project(tmp_path / name, backbone, tokens_per_batch=100_000, max_pairs_per_batch=64, **train)
        make_ranked_pairs(8, 1).to_parquet(project / "data/split/train.parquet")
        make_ranked_pairs(3, 2).to_parquet(project / "data/split/val.parquet")
        projects[name] = project
    records = {name: run(str(p / "params.yaml"), paths_in(p)) for name, p in projects.items()}
    assert records["auto"]["packing"] == "groups" and records["group_weighted"]["packing"] == "groups"
    curves = {name: loss_curve(p) for name, p in projects.items()}
    assert len(curves["none"]) == len(curves["auto"]) == 2
    assert max(abs(a - b) for a, b in zip(curves["none"], curves["auto"])) < 1e-4
    a, b = weights(projects["none"]), weights(projects["auto"])
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    # every prompt has 6 pairs, so group weighting is the same mean here: the same first step
    assert curves["group_weighted"][0] == pytest.approx(curves["auto"][0], abs=1e-5)


def test_group_weighting_changes_the_objective_where_groups_differ(tmp_path, backbone):
    train = pd.concat([make_ranked_pairs(4, 1), make_pairs(8, 3)], ignore_index=True)
    curves = {}
    for weighting in ("pair", "group"):
        project = make_project(tmp_path / weighting, backbone, tokens_per_batch=100_000, max_pairs_per_batch=64,
                               epochs=1, loss_weighting=weighting)
        train.to_parquet(project / "data/split/train.parquet")
        run(str(project / "params.yaml"), paths_in(project))
        curves[weighting] = loss_curve(project)
    assert abs(curves["pair"][0] - curves["group"][0]) > 1e-4


def test_tokenized_cache_used_when_it_matches_and_never_when_stale(tmp_path, backbone, caplog):
    import logging

    from rmpipe.core.paths import ProjectPaths
    from stages.tokenize import run as tokenize_stage

    fresh = make_project(tmp_path / "fresh", backbone)
    run(str(fresh / "params.yaml"), paths_in(fresh))
    cached = make_project(tmp_path / "cached", backbone)
    assert tokenize_stage(str(cached / "params.yaml"), ProjectPaths.at(cached)) == {"train": 48, "val": 16}
    with caplog.at_level(logging.INFO, logger="rmpipe.tokenized"):
        run(str(cached / "params.yaml"), paths_in(cached))
    assert "using tokenized splits" in caplog.text
    assert loss_curve(cached) == pytest.approx(loss_curve(fresh), abs=1e-6)  # the same ids either way

    # new split data: the cache no longer describes it, so training tokenizes afresh and says why
    make_pairs(40, 7).to_parquet(cached / "data/split/train.parquet")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rmpipe.tokenized"):
        record = run(str(cached / "params.yaml"), paths_in(cached))
    assert "stale (splits changed)" in caplog.text and "using tokenized splits" not in caplog.text
    assert record["train_pairs"] == 40


def test_lr_schedule_learns_from_the_first_step_and_ends_at_the_floor():
    from rmpipe.training.ds_config import warmup_cosine

    lrs = [warmup_cosine(step, total_steps=20, warmup=4) for step in range(20)]
    assert lrs[0] == pytest.approx(1 / 5)  # DeepSpeed's WarmupCosineLR gave the first two steps lr 0
    assert lrs[:5] == sorted(lrs[:5]) and lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] == pytest.approx(0.1)


def test_logged_lr_and_grad_norm_are_the_real_ones(tmp_path, backbone):
    project = make_project(tmp_path, backbone, epochs=1)
    run(str(project / "params.yaml"), paths_in(project))
    metrics = project / "dvclive/train/plots/metrics/train"
    lr = pd.read_csv(metrics / "lr.tsv", sep="\t")["lr"].tolist()
    grad_norm = pd.read_csv(metrics / "grad_norm.tsv", sep="\t")["grad_norm"].tolist()
    assert lr[0] > 0 and max(lr) == pytest.approx(3e-3)
    assert all(g > 0 and math.isfinite(g) for g in grad_norm)


def test_damaged_tokenized_cache_is_stale_not_a_crash(tmp_path):
    from rmpipe.model import tokenized

    (tmp_path / tokenized.MANIFEST).write_text("{ truncated")
    assert "unreadable" in tokenized.stale_reason(tmp_path, {"max_length": 64})
    assert "no tokenized cache" in tokenized.stale_reason(tmp_path / "missing", {"max_length": 64})


# --- the resume fingerprint: each input it promises to cover ---------------------------------
def other_value(settings, name: str):
    """A different valid value for field `name` of a settings object (another choice, a flipped bool, ...)."""
    import typing

    value, annotation = getattr(settings, name), type(settings).model_fields[name].annotation
    args = typing.get_args(annotation)
    choices = [c for arg in (annotation, *args) if typing.get_origin(arg) is typing.Literal
               for c in typing.get_args(arg) if c != value and not isinstance(c, bool)]
    if isinstance(value, bool) or value == "auto" and bool in args:  # bf16: auto -> false
        return not value if isinstance(value, bool) else False
    if choices:
        return choices[0]
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.5 if value < 0.5 else value / 2
    if value is None:
        return 1 if int in args else "changed.json"
    return f"{value}-changed"


def test_fingerprint_changes_with_each_input_and_gates_resume(tmp_path, backbone, monkeypatch):
    """Resume only with the same params, data, backbone, world size and code: each one moves the fingerprint,
    and find_resumable refuses a checkpoint whose recorded fingerprint differs.
    Mutations tried: dropping `world_size` from the fingerprint's blob, and TRAINING_CODE without
    rmpipe/model/tokenized.py, each turn this test red."""
    import shutil

    from rmpipe.training import checkpoint
    from rmpipe.training.checkpoint import LATEST, NOT_FINGERPRINTED, STATE_FILE, TRAINING_CODE, fingerprint

    project = make_project(tmp_path / "p", backbone)
    params = yaml.safe_load((project / "params.yaml").read_text())
    model_s, train_s = ModelSettings.parse(params), TrainSettings.parse(params)
    split = project / "data/split/train.parquet"
    bb = tmp_path / "bb"
    shutil.copytree(backbone, bb)
    code_root = tmp_path / "code"
    for rel in TRAINING_CODE:
        (code_root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, code_root / rel)
    monkeypatch.setattr(checkpoint, "CODE_ROOT", code_root)

    def fp(world: int = 1, model: ModelSettings = model_s, train: TrainSettings = train_s) -> str:
        return fingerprint(model, train, split, bb, world)

    base = fp()
    assert fp() == base  # a pure function of its inputs
    changed = {}
    changed["world size"] = fp(world=2)
    for name in TrainSettings.model_fields:  # every field of both sections, one at a time
        if name in NOT_FINGERPRINTED:
            assert fp(train=train_s.model_copy(update={name: other_value(train_s, name)})) == base, name
        else:
            changed[f"train.{name}"] = fp(train=train_s.model_copy(update={name: other_value(train_s, name)}))
    for name in set(ModelSettings.model_fields) - {"tiny"}:  # model.tiny: field by field below
        changed[f"model.{name}"] = fp(model=model_s.model_copy(update={name: other_value(model_s, name)}))
    for name in type(model_s.tiny).model_fields:
        tiny = model_s.tiny.model_copy(update={name: other_value(model_s.tiny, name)})
        changed[f"model.tiny.{name}"] = fp(model=model_s.model_copy(update={"tiny": tiny}))
    assert "checkpoint_every" in NOT_FINGERPRINTED and set(NOT_FINGERPRINTED) <= set(TrainSettings.model_fields)

    def flip_last_byte(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))

    original = split.read_bytes()
    flip_last_byte(split)
    changed["train split"] = fp()
    split.write_bytes(original)
    weights = bb / "model.safetensors"
    original = weights.read_bytes()
    flip_last_byte(weights)
    changed["backbone"] = fp()
    weights.write_bytes(original)
    assert fp() == base
    for rel in TRAINING_CODE:  # every module on the training path, stages/train.py and tokenized.py included
        source = code_root / rel
        original = source.read_bytes()
        source.write_bytes(original + b"\n# changed\n")
        changed[f"code {rel}"] = fp()
        source.write_bytes(original)
    assert {"stages/train.py", "rmpipe/model/tokenized.py"} <= set(TRAINING_CODE)
    assert [what for what, value in changed.items() if value == base] == []
    assert len(set(changed.values())) == len(changed)

    # find_resumable takes a checkpoint only when its recorded fingerprint is the current one
    folder = tmp_path / "checkpoints"
    (folder / "step4").mkdir(parents=True)
    (folder / LATEST).write_text("step4")
    (folder / "step4" / STATE_FILE).write_text(json.dumps({"fingerprint": base, "step": 4}))
    assert find_resumable(folder, base) == "step4"
    assert [what for what, value in changed.items() if find_resumable(folder, value) is not None] == []


def test_fingerprint_code_is_the_train_stage_code_deps():
    """TRAINING_CODE and train's code deps in dvc.yaml name the same modules (both are the train stage's
    import closure, rmpipe.core.codedeps): a module DVC re-runs train for is one a checkpoint must not be
    resumed across, and the other way round.
    Mutation tried: removing rmpipe/model/tokenized.py from TRAINING_CODE turns this red."""
    from rmpipe.training.checkpoint import TRAINING_CODE

    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["deps"]
    assert sorted(d for d in deps if d.endswith(".py")) == sorted(TRAINING_CODE)
    assert all((ROOT / rel).is_file() for rel in TRAINING_CODE)


def test_a_dvclive_summary_cut_by_a_kill_is_rebuilt_from_its_plots_on_resume(tmp_path):
    """A SIGKILL while dvclive rewrote metrics.json (in place) left it empty, and the resumed run died in
    dvclive's JSON read (seen once in CI: test_reliability's SIGKILL test). Without the repair this fails."""
    from rmpipe.training.loop import _open_live

    live = _open_live(tmp_path, resumed=False)
    for step in range(3):
        live.log_metric("train/loss", 1.0 / (step + 1))
        live.next_step()
    live.end()
    expected = _open_live(tmp_path, resumed=True).step  # where dvclive resumes from a whole summary
    (tmp_path / "metrics.json").write_text('{"train": {"lo', encoding="utf-8")  # the kill, mid-write
    with (tmp_path / "plots" / "metrics" / "train" / "loss.tsv").open("a") as plot:
        plot.write("3\t0.2")  # and a plot line cut short
    assert _open_live(tmp_path, resumed=True).step == expected == 3


def test_the_deepspeed_config_files_contents_are_in_the_resume_fingerprint(tmp_path, monkeypatch):
    """Not only the path in train.deepspeed_config: an edit of the JSON itself stops a resume (issue 29, item 6).
    Mutation tried: fingerprinting the path string only turns this red."""
    from rmpipe.training.checkpoint import fingerprint

    monkeypatch.chdir(tmp_path)  # the stage runs in the project root; the param is relative to it
    split = tmp_path / "train.parquet"
    split.write_bytes(b"pairs")
    (tmp_path / "ds.json").write_text('{"optimizer": {"type": "AdamW", "params": {"lr": 0.001}}}')
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["deepspeed_config"] = "ds.json"
    model, train = ModelSettings.parse(params), TrainSettings.parse(params)
    before = fingerprint(model, train, split, "hub/model", 1)
    assert fingerprint(model, train, split, "hub/model", 1) == before
    (tmp_path / "ds.json").write_text('{"optimizer": {"type": "AdamW", "params": {"lr": 0.01}}}')
    assert fingerprint(model, train, split, "hub/model", 1) != before


def test_the_token_cache_key_holds_the_tokenizing_libraries_versions(tmp_path):
    """Tokens cached under another tokenizers/transformers version are re-made, the reason named."""
    from importlib.metadata import version
    from types import SimpleNamespace

    from rmpipe.model import tokenized

    split = tmp_path / "s.parquet"
    split.write_bytes(b"pairs")
    key = tokenized.cache_key("hub/model", SimpleNamespace(train_split=split, val_split=split), 64)
    assert key["libraries"] == {"tokenizers": version("tokenizers"), "transformers": version("transformers")}
    (tmp_path / tokenized.MANIFEST).write_text(json.dumps(
        {"key": {**key, "libraries": {**key["libraries"], "tokenizers": "0.0.1"}}}))
    assert tokenized.stale_reason(tmp_path, key) == f"tokenized cache at {tmp_path} is stale (libraries changed)"
    (tmp_path / tokenized.MANIFEST).write_text(json.dumps({"key": key}))
    assert tokenized.stale_reason(tmp_path, key) is None


def test_cpu_threads_per_rank_follow_omp_num_threads_where_set_else_split_the_cores(monkeypatch):
    from rmpipe.training.distributed import cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    cores = os.cpu_count() or 1
    assert cpu_threads(1) == cores
    assert cpu_threads(cores * 2) == 1  # never zero
    monkeypatch.setenv("LOCAL_SIZE", "2")
    assert cpu_threads(4) == max(1, cores // 2)  # the ranks on this node share its cores
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads(1) == 3  # the user's budget wins (a machine shared with other jobs)
    monkeypatch.setenv("OMP_NUM_THREADS", "0")
    assert cpu_threads(1) == max(1, cores // 2)  # not a budget: ignored
