"""The preference shapes people already have, detected from a row's columns, turned into what collect normalizes.

One function per shape; collect keeps the per-row checks, the quarantine and the accounting.

  vote rows        prompt, response_a, response_b, annotator_id, choice        (collect's own shape)
  explicit pairs   prompt, chosen, rejected: strings, or TRL's conversational form where
                   chosen / rejected are one-message lists [{"role": "assistant", ...}]
  implicit pairs   chosen, rejected hold the whole conversation (message lists or Anthropic HH
                   transcripts) and no prompt: the shared leading turns are the prompt, the final
                   assistant turn of each the response (`split_conversations`)
  HH transcripts   "\\n\\nHuman: ...\\n\\nAssistant: ..." in one string, in `prompt` or in implicit
                   chosen / rejected: parsed into role/content turns (`parse_transcript`), so the
                   backbone's chat template sees real turns; a transcript that does not parse is
                   an error, never a guess
  ranked groups    prompt, responses (K >= 2) and exactly one of ranking (indices, best first) or
                   scores (higher is better, equal is a tie): its K(K-1)/2 comparisons
                   (`ranked_comparisons`)

Every problem is a `ShapeError(code, reason)`; collect quarantines the row under that code.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping

from rmpipe.core.schema import normalize_text

ABSENT = (None, "")  # an optional field left out or left blank (CSV)

_HUMAN, _ASSISTANT = "Human", "Assistant"
_ROLES = {_HUMAN: "user", _ASSISTANT: "assistant"}
_MARKER = re.compile(r"\n\n(Human|Assistant):")


class ShapeError(ValueError):
    """The row has a known shape but breaks it: `code` is the quarantine reason code."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


def json_cell(value: Any, messages: bool = False) -> Any:
    """A list spelled as JSON in a CSV cell (as spreadsheet exports write them) -> the list; else the value.
    With `messages`, only a list of {role, content} objects is decoded: a response whose text happens to be
    a JSON array stays text."""
    if type(value) is str and value[:1] == "[" and value.rstrip()[-1:] == "]":
        try:
            decoded = json.loads(value)
        except (ValueError, RecursionError):  # not JSON, a number over Python's digit limit, or nested too deeply
            return value
        if not isinstance(decoded, list):
            return value
        if messages and not all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in decoded):
            return value
        return decoded
    return value


def present(rec: Mapping[str, Any], name: str) -> bool:
    return rec.get(name) not in ABSENT if name in rec else False


def shape_of(rec: Mapping[str, Any]) -> str:
    """"ranked", "pair" or "vote", from which fields the row fills in."""
    if present(rec, "responses"):
        return "ranked"
    if present(rec, "chosen") or present(rec, "rejected"):
        return "pair"
    return "vote"


# ---------------------------------------------------------------------------- HH transcripts


def is_transcript(text: Any) -> bool:
    """An Anthropic HH-style transcript: starts with a Human turn and holds an Assistant turn."""
    return type(text) is str and "\n\nAssistant:" in text and text.lstrip().startswith("Human:")


def parse_transcript(text: str, name: str, open_end: bool = False) -> list[dict[str, str]]:
    """"\\n\\nHuman: q\\n\\nAssistant: a ..." -> [{"role": "user", "content": "q"}, {"role": "assistant", ...}].

    Turns must alternate, starting with Human, and none may be empty, except (with
    `open_end`, for a prompt) a final empty "Assistant:" cue, which is dropped.
    """
    parts = _MARKER.split("\n\n" + text.lstrip())
    if parts[0].strip():  # lstrip() guarantees the text opens with a marker; this is a second guard
        raise ShapeError("bad_transcript", f"{name} transcript has text before its first Human: turn")
    speakers, contents = parts[1::2], [c.strip() for c in parts[2::2]]
    if open_end and speakers[-1] == _ASSISTANT and not contents[-1]:
        speakers, contents = speakers[:-1], contents[:-1]
    for i, speaker in enumerate(speakers):
        expected = _HUMAN if i % 2 == 0 else _ASSISTANT
        if speaker != expected:
            raise ShapeError("bad_transcript", f"{name} transcript turn {i + 1} is {speaker}: where {expected}: "
                                               "was expected (turns must alternate, starting with Human:)")
        if not contents[i]:
            raise ShapeError("bad_transcript", f"{name} transcript turn {i + 1} ({speaker}:) is empty")
    return [{"role": _ROLES[s], "content": c} for s, c in zip(speakers, contents)]


# ---------------------------------------------------------------------------- pairs


def _messages(value: Any, name: str) -> list[dict[str, str]] | None:
    """A conversation as messages: a {role, content} list or a transcript string; None for plain text."""
    if is_transcript(value):
        return parse_transcript(value, name)
    value = json_cell(value, messages=True)
    if isinstance(value, (list, tuple)):
        messages = []
        for i, m in enumerate(value):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ShapeError("bad_conversation", f"{name} message {i} is not a {{role, content}} object of text")
            messages.append({"role": m["role"].strip().lower(), "content": m["content"]})
        return messages
    return None


def _same_turn(x: dict[str, str], y: dict[str, str]) -> bool:
    return x["role"] == y["role"] and normalize_text(x["content"]) == normalize_text(y["content"])


def split_conversations(chosen: list[dict[str, str]], rejected: list[dict[str, str]]) -> tuple[list[dict[str, str]], str, str]:
    """Implicit prompt: (prompt messages, chosen response, rejected response).

    The prompt is the longest common prefix of *turns* (never of characters: two answers that
    open alike must not lose their shared words to the prompt); each side must then hold
    exactly one more turn, an assistant turn.
    """
    n = 0
    while n < min(len(chosen), len(rejected)) and _same_turn(chosen[n], rejected[n]):
        n += 1
    if n == len(chosen) == len(rejected) and n:  # identical conversations: collect reports identical responses
        n -= 1
    if not (len(chosen) == len(rejected) == n + 1):
        raise ShapeError("bad_conversation",
                         f"chosen ({len(chosen)} turns) and rejected ({len(rejected)} turns) differ before their final "
                         f"turn (first difference at turn {n + 1}): cannot tell the prompt from the responses")
    if n == 0:
        raise ShapeError("bad_conversation", "chosen and rejected share no leading turns: there is no prompt")
    for name, turn in (("chosen", chosen[-1]), ("rejected", rejected[-1])):
        if turn["role"] != "assistant":
            raise ShapeError("bad_conversation", f"the final turn of {name} is a {turn['role']!r} turn, not an assistant "
                                                 "turn: it cannot be the response")
    return chosen[:n], chosen[-1]["content"], rejected[-1]["content"]


def _one_response(value: Any, name: str) -> Any:
    """TRL's conversational explicit pair keeps each response as [{"role": "assistant", "content": ...}]."""
    value = json_cell(value, messages=True)
    if not isinstance(value, (list, tuple)):
        return value  # a string (or a wrong type collect names)
    messages = _messages(value, name) or []
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise ShapeError("bad_conversation", f"{name} holds {len(messages)} message(s) "
                                             f"({', '.join(m['role'] for m in messages) or 'none'}); with a separate "
                                             "prompt it must be one assistant message")
    return messages[0]["content"]


def _whole_conversations(rec: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """A prompt column beside chosen / rejected that hold the whole conversation (UltraFeedback-binarized's
    shape): split the conversations as for an implicit prompt, and check the prompt column says the same
    (it may give only the last turns). None when chosen / rejected are not multi-turn conversations."""
    # message lists only (or lists as JSON text): a response string that merely looks like a transcript stays text
    conv_chosen, conv_rejected = (_messages(v, name) if not is_transcript(v) else None
                                  for v, name in ((rec.get("chosen"), "chosen"), (rec.get("rejected"), "rejected")))
    if not conv_chosen or not conv_rejected or max(len(conv_chosen), len(conv_rejected)) < 2:
        return None
    prompt, chosen_text, rejected_text = split_conversations(conv_chosen, conv_rejected)
    given = rec["prompt"]
    if is_transcript(given):
        given = parse_transcript(given, "prompt", open_end=True)
    given = json_cell(given, messages=True)
    stated = [{"role": "user", "content": given}] if isinstance(given, str) else _messages(given, "prompt") or []
    tail = prompt[-len(stated):] if stated else []
    if not stated or len(tail) != len(stated) or not all(_same_turn(a, b) for a, b in zip(tail, stated)):
        raise ShapeError("bad_conversation", f"the prompt column is not the turns chosen and rejected share "
                                             f"({len(prompt)} turn(s), the last: {prompt[-1]['content'][:60]!r}): "
                                             "cannot tell which prompt was judged")
    return {**rec, "prompt": prompt, "chosen": chosen_text, "rejected": rejected_text}


def pair_row(rec: Mapping[str, Any]) -> Mapping[str, Any]:
    """A pair row in any shape -> prompt (text or messages), chosen and rejected as text; other fields kept.

    Plain rows (string chosen / rejected beside a prompt) come back as they are (the fast path).
    """
    chosen, rejected = rec.get("chosen"), rec.get("rejected")
    if present(rec, "prompt"):
        if type(chosen) is str and type(rejected) is str:
            return rec
        whole = _whole_conversations(rec)
        if whole is not None:
            return whole
        return {**rec, "chosen": _one_response(chosen, "chosen"), "rejected": _one_response(rejected, "rejected")}
    conv_chosen, conv_rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    if conv_chosen is None or conv_rejected is None:
        return rec  # plain text with no prompt: collect reports the missing prompt
    prompt, chosen_text, rejected_text = split_conversations(conv_chosen, conv_rejected)
    return {**rec, "prompt": prompt, "chosen": chosen_text, "rejected": rejected_text}


# ---------------------------------------------------------------------------- ranked groups


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def ranked_comparisons(rec: Mapping[str, Any]) -> tuple[list[str], list[tuple[int, int, str]]]:
    """(responses, [(i, j, choice)] for every i < j): choice "a" when response i is preferred,
    "b" when response j is, "tie" for equal scores. Raises ShapeError for a malformed group."""
    responses = json_cell(rec.get("responses"))
    if not isinstance(responses, (list, tuple)) or not all(type(r) is str for r in responses):
        raise ShapeError("bad_group", "responses must be a list of strings")
    k = len(responses)
    if k < 2:
        raise ShapeError("bad_group", f"a group needs at least 2 responses, got {k}")
    first_seen: dict[str, int] = {}
    for i, text in enumerate(responses):
        if not text.strip():
            raise ShapeError("empty_text", f"responses[{i}] is empty")
        j = first_seen.setdefault(normalize_text(text), i)
        if j != i:
            raise ShapeError("bad_group", f"responses[{j}] and responses[{i}] are the same text")
    has_ranking, has_scores = present(rec, "ranking"), present(rec, "scores")
    if has_ranking == has_scores:
        raise ShapeError("bad_group" if has_ranking else "missing_field",
                         "a group needs exactly one of 'ranking' (indices, best first) or 'scores' "
                         f"(one per response), got {'both' if has_ranking else 'neither'}")
    if has_ranking:
        ranking = json_cell(rec["ranking"])
        if (not isinstance(ranking, (list, tuple)) or not all(isinstance(x, int) and not isinstance(x, bool) for x in ranking)
                or sorted(ranking) != list(range(k))):
            raise ShapeError("bad_group", f"ranking {list(ranking) if isinstance(ranking, (list, tuple)) else ranking!r} "
                                          f"is not a permutation of the response indices 0..{k - 1} (best first)")
        place = {index: position for position, index in enumerate(ranking)}
        key = [-place[i] for i in range(k)]  # higher is better, as with scores
    else:
        scores = json_cell(rec["scores"])
        if not isinstance(scores, (list, tuple)) or len(scores) != k or not all(_number(s) for s in scores):
            raise ShapeError("bad_group", f"scores must be {k} finite numbers (one per response), got {scores!r}"[:300])
        key = list(scores)
    pairs = [(i, j, "a" if key[i] > key[j] else "b" if key[i] < key[j] else "tie")
             for i in range(k) for j in range(i + 1, k)]
    return list(responses), pairs
