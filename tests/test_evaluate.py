"""Evaluation metrics and the pathology battery, on small arrays and a tiny real Llama reward model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from transformers import AutoModel

from rmpipe.model.backbones import build_tiny_backbone
from rmpipe.core.errors import ConfigError, DataError
from rmpipe.evaluation.evaluate import (
    batch_scorer,
    evaluate_model,
    load_checkpoint,
    pad_batch,
    pad_id_of,
    pair_metrics,
    score_pairs,
)
from rmpipe.evaluation.pathology import battery_report, calibration, length_bias, load_battery, padding_canary
from rmpipe.model.render import encode_rows
from rmpipe.model.reward_model import RewardModel, bradley_terry_loss
from rmpipe.core.schema import canonical_prompt
from rmpipe.core.settings import EvalSettings, ModelSettings

ROOT = Path(__file__).resolve().parents[1]
BATTERY = ROOT / "data" / "battery.jsonl"
TINY_MODEL_CFG = {
    "max_length": 128,
    "tiny": {"vocab_size": 400, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1, "seed": 0},
}
WORDS = "the a cat dog sun rain tree river stone light small big green blue quick slow".split()


# --- fixtures: a tiny reward model in the train stage's folder layout ---------------------------
def make_pairs(n: int, seed: int = 0) -> pd.DataFrame:
    """Synthetic aggregated pairs (the split contract's columns that evaluation reads)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
        votes = rng.choice([2, 3, 5])
        n_chosen = rng.randint(votes // 2 + 1, votes)
        rows.append({
            "pair_id": f"p{i}", "prompt": canonical_prompt(f"question {i}: {words(4)}?"),
            "chosen": words(rng.randint(2, 30)), "rejected": words(rng.randint(2, 30)),
            "n_votes": votes, "n_chosen": n_chosen, "n_rejected": votes - n_chosen, "n_tie": 0,
            "agreement": n_chosen / votes, "soft_label": n_chosen / votes, "margin": 0.0,
            "prompt_hash": f"h{i}", "split": "test", "batch_ids": ["b1.jsonl"],
        })
    return pd.DataFrame(rows)


def save_reward_model(folder: Path, pad_equals_eos: bool = False) -> Path:
    """A tiny untrained RewardModel + tokenizer saved the way the train stage saves one."""
    corpus = [json.dumps(r) for r in BATTERY.read_text().splitlines()] + [" ".join(WORDS)] * 20
    backbone_dir = build_tiny_backbone(corpus, ModelSettings.from_section(TINY_MODEL_CFG), folder / "_backbone")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(backbone_dir)
    if pad_equals_eos:  # the SmolLM2 situation
        tokenizer.pad_token = tokenizer.eos_token
    model = RewardModel.from_backbone(AutoModel.from_pretrained(backbone_dir), seed=0)
    out = folder / "reward_model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_reward_model(tmp_path_factory.mktemp("rm"))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_checkpoint(tiny_model_dir)


def settings(**overrides) -> EvalSettings:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    return EvalSettings.from_section({**params["evaluate"], "battery_file": str(BATTERY), **overrides})


# --- metrics on plain arrays ----------------------------------------------------------------
def test_accuracy_is_strict_and_bt_loss_matches_formula():
    r_c = np.array([1.0, 0.5, 2.0, 0.0])
    r_r = np.array([0.0, 0.5, 3.0, -1.0])  # pair 2 is a tie: wrong
    m = pair_metrics(r_c, r_r)
    assert m["accuracy"] == pytest.approx(0.5) and m["ties"] == 1 and m["n_pairs"] == 4
    expected = np.mean(np.log1p(np.exp(-(r_c - r_r))))
    assert m["bt_loss"] == pytest.approx(expected, rel=1e-9)
    assert m["margin"]["p50"] == pytest.approx(0.5)
    # its 95% Wilson interval (2 of 4: 0.150-0.850), sound where the normal one is not: at 100%
    assert (m["accuracy_ci_low"], m["accuracy_ci_high"]) == (pytest.approx(0.1500, abs=1e-4), pytest.approx(0.8500, abs=1e-4))
    perfect = pair_metrics(np.ones(30), np.zeros(30))
    assert perfect["accuracy_ci_high"] == 1.0 and 0.85 < perfect["accuracy_ci_low"] < 0.9


def test_empty_test_split_is_a_data_error():
    with pytest.raises(DataError, match="empty"):
        pair_metrics(np.zeros(0), np.zeros(0))


def test_calibration_tells_calibrated_from_overconfident():
    rng = np.random.default_rng(0)
    margin = rng.normal(0, 2, 20000)
    p = 1 / (1 + np.exp(-margin))
    outcome = (rng.random(margin.size) < p).astype(float)  # drawn from the model's own probabilities
    assert calibration(margin, outcome)["ece"] < 0.02
    overconfident = calibration(margin * 5, outcome)
    assert overconfident["ece"] > 0.05
    assert sum(b["pairs"] for b in overconfident["curve"]) == 2 * margin.size  # both orientations counted


def test_the_calibration_curve_merges_tiny_bins_and_carries_the_diagonal():
    """Bins of 1 or 3 pairs read as 0 or 1 and make the curve zigzag: under min_pairs they join the next bin.
    The ECE stays the equal-width bins' (comparable across runs)."""
    rng = np.random.default_rng(3)
    margin = np.concatenate([rng.normal(0, 0.3, 200), [3.0, -2.5, 1.6]])  # three pairs out in the sparse bins
    outcome = (rng.random(margin.size) < 1 / (1 + np.exp(-margin))).astype(float)
    raw, merged = calibration(margin, outcome, 10), calibration(margin, outcome, 10, min_pairs=20)
    assert min(b["pairs"] for b in raw["curve"]) < 20 <= min(b["pairs"] for b in merged["curve"])
    assert sum(b["pairs"] for b in merged["curve"]) == sum(b["pairs"] for b in raw["curve"]) == 2 * margin.size
    assert merged["ece"] == raw["ece"] and len(merged["curve"]) < len(raw["curve"])
    assert all(b["perfectly_calibrated"] == b["predicted"] for b in merged["curve"])  # the y = x line
    lows = [float(b["bin"].split("-")[0]) for b in merged["curve"]]
    assert lows == sorted(lows) and merged["curve"][0]["bin"].startswith("0.0") and merged["curve"][-1]["bin"].endswith("1.0")


def test_length_bias_flags_reward_that_tracks_length():
    rng = np.random.default_rng(1)
    len_c, len_r = rng.integers(10, 500, 200), rng.integers(10, 500, 200)
    biased = length_bias(len_c / 100.0, len_r / 100.0, len_c, len_r, max_r2=0.3)
    assert biased["flagged"] and biased["r2"] == pytest.approx(1.0)
    assert biased["accuracy_chosen_shorter"] == 0.0  # "longer wins" is always wrong there
    fair = length_bias(rng.normal(1, 1, 200), rng.normal(0, 1, 200), len_c, len_r, max_r2=0.3)
    assert not fair["flagged"] and fair["r2"] < 0.1


def test_battery_report_judges_by_sign_and_reports_the_margin():
    report = battery_report(["refusal", "rude", "waffle", "tie"], np.array([2.0, 0.3, -1.0, 0.0]), min_margin=1.0)
    assert report["failures"] == ["waffle", "tie"] and report["n_failed"] == 2  # wrong order; a tie is wrong
    assert [r["passed"] for r in report["results"]] == [True, True, False, False]
    assert report["below_min_margin"] == ["rude", "waffle", "tie"]  # reported, not failed
    # the same model with rewards scaled by 0.01 (a BT model is defined up to scale) passes the same pairs
    scaled = battery_report(["refusal", "rude", "waffle", "tie"], np.array([2.0, 0.3, -1.0, 0.0]) * 0.01, 1.0)
    assert scaled["failures"] == report["failures"]


def test_shipped_battery_loads(tmp_path):
    rows = load_battery(BATTERY)
    assert len(rows) >= 10 and len({r["name"] for r in rows}) == len(rows)
    assert all(json.loads(r["prompt"])[0]["role"] == "user" for r in rows)
    bad = tmp_path / "battery.jsonl"
    bad.write_text(BATTERY.read_text().splitlines()[0] + "\n" + BATTERY.read_text().splitlines()[0] + "\n")
    with pytest.raises(DataError, match=":2: duplicate battery name"):
        load_battery(bad)
    bad.write_text('{"name": "x", "prompt": "p", "chosen": "", "rejected": "r"}\n')
    with pytest.raises(DataError, match=r":1: missing or empty field\(s\) \['chosen'\]"):
        load_battery(bad)


def test_settings_reject_bad_params():
    with pytest.raises(ConfigError, match="evaluate.min_accuracy"):
        settings(min_accuracy=1.5)
    with pytest.raises(ConfigError, match="agreement_edges"):
        settings(agreement_edges=[1.0, 0.5])


# --- the padding canary on a real tiny model ----------------------------------------------------
class LastPositionRewardModel(RewardModel):
    """The classic bug: read the reward at position -1, which is a pad token for right-padded rows."""

    def forward(self, input_ids, attention_mask):
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return self.head(out.last_hidden_state[:, -1]).squeeze(-1)


def canary_rows(tokenizer, n: int = 6) -> list[list[int]]:
    pairs = make_pairs(n, seed=3)
    rows, _ = encode_rows(tokenizer, pairs["prompt"], pairs["chosen"], 128)
    assert len({len(r) for r in rows}) > 1
    return rows


def test_padding_canary_passes_mask_pooled_model(tiny):
    model, tokenizer = tiny
    result = padding_canary(batch_scorer(model, pad_id_of(tokenizer)), canary_rows(tokenizer), tolerance=1e-4)
    assert result["passed"], result
    assert set(result["by_probe"]) == {"with_longer_right_padded", "with_longer_left_padded",
                                       "with_shorter_right_padded", "with_shorter_left_padded"}


def test_padding_canary_catches_last_position_pooling(tiny):
    model, tokenizer = tiny
    broken = LastPositionRewardModel(model.backbone, model.head).eval()
    result = padding_canary(batch_scorer(broken, pad_id_of(tokenizer)), canary_rows(tokenizer), tolerance=1e-4)
    assert not result["passed"]
    assert result["by_probe"]["with_longer_right_padded"] > 1e-3
    assert result["by_probe"]["with_longer_left_padded"] <= 1e-4  # left padding hides this bug: probe both sides


def test_pad_batch_both_sides():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


# --- whole evaluation -----------------------------------------------------------------------
def test_evaluate_model_reports_every_check(tiny):
    model, tokenizer = tiny
    test, val = make_pairs(24, seed=1), make_pairs(10, seed=2)
    result = evaluate_model(model, tokenizer, test, val, load_battery(BATTERY), settings(), 128)
    m = result.metrics
    assert m["n_pairs"] == 24 and 0.0 <= m["accuracy"] <= 1.0
    assert set(m["checks"]) == {"accuracy", "length_bias", "battery", "padding_canary"}  # scale-free only
    assert m["calibration_flagged"] == (m["ece"] > settings().max_ece)  # reported beside them
    assert m["checks"]["padding_canary"] and m["passed"] == all(m["checks"].values())
    assert sum(b["n"] for b in m["accuracy_by_agreement"].values()) == 24
    assert sum(b["n"] for b in m["accuracy_by_length"].values()) == 24
    assert m["normalization"]["split"] == "val" and m["normalization"]["n_rows"] == 20
    # An untrained model cannot clear a margin of +1 on the battery (reported) and orders some pairs wrong
    # (failed, each named).
    battery = result.pathology["battery"]
    assert len(battery["below_min_margin"]) == m["battery_below_min_margin"] > 0
    assert battery["failures"] == [r["name"] for r in battery["results"] if r["margin"] <= 0]
    assert battery["n_failed"] == len(battery["failures"]) > 0
    assert set(battery["failures"]) <= {r["name"] for r in load_battery(BATTERY)}
    assert "FAIL" in result.summary and battery["failures"][0] in result.summary
    assert set(result.plots) == {"reward_hist", "calibration", "reward_vs_length"}
    assert result.plots["reward_hist"][["chosen", "rejected"]].to_numpy().sum() == 48


def test_length_biased_training_set_trips_the_flag(tiny_model_dir):
    """Train on pairs where the chosen answer is always the longer one; evaluate on balanced pairs."""
    torch.manual_seed(0)
    model, tokenizer = load_checkpoint(tiny_model_dir)
    model.train()
    rng = random.Random(7)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    long_short = lambda: (words(rng.randint(20, 40)), words(rng.randint(1, 6)))  # noqa: E731
    train = pd.DataFrame([{"prompt": canonical_prompt(words(3)), "chosen": c, "rejected": r}
                          for c, r in (long_short() for _ in range(32))])
    rows, _ = encode_rows(tokenizer, list(train["prompt"]) * 2, list(train["chosen"]) + list(train["rejected"]), 128)
    ids, mask = pad_batch(rows, pad_id_of(tokenizer))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(25):
        r_c, r_r = model(ids, mask).chunk(2)
        loss = bradley_terry_loss(r_c, r_r)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    # Held out: half the pairs prefer the short answer (the "direct vs waffle" kind), half the long one.
    held_out = pd.DataFrame([{"prompt": canonical_prompt(words(3)), "chosen": c if i % 2 else r,
                              "rejected": r if i % 2 else c} for i, (c, r) in enumerate(long_short() for _ in range(40))])
    r_c, r_r, _ = score_pairs(model, tokenizer, held_out, 128)
    result = length_bias(r_c, r_r, held_out["chosen"].str.len().to_numpy(),
                         held_out["rejected"].str.len().to_numpy(), max_r2=0.3)
    assert result["flagged"] and result["r2"] > 0.5, result
    assert result["flagged"] and result["r2"] > 0.5, result
    assert result["accuracy_chosen_shorter"] < 0.5 and result["n_chosen_shorter"] == 20


def grouped_pairs(n_prompts: int = 6, seed: int = 3) -> pd.DataFrame:
    """K = 4 responses per prompt, all 6 comparisons, plus a few single pairs."""
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    frames = [make_pairs(4, seed)]
    for g in range(n_prompts):
        prompt, responses = canonical_prompt(f"ranked {g}: {words(12)}?"), [words(rng.randint(1, 20)) for _ in range(4)]
        frames.append(pd.DataFrame([{**frames[0].iloc[0].to_dict(), "pair_id": f"g{g}-{i}{j}", "prompt": prompt,
                                     "prompt_hash": f"g{g}", "chosen": responses[i], "rejected": responses[j]}
                                    for i in range(4) for j in range(i + 1, 4)]))
    return pd.concat(frames, ignore_index=True)


def test_grouped_scoring_equals_the_plain_path(tiny):
    from rmpipe.evaluation.evaluate import score_pairs_grouped

    model, tokenizer = tiny
    pairs = grouped_pairs()
    plain = score_pairs(model, tokenizer, pairs, 128, batch_size=4)
    grouped = score_pairs_grouped(model, tokenizer, pairs, 128, batch_size=4)  # a budget of a few groups per batch
    assert np.abs(plain[0] - grouped[0]).max() < 1e-5 and np.abs(plain[1] - grouped[1]).max() < 1e-5
    assert plain[2] == grouped[2] == 0
    cut = score_pairs_grouped(model, tokenizer, pairs, 16, batch_size=4)  # left-truncated rows counted as before
    assert cut[2] == score_pairs(model, tokenizer, pairs, 16, batch_size=4)[2] > 0
