"""Four ways to lay a batch of pairs out for one forward pass; all four give the same rewards.

    none           chosen rows stacked on rejected rows, right-padded to the longest:  2B x T
    padding_free   every sequence packed end to end into rows of width W (the longest sequence);
                   a block-diagonal causal mask, positions restart at each sequence: no row is
                   padded to another's length, only a row's tail
    shared_prompt  each pair as one unit [prompt | chosen | rejected], packed the same way: the prompt
                   is computed once, both responses attend to it and not to each other, and each
                   response's positions continue from the prompt. A pair costs p + c + r tokens,
                   not 2p + c + r.
    groups         the pairs of one prompt (a group: same `prompt_hash`) as one unit
                   [prompt | response 1 | ... | response k]: the prompt once, each distinct response once,
                   each response attending to the prompt and itself, positions continuing from the prompt
                   (InstructGPT: one forward pass per completion). K responses compared in all C(K,2)
                   ways cost p + K responses instead of C(K,2) x (2p + c + r). A group of one pair is
                   exactly the shared_prompt unit.

The "prompt" of a pair is the longest common prefix of its two token sequences, so the shared
part is exactly what both sequences hold (chat-template tokens included) and tokenization at the
prompt/response boundary cannot differ between the layouts; a group's prompt is the common prefix of
all its sequences. Packed layouts read each reward at a
given flat position instead of finding the last real token from a 2-D mask.

Whether a packed layout is exact depends on the backbone's attention (a sliding window or a kernel
that ignores custom masks is not), so `resolve_packing` measures it on real pairs before training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger("rmpipe.packing")

MODES = ("none", "padding_free", "shared_prompt", "groups")
FASTEST_FIRST = ("groups", "shared_prompt", "padding_free", "none")
EXACT_TOLERANCE = 1e-4  # max |reward(packed) - reward(stacked)|, fp32
# `auto` takes `groups` over `shared_prompt` only where it computes at least this share fewer tokens: below
# that the speed-up is within a step's noise and not worth batches of another composition (the bundled
# sample, ~20% of pairs sharing a prompt: 6.7% fewer tokens).
GROUPS_MIN_SAVING = 0.10
# Which part of a unit a token belongs to: the prompt (0) or response j (j >= 1; a pair's chosen is 1, its
# rejected 2). A response token sees the prompt and its own response only.
PROMPT, CHOSEN, REJECTED = 0, 1, 2


def group_members(group: np.ndarray, rows: list[int]) -> list[list[int]]:
    """`rows` split by group id, groups in order of first appearance, rows in their given order."""
    members: dict[int, list[int]] = {}
    for i in rows:
        members.setdefault(int(group[i]), []).append(i)
    return list(members.values())


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token sequences (the pair's shared prompt)."""
    n = min(len(a), len(b))
    a_arr, b_arr = np.asarray(a[:n]), np.asarray(b[:n])
    differ = np.flatnonzero(a_arr != b_arr)
    return int(differ[0]) if differ.size else n


@dataclass
class Batch:
    """Model inputs for one forward pass over B pairs, plus their targets.

    `inputs` go straight to `RewardModel.forward`; its output holds the B chosen rewards followed by
    the B rejected rewards, whichever layout made them.
    """

    inputs: dict[str, torch.Tensor]
    margin: torch.Tensor  # (B,)
    soft_label: torch.Tensor  # (B,)
    real_tokens: int  # tokens of the pairs' sequences as the model sees them (a shared prompt once)
    computed_tokens: int  # positions the model computes, padding included
    weight: torch.Tensor | None = None  # (B,) loss weight per pair (`TokenizedPairs.pair_weights`)

    def to(self, device) -> "Batch":
        return Batch({k: v.to(device) for k, v in self.inputs.items()}, self.margin.to(device),
                     self.soft_label.to(device), self.real_tokens, self.computed_tokens,
                     None if self.weight is None else self.weight.to(device))

    @property
    def n_pairs(self) -> int:
        return self.margin.shape[0]


# --- layout: units packed into rows ----------------------------------------------------------
@dataclass
class Unit:
    """Tokens laid out contiguously in a row: one sequence, or one pair [prompt | chosen | rejected]."""

    ids: list[int]
    positions: list[int]
    part: list[int]  # PROMPT, or which response (1, 2, ...) per token
    reads: list[tuple[int, int]]  # (offset in the unit, slot in the output) where a reward is read


def sequence_unit(ids: list[int], slot: int) -> Unit:
    return Unit(list(ids), list(range(len(ids))), [PROMPT] * len(ids), [(len(ids) - 1, slot)])


def pair_unit(chosen: list[int], rejected: list[int], prefix: int, chosen_slot: int, rejected_slot: int) -> Unit:
    """[prompt | chosen suffix | rejected suffix]; each response's positions continue from the prompt."""
    c, r = chosen[prefix:], rejected[prefix:]
    positions = list(range(prefix + len(c))) + list(range(prefix, prefix + len(r)))
    part = [PROMPT] * prefix + [CHOSEN] * len(c) + [REJECTED] * len(r)
    # A response with no tokens of its own (it equals the prompt) is read at the prompt's last token.
    reads = [(prefix + len(c) - 1, chosen_slot), (prefix + len(c) + len(r) - 1 if r else prefix - 1, rejected_slot)]
    return Unit(chosen[:prefix] + c + r, positions, part, reads)


def group_unit(seqs: list[list[int]], slots: list[list[int]]) -> Unit:
    """[prompt | response 1 | ... | response k] for k distinct sequences, `slots[j]` the outputs read at seq j.

    The prompt is the sequences' common prefix; each response's positions continue from it. A sequence
    with no tokens of its own (it is the prompt, e.g. a prefix of the others) is read at the prompt's end.
    """
    prefix = min(common_prefix_length(seqs[0], s) for s in seqs) if len(seqs) > 1 else len(seqs[0]) - 1
    ids, positions, part = list(seqs[0][:prefix]), list(range(prefix)), [PROMPT] * prefix
    reads = []
    for j, seq in enumerate(seqs):
        suffix = seq[prefix:]
        ids += suffix
        positions += range(prefix, prefix + len(suffix))
        part += [j + 1] * len(suffix)
        reads += [(len(ids) - 1 if suffix else prefix - 1, slot) for slot in slots[j]]
    return Unit(ids, positions, part, reads)


def pair_group_unit(chosen: list[list[int]], rejected: list[list[int]], chosen_slots: list[int],
                    rejected_slots: list[int]) -> Unit:
    """The pairs of one prompt as one `group_unit`: distinct sequences in order of first appearance."""
    index: dict[tuple[int, ...], int] = {}
    seqs: list[list[int]] = []
    slots: list[list[int]] = []
    for c, r, cs, rs in zip(chosen, rejected, chosen_slots, rejected_slots):
        for seq, slot in ((c, cs), (r, rs)):
            j = index.setdefault(tuple(seq), len(seqs))
            if j == len(seqs):
                seqs.append(seq)
                slots.append([])
            slots[j].append(slot)
    return group_unit(seqs, slots)


def group_tokens(seqs: list[list[int]]) -> int:
    """Tokens a `group_unit` of these sequences computes: their common prefix once, each distinct suffix once."""
    distinct = list({tuple(s): s for s in seqs}.values())
    if len(distinct) == 1:
        return len(distinct[0])
    prefix = min(common_prefix_length(distinct[0], s) for s in distinct)
    return sum(len(s) for s in distinct) - (len(distinct) - 1) * prefix


def pack_rows(lengths: list[int]) -> list[list[int]]:
    """First-fit decreasing into rows as wide as the longest unit: indices of the units in each row."""
    width = max(lengths)
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(width - lengths[i])
    return rows


def block_mask(unit_id: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """(R, W) unit ids and parts -> (R, 1, W, W) bool, True where query q may attend to key k.

    Causal within a unit; a response token sees the prompt and its own response, never another response
    (so a rejected token does not see the chosen ones); units never see each other. Padding carries
    unique negative unit ids, so a pad attends to itself only (no empty softmax row).
    """
    width = unit_id.shape[1]
    idx = torch.arange(width)
    causal = idx[:, None] >= idx[None, :]
    same_unit = unit_id[:, :, None] == unit_id[:, None, :]
    own_part = (part[:, None, :] == PROMPT) | (part[:, :, None] == part[:, None, :])
    return (same_unit & causal & own_part).unsqueeze(1)


def packed_inputs(units: list[Unit], n_outputs: int, pad_id: int) -> tuple[dict[str, torch.Tensor], int]:
    """Pack units into rows; returns model inputs and the number of computed positions."""
    rows = pack_rows([len(u.ids) for u in units])
    width = max(len(u.ids) for u in units)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    part = torch.zeros((len(rows), width), dtype=torch.long)
    unit_id = -1 - torch.arange(len(rows) * width, dtype=torch.long).view(len(rows), width)
    read_at = torch.empty(n_outputs, dtype=torch.long)
    for r, members in enumerate(rows):
        start = 0
        for u in members:
            unit, end = units[u], start + len(units[u].ids)
            input_ids[r, start:end] = torch.tensor(unit.ids)
            position_ids[r, start:end] = torch.tensor(unit.positions)
            part[r, start:end] = torch.tensor(unit.part)
            unit_id[r, start:end] = u
            for offset, slot in unit.reads:
                read_at[slot] = r * width + start + offset
            start = end
    inputs = {"input_ids": input_ids, "attention_mask": block_mask(unit_id, part), "position_ids": position_ids,
              "read_at": read_at}
    return inputs, len(rows) * width


def stacked_inputs(seqs: list[list[int]], pad_id: int) -> tuple[dict[str, torch.Tensor], int]:
    """Rows right-padded to the longest, with a 2-D mask (the reference layout)."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}, len(seqs) * width


def make_batch(pairs, rows: list[int], mode: str, pad_id: int) -> Batch:
    """The pairs `rows` of a `TokenizedPairs` as one forward pass in layout `mode`."""
    chosen = [pairs.chosen[i] for i in rows]
    rejected = [pairs.rejected[i] for i in rows]
    b = len(rows)
    if mode == "none":
        inputs, computed = stacked_inputs(chosen + rejected, pad_id)
        real = sum(map(len, chosen)) + sum(map(len, rejected))
    elif mode == "padding_free":
        units = [sequence_unit(s, slot) for slot, s in enumerate(chosen + rejected)]
        inputs, computed = packed_inputs(units, 2 * b, pad_id)
        real = sum(len(u.ids) for u in units)
    elif mode == "shared_prompt":
        units = [pair_unit(c, r, int(pairs.prefix[i]), k, b + k) for k, (i, c, r) in enumerate(zip(rows, chosen, rejected))]
        inputs, computed = packed_inputs(units, 2 * b, pad_id)
        real = sum(len(u.ids) for u in units)
    elif mode == "groups":
        # Output slots stay "B chosen, then B rejected"; a response shared by several pairs is computed
        # once and read into each of its slots (the gather sums their gradients).
        slot = {i: k for k, i in enumerate(rows)}
        units = [pair_group_unit([pairs.chosen[i] for i in m], [pairs.rejected[i] for i in m],
                                 [slot[i] for i in m], [b + slot[i] for i in m])
                 for m in group_members(pairs.group, rows)]
        inputs, computed = packed_inputs(units, 2 * b, pad_id)
        real = sum(len(u.ids) for u in units)
    else:
        raise ValueError(f"packing must be one of {MODES}, got {mode!r}")
    return Batch(inputs, torch.from_numpy(pairs.margin[rows].copy()), torch.from_numpy(pairs.soft_label[rows].copy()),
                 real, computed)


# --- choosing a layout -----------------------------------------------------------------------
def layout_error(model, pairs, mode: str, pad_id: int, n_pairs: int = 4) -> float:
    """max |reward(mode) - reward(stacked)| over the first `n_pairs` pairs, fp32, eval mode.

    `groups` is measured on the first group of several pairs (up to 2 x `n_pairs` of them) as well.
    """
    rows = list(range(min(n_pairs, len(pairs))))
    if mode == "groups":
        grouped = [m for m in group_members(pairs.group, list(range(len(pairs)))) if len(m) > 1]
        rows += [i for i in (grouped[0][: 2 * n_pairs] if grouped else []) if i not in rows]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            reference = model(**make_batch(pairs, rows, "none", pad_id).inputs)
            packed = model(**make_batch(pairs, rows, mode, pad_id).inputs)
    finally:
        model.train(was_training)
    return float((reference.float() - packed.float()).abs().max())


def groups_saving(pairs) -> float:
    """Share of `shared_prompt`'s tokens that `groups` does not compute on these pairs (0 without groups)."""
    if not pairs.has_groups():
        return 0.0
    shared = int(pairs.tokens("shared_prompt").sum())
    return 1.0 - int(pairs.units("groups", 2**62).tokens.sum()) / shared if shared else 0.0


def resolve_packing(requested: str, model, pairs, pad_id: int) -> tuple[str, dict[str, float]]:
    """`auto` -> the fastest layout that is exact for this backbone; an explicit layout must be exact.

    `auto` tries `groups` only when prompts have several pairs, enough to save `GROUPS_MIN_SAVING` of the tokens.

    Returns the layout and the measured error of each layout tried.
    """
    from rmpipe.core.errors import ConfigError

    if requested not in MODES + ("auto",):
        raise ConfigError(f"params.yaml: 'train.packing' must be auto, {', '.join(MODES)}; got {requested!r}")
    if requested == "none" or len(pairs) == 0:
        return "none", {}
    errors: dict[str, float] = {}
    for mode in FASTEST_FIRST if requested == "auto" else (requested,):
        if mode == "groups" and requested == "auto" and groups_saving(pairs) < GROUPS_MIN_SAVING:
            continue  # little or nothing to share beyond each pair's prompt
        if mode == "none":
            return "none", errors
        try:
            errors[mode] = layout_error(model, pairs, mode, pad_id)
        except Exception as exc:  # a backbone whose attention takes no custom mask fails here, not mid-run
            log.warning("packing %s does not run on this backbone (%s: %s)", mode, type(exc).__name__, exc)
            errors[mode] = float("inf")
        if errors[mode] <= EXACT_TOLERANCE:
            return mode, errors
        log.warning("packing %s changes rewards by up to %.2e on this backbone (tolerance %.0e)",
                    mode, errors[mode], EXACT_TOLERANCE)
    raise ConfigError(
        f"params.yaml: 'train.packing' is {requested} but that layout is not exact for this backbone "
        f"(max reward difference {errors[requested]:.2e} > {EXACT_TOLERANCE:.0e}): use auto or none")
