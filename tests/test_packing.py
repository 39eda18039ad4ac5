"""Packed layouts give the stacked layout's rewards (and gradients), cost fewer tokens, and are refused
where a backbone's attention would make them inexact."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rmpipe.model.backbones import build_tiny_backbone, load_backbone
from rmpipe.model.batching import TokenizedPairs, plan_batches, shard
from rmpipe.core.errors import ConfigError
from rmpipe.model.packing import (
    CHOSEN, PROMPT, REJECTED, block_mask, common_prefix_length, layout_error, make_batch, pack_rows, pair_unit,
    resolve_packing,
)
from rmpipe.model.lora import linear_names, with_adapters
from rmpipe.model.reward_model import RewardModel, bradley_terry_loss
from rmpipe.model.render import tokenize_pairs
from rmpipe.core.schema import canonical_prompt
from rmpipe.core.settings import LoraSettings, ModelSettings

ROOT = Path(__file__).resolve().parents[1]
TINY_CFG = {"max_length": 256, "tiny": {"vocab_size": 400, "hidden_size": 32, "intermediate_size": 64,
                                        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                        "seed": 0}}


def pairs_from_ids(chosen: list[list[int]], rejected: list[list[int]]) -> TokenizedPairs:
    n = len(chosen)
    return TokenizedPairs(chosen=chosen, rejected=rejected, margin=np.zeros(n, np.float32),
                          soft_label=np.ones(n, np.float32))


# --- the layout itself ---------------------------------------------------------------------
def test_common_prefix_is_the_shared_prompt():
    assert common_prefix_length([1, 2, 3, 4], [1, 2, 9]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([5], [6]) == 0


def test_pair_unit_positions_continue_from_the_prompt_and_reads_end_each_response():
    unit = pair_unit([7, 8, 9, 1, 2], [7, 8, 9, 3], prefix=3, chosen_slot=0, rejected_slot=1)
    assert unit.ids == [7, 8, 9, 1, 2, 3]  # the prompt once
    assert unit.positions == [0, 1, 2, 3, 4, 3]
    assert unit.part == [PROMPT] * 3 + [CHOSEN] * 2 + [REJECTED]
    assert unit.reads == [(4, 0), (5, 1)]
    # a response that adds nothing to the prompt is read at the prompt's last token
    assert pair_unit([7, 8], [7, 8, 3], prefix=2, chosen_slot=0, rejected_slot=1).reads == [(1, 0), (2, 1)]


def test_block_mask_rejected_never_sees_chosen_and_units_never_see_each_other():
    # one row: unit 0 = [P P C R], unit 1 = [P C], one pad
    unit_id = torch.tensor([[0, 0, 0, 0, 1, 1, -99]])
    part = torch.tensor([[PROMPT, PROMPT, CHOSEN, REJECTED, PROMPT, CHOSEN, PROMPT]])
    allowed = block_mask(unit_id, part)[0, 0]
    assert allowed[3, :4].tolist() == [True, True, False, True]  # rejected: prompt + itself
    assert allowed[2, :4].tolist() == [True, True, True, False]  # chosen: prompt + itself, causal
    assert not allowed[4:6, :4].any() and not allowed[:4, 4:].any()  # separate units
    assert allowed[6].tolist() == [False] * 6 + [True]  # a pad sees only itself: no empty softmax row


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=40))
def test_pack_rows_places_every_unit_once_within_the_width(lengths):
    rows = pack_rows(lengths)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= max(lengths) for row in rows)


def test_shared_prompt_costs_prompt_plus_both_responses():
    prompt = list(range(100, 140))
    pairs = pairs_from_ids([prompt + [1, 2, 3], prompt + [4]], [prompt + [5], prompt + [6, 7]])
    assert pairs.tokens("shared_prompt").tolist() == [40 + 3 + 1, 40 + 1 + 2]
    assert pairs.tokens("padding_free").tolist() == [2 * 40 + 4, 2 * 40 + 3]
    batch = make_batch(pairs, [0, 1], "shared_prompt", pad_id=0)
    assert batch.real_tokens == 44 + 43
    stacked = make_batch(pairs, [0, 1], "none", pad_id=0)
    assert stacked.computed_tokens == 4 * 43 and batch.computed_tokens < stacked.computed_tokens


@pytest.mark.parametrize("world", [2, 3])
def test_packed_batches_stay_balanced_across_ranks(world):
    rng = np.random.default_rng(3)
    prompt_lengths, response_lengths = rng.integers(100, 400, 301), rng.integers(20, 120, (301, 2))
    pairs = pairs_from_ids([[1] * p + [2] * c for p, (c, _) in zip(prompt_lengths, response_lengths)],
                           [[1] * p + [3] * r for p, (_, r) in zip(prompt_lengths, response_lengths)])
    tokens = pairs.tokens("shared_prompt")
    for batch in plan_batches(pairs.lengths(), 8000, 64, seed=0, min_pairs=world, packed_tokens=tokens):
        per_rank = [int(tokens[shard(batch, tokens, r, world)].sum()) for r in range(world)]
        assert max(per_rank) - min(per_rank) <= int(tokens[batch].max())  # within one pair of each other
        assert sum(per_rank) <= 8000 or len(batch) == world


# --- exactness on a real (tiny) backbone ------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    texts = ["a long conversation about owls, rivers and the colour of the evening sky"] * 20
    folder = build_tiny_backbone(texts, ModelSettings.from_section(TINY_CFG), tmp_path_factory.mktemp("tiny"))
    backbone, tokenizer = load_backbone(folder)
    return RewardModel.from_backbone(backbone, seed=0), tokenizer


@pytest.fixture(scope="module")
def tiny_lora(tiny):
    """The tiny reward model with LoRA (r=4) on every linear layer of a copy of its backbone, B != 0 so the
    adapters change the rewards: the packed layouts' masks and positions must pass through them unchanged."""
    model, tokenizer = tiny
    copied = RewardModel(copy.deepcopy(model.backbone), copy.deepcopy(model.head))
    adapted = with_adapters(copied, LoraSettings(r=4, alpha=8.0, target_modules=tuple(linear_names(model.backbone))))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    return adapted, tokenizer


def reward_model(request, lora: bool):
    """(model, tokenizer): the plain tiny reward model, or the LoRA one."""
    return request.getfixturevalue("tiny_lora" if lora else "tiny")


def frame_of_pairs() -> pd.DataFrame:
    history = [{"role": "user", "content": "tell me about owls " * 8},
               {"role": "assistant", "content": "owls hunt at night " * 5},
               {"role": "user", "content": "and rivers?"}]
    return pd.DataFrame({
        "prompt": [canonical_prompt(history), canonical_prompt("hi"), canonical_prompt("same"),
                   canonical_prompt("evening sky " * 30), canonical_prompt("prefix")],
        "chosen": ["rivers run to the sea " * 3, "hello there", "identical", "blue " * 40, "yes"],
        "rejected": ["owls", "no", "identical", "red", "yes and more"],  # equal responses; one a prefix of the other
        "margin": [0.0] * 5, "soft_label": [1.0] * 5,
    })


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["padding_free", "shared_prompt"])
def test_packed_rewards_equal_stacked_on_tiny_backbone(request, mode, attention, lora):
    model, tokenizer = reward_model(request, lora)
    model.backbone.config._attn_implementation = attention
    pairs = tokenize_pairs(tokenizer, frame_of_pairs(), max_length=120)  # one pair left-truncated: prefix may be 0
    assert pairs.n_truncated >= 1
    try:
        assert layout_error(model, pairs, mode, tokenizer.pad_token_id, n_pairs=len(pairs)) < 1e-5
    finally:
        model.backbone.config._attn_implementation = "sdpa"


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("mode", ["padding_free", "shared_prompt"])
def test_packed_gradients_equal_stacked(request, mode, lora):
    """Exact rewards are not enough for training: the loss must push the weights the same way."""
    model, tokenizer = reward_model(request, lora)
    pairs = tokenize_pairs(tokenizer, frame_of_pairs(), max_length=256)
    grads = {}
    for layout in ("none", mode):
        model.zero_grad()
        r_c, r_r = model(**make_batch(pairs, list(range(len(pairs))), layout, tokenizer.pad_token_id).inputs).chunk(2)
        bradley_terry_loss(r_c, r_r).backward()
        grads[layout] = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    assert torch.allclose(grads["none"], grads[mode], atol=1e-5)


def test_auto_picks_shared_prompt_where_exact(tiny):
    model, tokenizer = tiny
    pairs = tokenize_pairs(tokenizer, frame_of_pairs(), max_length=256)
    mode, errors = resolve_packing("auto", model, pairs, tokenizer.pad_token_id)
    assert mode == "shared_prompt" and errors["shared_prompt"] < 1e-4


def test_inexact_layout_refused_and_auto_falls_back():
    """A sliding-window backbone: a custom mask bypasses its window, so packed rewards differ."""
    from transformers import MistralConfig, MistralModel

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=4, max_position_embeddings=64)
    model = RewardModel.from_backbone(MistralModel(config), seed=0)
    rng = np.random.default_rng(0)
    prompt = rng.integers(1, 50, 20).tolist()
    pairs = pairs_from_ids([prompt + [3, 4, 5]] * 2, [prompt + [6, 7]] * 2)
    assert layout_error(model, pairs, "shared_prompt", pad_id=0) > 1e-3
    with pytest.raises(ConfigError, match="not exact for this backbone"):
        resolve_packing("shared_prompt", model, pairs, pad_id=0)
    mode, errors = resolve_packing("auto", model, pairs, pad_id=0)
    assert mode == "none" and set(errors) == {"shared_prompt", "padding_free"}


# --- exactness on the real SFT backbone ------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["padding_free", "shared_prompt"])
def test_packed_rewards_equal_stacked_on_smollm2(mode):
    from rmpipe.model import backbones

    backbones.ignore_from_git(ROOT / "models/.cache")
    backbone, tokenizer = load_backbone(backbones.materialize_smollm2(ROOT / backbones.SMOLLM2_CACHE))
    model = RewardModel.from_backbone(backbone, seed=0)
    pairs = tokenize_pairs(tokenizer, frame_of_pairs().head(3), max_length=512)
    assert pairs.prefix.min() > 20  # the multi-turn prompt really is shared
    assert layout_error(model, pairs, mode, tokenizer.pad_token_id, n_pairs=3) < 1e-4


# --- groups: the pairs of one prompt as one unit ------------------------------------------------
def frame_of_groups() -> pd.DataFrame:
    """Two ranked prompts (K = 4, all 6 comparisons; K = 3 with responses that are prefixes of each other),
    a prompt with a single pair, and a pair whose chosen equals its rejected."""
    history = canonical_prompt([{"role": "user", "content": "tell me about owls " * 8},
                                {"role": "assistant", "content": "owls hunt at night " * 5},
                                {"role": "user", "content": "and rivers?"}])
    ranked = ["rivers run to the sea " * 3, "owls", "they are wet", "no idea " * 4]  # best first
    nested = ["yes and more and more", "yes and more", "yes"]
    rows = [(history, ranked[i], ranked[j]) for i in range(4) for j in range(i + 1, 4)]
    rows += [(canonical_prompt("prefix"), nested[i], nested[j]) for i in range(3) for j in range(i + 1, 3)]
    rows += [(canonical_prompt("hi"), "hello there", "no"), (canonical_prompt("same"), "identical", "identical")]
    frame = pd.DataFrame(rows, columns=["prompt", "chosen", "rejected"])
    frame["prompt_hash"] = frame["prompt"].map(lambda p: f"h-{hash(p) % 10**8}")
    rng = np.random.default_rng(0)
    frame["margin"] = rng.uniform(0, 1, len(frame)).astype(np.float32)
    frame["soft_label"] = rng.uniform(0.6, 1, len(frame)).astype(np.float32)
    return frame


def test_group_unit_prompt_once_each_response_once():
    from rmpipe.model.packing import group_unit, group_tokens, pair_group_unit

    p = [7, 8, 9]
    a, b, c = p + [1, 2], p + [1], p + [3, 4, 5]  # b is a prefix of a
    unit = pair_group_unit([a, a, b], [b, c, c], chosen_slots=[0, 1, 2], rejected_slots=[3, 4, 5])
    assert unit.ids == [7, 8, 9, 1, 2, 1, 3, 4, 5]  # prompt once, a, b, c once each
    assert unit.positions == [0, 1, 2, 3, 4, 3, 3, 4, 5]
    assert unit.part == [PROMPT] * 3 + [1, 1, 2, 3, 3, 3]
    assert sorted(unit.reads, key=lambda r: r[1]) == [(4, 0), (4, 1), (5, 2), (5, 3), (8, 4), (8, 5)]
    assert group_tokens([a, b, b, c, a]) == len(unit.ids) == 9
    # a response equal to the group's prompt is read at the prompt's last token
    assert group_unit([p, p + [4]], [[0], [1]]).reads == [(2, 0), (3, 1)]


def test_block_mask_group_responses_see_prompt_and_themselves_only():
    unit_id = torch.zeros((1, 6), dtype=torch.long)
    part = torch.tensor([[PROMPT, PROMPT, 1, 2, 2, 3]])
    allowed = block_mask(unit_id, part)[0, 0]
    assert allowed[4].tolist() == [True, True, False, True, True, False]
    assert allowed[5].tolist() == [True, True, False, False, False, True]


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_groups_rewards_equal_stacked_on_tiny_backbone(request, attention, lora):
    model, tokenizer = reward_model(request, lora)
    model.backbone.config._attn_implementation = attention
    pairs = tokenize_pairs(tokenizer, frame_of_groups(), max_length=256)
    assert pairs.has_groups() and len(np.unique(pairs.group)) == 4
    try:
        assert layout_error(model, pairs, "groups", tokenizer.pad_token_id, n_pairs=len(pairs)) < 1e-5
    finally:
        model.backbone.config._attn_implementation = "sdpa"


def test_groups_cost_the_prompt_once_and_each_response_once(tiny):
    _, tokenizer = tiny
    pairs = tokenize_pairs(tokenizer, frame_of_groups(), max_length=256)
    rows = list(range(6))  # the K = 4 prompt's six comparisons
    groups, shared = (make_batch(pairs, rows, mode, tokenizer.pad_token_id) for mode in ("groups", "shared_prompt"))
    prompt = min(common_prefix_length(pairs.chosen[0], s) for s in pairs.chosen[:6] + pairs.rejected[:6])
    responses = sum(len(s) - prompt for s in {tuple(s): s for s in pairs.chosen[:6] + pairs.rejected[:6]}.values())
    assert groups.real_tokens == prompt + responses
    assert shared.real_tokens > 6 * prompt + 2 * responses  # 6 prompts, each response 3 times (and a longer prefix)


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("weighting", ["pair", "group"])
def test_groups_gradients_equal_stacked(request, weighting, lora):
    model, tokenizer = reward_model(request, lora)
    pairs = tokenize_pairs(tokenizer, frame_of_groups(), max_length=256)
    rows = list(range(len(pairs)))
    weight = torch.from_numpy(pairs.pair_weights(weighting))
    grads = {}
    for layout in ("none", "groups"):
        model.zero_grad()
        batch = make_batch(pairs, rows, layout, tokenizer.pad_token_id)
        r_c, r_r = model(**batch.inputs).chunk(2)
        bradley_terry_loss(r_c, r_r, margin=batch.margin, soft_label=batch.soft_label, weight=weight).backward()
        grads[layout] = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    assert grads["none"].abs().max() > 1e-4  # a real gradient, not two zeros
    assert torch.allclose(grads["none"], grads["groups"], atol=1e-5)


def test_groups_of_one_pair_are_the_shared_prompt_layout(tiny):
    """K = 2 (every prompt has one pair): the same units, the same batches, the same tensors."""
    _, tokenizer = tiny
    pairs = tokenize_pairs(tokenizer, frame_of_pairs(), max_length=256)
    assert not pairs.has_groups()
    rows = [3, 0, 4, 1, 2]
    a, b = (make_batch(pairs, rows, mode, tokenizer.pad_token_id) for mode in ("groups", "shared_prompt"))
    assert a.inputs.keys() == b.inputs.keys()
    assert all(torch.equal(a.inputs[k], b.inputs[k]) for k in a.inputs)
    u, v = pairs.units("groups", 300), pairs.units("shared_prompt", 300)
    assert u.members == v.members and (u.tokens == v.tokens).all() and (u.lengths == v.lengths).all()


def test_group_over_the_budget_is_split_into_sub_groups_without_changing_the_result(tiny):
    model, tokenizer = tiny
    pairs = tokenize_pairs(tokenizer, frame_of_groups(), max_length=256)
    whole = pairs.units("groups", 10**6)
    big = next(m for m in whole.members if len(m) == 6)
    budget = int(whole.tokens[whole.members.index(big)]) - 1
    units = pairs.units("groups", budget)
    parts = [m for m in units.members if set(m) <= set(big)]
    assert len(parts) >= 2 and sorted(i for m in parts for i in m) == big  # every pair once
    assert all(t <= budget for m, t in zip(units.members, units.tokens) if len(m) > 1)
    # rewards and the summed loss gradient of the sub-groups equal the whole group's (and the stacked)
    grads, rewards = [], []
    for batches in ([big], parts):
        model.zero_grad()
        out = []
        for rows in batches:
            r_c, r_r = model(**make_batch(pairs, rows, "groups", tokenizer.pad_token_id).inputs).chunk(2)
            (bradley_terry_loss(r_c, r_r) * len(rows)).backward()
            out += list(zip(rows, r_c.tolist(), r_r.tolist()))
        rewards.append(sorted(out))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert np.allclose(np.array(rewards[0]), np.array(rewards[1]), atol=1e-5)
    # float32 sums over other batch shapes: up to 1.1e-5 apart on some CPUs (largest gradient 0.59), past a
    # fixed 1e-5; so the tolerance is 1e-4 of the gradients' scale
    assert torch.allclose(grads[0], grads[1], atol=1e-4 * float(grads[0].abs().max()))


def test_plans_hold_whole_groups_within_the_budget():
    rng = np.random.default_rng(5)
    chosen, rejected, group = [], [], []
    for g in range(60):
        prompt = [1] * int(rng.integers(50, 300))
        responses = [prompt + [2 + k] * int(rng.integers(5, 60)) for k in range(int(rng.integers(2, 6)))]
        for i in range(len(responses)):
            for j in range(i + 1, len(responses)):
                chosen.append(responses[i]), rejected.append(responses[j]), group.append(g)
    pairs = TokenizedPairs(chosen=chosen, rejected=rejected, margin=np.zeros(len(chosen), np.float32),
                           soft_label=np.ones(len(chosen), np.float32), group=np.array(group))
    units = pairs.units("groups", 1500)
    batches = plan_batches(units.lengths, 1500, 64, seed=0, packed_tokens=units.tokens, sizes=units.sizes())
    assert batches == plan_batches(units.lengths, 1500, 64, seed=0, packed_tokens=units.tokens, sizes=units.sizes())
    assert sorted(units.rows([u for b in batches for u in b])) == list(range(len(pairs)))
    batch_of_group = {}
    for k, b in enumerate(batches):
        assert units.tokens[b].sum() <= 1500 or len(b) == 1
        assert units.sizes()[b].sum() <= 64
        for i in units.rows(b):
            assert batch_of_group.setdefault(group[i], k) == k  # a group never straddles batches
    assert len(units.members) == 60  # every group fits the budget: no sub-groups
    # two ranks: each takes whole groups (every 2nd unit of the token-sorted batch), together the batch
    for b in plan_batches(units.lengths, 1500, 64, seed=0, min_pairs=2, packed_tokens=units.tokens, sizes=units.sizes()):
        shards = [shard(b, units.tokens, rank, 2) for rank in range(2)]
        assert all(shards) and sorted(shards[0] + shards[1]) == sorted(b)


def test_group_weighting_counts_each_prompt_once():
    pairs = TokenizedPairs(chosen=[[1, 2]] * 4, rejected=[[1, 3]] * 4, margin=np.zeros(4, np.float32),
                           soft_label=np.ones(4, np.float32), group=np.array([0, 0, 0, 1]))
    assert pairs.pair_weights("pair").tolist() == [1, 1, 1, 1]
    assert pairs.pair_weights("group").tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1])
    r_c, r_r = torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.zeros(4)
    per_pair = -torch.nn.functional.logsigmoid(r_c - r_r)
    w = torch.from_numpy(pairs.pair_weights("group"))
    assert bradley_terry_loss(r_c, r_r, weight=w).item() == pytest.approx((per_pair[:3].mean() + per_pair[3]).item() / 2)


def test_auto_picks_groups_where_prompts_have_several_pairs(tiny):
    model, tokenizer = tiny
    pairs = tokenize_pairs(tokenizer, frame_of_groups(), max_length=256)
    mode, errors = resolve_packing("auto", model, pairs, tokenizer.pad_token_id)
    assert mode == "groups" and errors["groups"] < 1e-4


def test_groups_come_from_the_prompt_hash():
    from rmpipe.model.render import group_ids

    frame = pd.DataFrame({"prompt": ["a", "b", "a", "c"], "prompt_hash": ["x", "y", "x", "x"]})
    assert group_ids(frame).tolist() == [0, 1, 0, 0]  # the hash decides, not the text
    assert group_ids(frame.drop(columns="prompt_hash")).tolist() == [0, 1, 0, 2]
    frame.loc[3, "prompt_hash"] = None  # a row without a hash groups by its prompt text
    assert group_ids(frame).tolist() == [0, 1, 0, 2]


@pytest.mark.slow
def test_groups_rewards_equal_stacked_on_smollm2():
    from rmpipe.model import backbones

    backbones.ignore_from_git(ROOT / "models/.cache")
    backbone, tokenizer = load_backbone(backbones.materialize_smollm2(ROOT / backbones.SMOLLM2_CACHE))
    model = RewardModel.from_backbone(backbone, seed=0)
    pairs = tokenize_pairs(tokenizer, frame_of_groups(), max_length=512)
    assert pairs.prefix[:6].min() > 20  # the multi-turn prompt really is shared
    assert layout_error(model, pairs, "groups", tokenizer.pad_token_id, n_pairs=len(pairs)) < 1e-4


def test_auto_keeps_shared_prompt_where_groups_save_little(tiny):
    """One prompt shared by two pairs among many single pairs: groups would save < 10% of the tokens."""
    from rmpipe.model.packing import GROUPS_MIN_SAVING, groups_saving

    model, tokenizer = tiny
    frame = pd.concat([frame_of_pairs().assign(prompt_hash=[f"p{i}" for i in range(5)])] * 1, ignore_index=True)
    frame = pd.concat([frame, frame.iloc[[1]].assign(chosen="hello again", prompt_hash="p1")], ignore_index=True)
    pairs = tokenize_pairs(tokenizer, frame, max_length=256)
    assert pairs.has_groups() and 0 < groups_saving(pairs) < GROUPS_MIN_SAVING
    assert resolve_packing("auto", model, pairs, tokenizer.pad_token_id)[0] == "shared_prompt"
    assert resolve_packing("groups", model, pairs, tokenizer.pad_token_id)[0] == "groups"  # asked for: exact, so used
    grouped = tokenize_pairs(tokenizer, frame_of_groups(), max_length=256)
    assert groups_saving(grouped) > 0.5  # K = 4 with all 6 comparisons: most tokens are not computed again
