"""The reward-model math: pooling, head, Bradley-Terry loss and its gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rmpipe.model.reward_model import (
    bradley_terry_loss,
    last_real_token_index,
    make_head,
    pool_last_real_token,
    positions_from_mask,
)


def test_last_real_token_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_real_token_index(right).tolist() == [2, 4, 0]
    assert last_real_token_index(left).tolist() == [4, 4, 4]


def test_pooling_ignores_pad_token_equal_to_eos():
    # eos == pad == 7: the text itself ends in eos, then padding repeats it. Pooling by
    # "first pad token" would pick position 2; the attention mask says position 3 is real.
    eos = 7
    input_ids = torch.tensor([[5, 6, eos, eos, eos, eos]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    hidden = torch.arange(6, dtype=torch.float32).view(1, 6, 1).expand(1, 6, 3)
    assert input_ids[0].tolist().index(eos) == 2  # the trap
    assert pool_last_real_token(hidden, mask)[0].tolist() == [3.0, 3.0, 3.0]


def test_positions_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


def test_head_is_bias_free_and_initialised():
    d = 256
    head = make_head(d, "normal", torch.Generator().manual_seed(0))
    assert head.bias is None and head.weight.shape == (1, d)
    assert abs(head.weight.std().item() - 1 / math.sqrt(d)) < 0.15 / math.sqrt(d)
    assert torch.count_nonzero(make_head(d, "zero").weight) == 0
    with pytest.raises(ValueError):
        make_head(d, "xavier")


def test_worked_example_one_sgd_step():
    """The seed's worked example: zero head, one SGD step at lr 1."""
    h_c = torch.tensor([[0.5, 1.0, -0.3, 0.2]])
    h_r = torch.tensor([[0.1, 0.4, -0.1, -0.2]])
    head = make_head(4, "zero")
    opt = torch.optim.SGD(head.parameters(), lr=1.0)

    loss = bradley_terry_loss(head(h_c).squeeze(-1), head(h_r).squeeze(-1))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    loss.backward()
    p = torch.sigmoid(torch.tensor(0.0))
    assert torch.allclose(head.weight.grad, -(1 - p) * (h_c - h_r), atol=1e-7)
    opt.step()
    assert torch.allclose(head.weight, torch.tensor([[0.2, 0.3, -0.1, 0.2]]), atol=1e-6)

    margin = (head(h_c) - head(h_r)).item()
    assert margin == pytest.approx(0.36, abs=1e-6)
    assert torch.sigmoid(torch.tensor(margin)).item() == pytest.approx(0.589, abs=1e-3)
    loss_after = bradley_terry_loss(head(h_c).squeeze(-1), head(h_r).squeeze(-1))
    assert loss_after.item() == pytest.approx(0.529, abs=1e-3)


def test_bias_would_get_zero_gradient():
    """A bias adds the same constant to r_c and r_r, so it cancels in the margin: it cannot learn."""
    h_c = torch.tensor([[0.5, 1.0, -0.3, 0.2]])
    h_r = torch.tensor([[0.1, 0.4, -0.1, -0.2]])
    biased = nn.Linear(4, 1, bias=True)
    bradley_terry_loss(biased(h_c).squeeze(-1), biased(h_r).squeeze(-1)).backward()
    assert biased.bias.grad.abs().item() < 1e-7


def test_rewards_get_equal_and_opposite_gradients():
    r_c = torch.tensor([0.3, -1.2, 2.0], requires_grad=True)
    r_r = torch.tensor([0.1, 0.5, -0.7], requires_grad=True)
    bradley_terry_loss(r_c, r_r).backward()
    assert torch.allclose(r_c.grad, -r_r.grad)
    assert (r_c.grad < 0).all()  # raising the chosen reward always lowers the loss


def test_loss_is_finite_for_huge_margins():
    big = torch.tensor([1e4, -1e4])
    loss = bradley_terry_loss(big, -big)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(1e4, rel=1e-6)  # (0 + 2e4) / 2


def test_margin_and_soft_label_variants():
    r_c, r_r = torch.tensor([1.0]), torch.tensor([0.0])
    plain = bradley_terry_loss(r_c, r_r)
    with_margin = bradley_terry_loss(r_c, r_r, margin=torch.tensor([1.0]))
    assert with_margin.item() == pytest.approx(math.log(2))
    assert plain.item() < with_margin.item()
    # p = 1 is the hard label; p = 0.5 makes the loss symmetric in the margin.
    assert bradley_terry_loss(r_c, r_r, soft_label=torch.tensor([1.0])).item() == pytest.approx(plain.item())
    half = bradley_terry_loss(r_c, r_r, soft_label=torch.tensor([0.5]))
    assert half.item() == pytest.approx(bradley_terry_loss(r_r, r_c, soft_label=torch.tensor([0.5])).item())


def test_centering_term_penalises_offset_rewards():
    r_c, r_r = torch.tensor([5.0]), torch.tensor([4.0])
    assert bradley_terry_loss(r_c, r_r, center_coef=0.01).item() == pytest.approx(
        bradley_terry_loss(r_c, r_r).item() + 0.01 * 81
    )


# --- on a real (tiny, random) transformers Llama ------------------------------------------------
@pytest.fixture(scope="module")
def tiny_reward_model():
    from transformers import LlamaConfig, LlamaModel

    from rmpipe.model.reward_model import RewardModel

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return RewardModel.from_backbone(LlamaModel(config).eval(), head_init="normal", seed=0)


def _pad(rows, side, pad_id=0):
    width = max(len(r) for r in rows)
    ids, mask = [], []
    for r in rows:
        fill = width - len(r)
        ids.append(r + [pad_id] * fill if side == "right" else [pad_id] * fill + r)
        mask.append([1] * len(r) + [0] * fill if side == "right" else [0] * fill + [1] * len(r))
    return torch.tensor(ids), torch.tensor(mask)


def test_rewards_do_not_depend_on_padding_side_or_batch(tiny_reward_model):
    rows = [[3, 4, 5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17]]
    with torch.no_grad():
        alone = torch.stack([tiny_reward_model(*_pad([r], "right"))[0] for r in rows])
        right = tiny_reward_model(*_pad(rows, "right"))
        left = tiny_reward_model(*_pad(rows, "left"))
    assert torch.allclose(right, alone, atol=1e-5)
    assert torch.allclose(left, alone, atol=1e-5)


def test_stacked_pair_forward_matches_two_passes(tiny_reward_model):
    chosen = [[3, 4, 5, 6], [7, 8, 9, 10, 11]]
    rejected = [[3, 4, 12], [7, 8, 13, 14, 15, 16]]
    with torch.no_grad():
        r_c, r_r = tiny_reward_model.score_pairs(*_pad(chosen + rejected, "right"))
        assert torch.allclose(r_c, tiny_reward_model(*_pad(chosen, "right")), atol=1e-5)
        assert torch.allclose(r_r, tiny_reward_model(*_pad(rejected, "right")), atol=1e-5)


def test_save_and_reload_give_the_same_rewards(tiny_reward_model, tmp_path):
    from rmpipe.model.reward_model import RewardModel

    tiny_reward_model.save_pretrained(tmp_path / "rm")
    assert not list((tmp_path / "rm").rglob("*.bin")) and not list((tmp_path / "rm").rglob("*.pt"))
    reloaded = RewardModel.from_pretrained(tmp_path / "rm").eval()
    ids, mask = _pad([[3, 4, 5], [6, 7, 8, 9, 10]], "right")
    with torch.no_grad():
        assert torch.allclose(reloaded(ids, mask), tiny_reward_model(ids, mask), atol=1e-6)
