"""Length-bucketed token-budget batching: budget, coverage, determinism, rank balance, truncation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rmpipe.model.backbones import build_tiny_backbone
from rmpipe.core.settings import ModelSettings
from rmpipe.model.batching import padded_tokens, plan_batches, shard, shard_weight
from rmpipe.model.packing import make_batch
from rmpipe.model.render import encode, tokenize_pairs, truncate_left
from rmpipe.core.schema import canonical_prompt

lengths_strategy = st.lists(st.integers(min_value=1, max_value=200), min_size=1, max_size=300)


@settings(max_examples=60, deadline=None)
@given(lengths=lengths_strategy, budget=st.integers(400, 5000), cap=st.integers(1, 64), seed=st.integers(0, 5))
def test_budget_respected_and_every_pair_once(lengths, budget, cap, seed):
    lengths = np.array(lengths)
    batches = plan_batches(lengths, budget, cap, seed, epoch=1)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # every pair exactly once
    for b in batches:
        assert len(b) <= cap
        # Over budget only when a single pair alone is (2 x 200 tokens > a 400 budget is possible).
        assert padded_tokens(lengths, b) <= budget or len(b) == 1


def test_similar_lengths_batched_together():
    lengths = np.array([10] * 50 + [100] * 50)
    for b in plan_batches(lengths, 2000, 64, seed=0):
        assert len({int(lengths[i]) for i in b}) == 1  # no short pair padded to 100


def test_order_deterministic_per_seed_and_varies_by_epoch():
    lengths = np.random.default_rng(0).integers(5, 120, size=400)
    a = plan_batches(lengths, 3000, 32, seed=7, epoch=0)
    assert a == plan_batches(lengths, 3000, 32, seed=7, epoch=0)
    assert a != plan_batches(lengths, 3000, 32, seed=8, epoch=0)
    assert a != plan_batches(lengths, 3000, 32, seed=7, epoch=1)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_balanced_across_ranks(world):
    lengths = np.random.default_rng(1).integers(5, 120, size=301)
    batches = plan_batches(lengths, 3000, 32, seed=0, min_pairs=world)
    per_rank_counts = []
    for b in batches:
        shards = [shard(b, lengths, r, world) for r in range(world)]
        assert sorted(i for s in shards for i in s) == sorted(b)  # the shards partition the batch
        sizes = [len(s) for s in shards]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
        tokens = [int(lengths[s].sum()) for s in shards]
        assert max(tokens) - min(tokens) <= int(lengths[b].max())  # strided over sorted lengths
        assert sum(shard_weight(n, len(b), world) for n in sizes) == pytest.approx(world)
        per_rank_counts.append(sizes)
    # every rank runs one shard per global batch: the same number of steps
    assert all(len(c) == world for c in per_rank_counts)


def test_truncate_left_keeps_end():
    assert truncate_left(list(range(10)), 4) == ([6, 7, 8, 9], True)
    assert truncate_left([1, 2], 4) == ([1, 2], False)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    cfg = {"max_length": 64, "tiny": {"vocab_size": 300, "hidden_size": 16, "intermediate_size": 32,
                                       "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                       "seed": 0}}
    folder = build_tiny_backbone(["hello world, a short text about owls"] * 5, ModelSettings.from_section(cfg), tmp_path_factory.mktemp("bb"))
    return AutoTokenizer.from_pretrained(folder)


def test_tokenize_counts_truncation_and_keeps_template_end(tokenizer):
    frame = pd.DataFrame({
        "prompt": [canonical_prompt("hi"), canonical_prompt("owls " * 60)],
        "chosen": ["short", "a long answer " * 20],
        "rejected": ["no", "x"],
        "margin": [0.0, 0.5],
        "soft_label": [1.0, 0.75],
    })
    max_length = 40
    pairs = tokenize_pairs(tokenizer, frame, max_length)
    assert pairs.n_truncated == 1  # counted, not dropped
    assert len(pairs) == 2
    full = encode(tokenizer, frame.prompt[1], frame.chosen[1])
    assert len(full) > max_length and pairs.chosen[1] == full[-max_length:]  # the end kept
    assert pairs.chosen[1][-2:] == full[-2:]  # template's closing tokens survive
    assert pairs.chosen[0] == encode(tokenizer, frame.prompt[0], frame.chosen[0])
    assert pairs.margin.tolist() == [0.0, 0.5] and pairs.soft_label.tolist() == [1.0, 0.75]


def test_stacked_layout_puts_chosen_over_rejected_right_padded(tokenizer):
    frame = pd.DataFrame({"prompt": [canonical_prompt("a"), canonical_prompt("b")], "chosen": ["yes yes yes", "y"],
                          "rejected": ["n", "no no no no"], "margin": [0.0, 0.0], "soft_label": [1.0, 1.0]})
    pairs = tokenize_pairs(tokenizer, frame, 64)
    pad = tokenizer.pad_token_id
    batch = make_batch(pairs, [0, 1], "none", pad)
    input_ids, attention_mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    assert input_ids.shape[0] == 4
    rows = pairs.chosen[:2] + pairs.rejected[:2]
    for r, seq in enumerate(rows):
        n = len(seq)
        assert input_ids[r, :n].tolist() == seq
        assert attention_mask[r].tolist() == [1] * n + [0] * (input_ids.shape[1] - n)
        assert (input_ids[r, n:] == pad).all()
    assert batch.real_tokens == sum(map(len, rows)) and batch.computed_tokens == input_ids.numel()
