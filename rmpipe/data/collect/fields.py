"""Collect, one field: the quarantine reasons, and the checks and parsers of single values that
the per-row path (`rows`) and the column-wise fast path (`fast`) share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import orjson

from rmpipe.core import schema
from rmpipe.data.collect import formats

RAW_MAX_CHARS = 4000  # a quarantined row keeps this much of its raw text
META_MAX_DEPTH = 200  # lists/objects nested in one extra field (orjson writes meta JSON up to ~254 levels)
BOM = b"\xef\xbb\xbf"  # UTF-8 byte order mark: accepted (and dropped) only as a file's first bytes

# Reason codes, with the label the report counts them under.
REASONS = {
    "invalid_json": "line is not valid JSON",
    "invalid_utf8": "not valid UTF-8",
    "stray_bom": "byte order mark (EF BB BF) after the start of the file",
    "nested_too_deeply": "values nest lists/objects too deeply",
    "not_an_object": "line is not a JSON object",
    "malformed_csv": "malformed CSV record",
    "missing_field": "required field missing",
    "wrong_type": "field has the wrong type",
    "empty_text": "empty text",
    "nul_character": "text contains a NUL character",
    "field_too_long": "field over collect.max_field_chars",
    "bad_prompt": "prompt is not a string or a list of {role, content} messages",
    "bad_choice": "choice is not a, b or tie",
    "bad_strength": "unknown strength label",
    "bad_margin": "margin is not a number",
    "mixed_shape": "row mixes vote fields and pair fields",
    "bad_transcript": "Human:/Assistant: transcript does not parse",
    "bad_conversation": "chosen/rejected conversations do not split into prompt + response",
    "bad_group": "malformed ranked/rated group",
    "bad_n_votes": "n_votes is not a whole number >= 1",
    "bad_score": "score_chosen/score_rejected unusable as a margin",
    "identical_responses": "response_a and response_b are identical",
    "duplicate_vote": "duplicate vote by the same annotator on the same pair",
}

ABSENT = (None, "")  # an optional field left out or left blank (CSV)


@dataclass(frozen=True)
class Bad:
    """Why a row goes to quarantine: a code (counted in the report) and a sentence (for the person)."""

    code: str
    reason: str


def has_surrogate(text: str) -> bool:
    """Lone surrogates cannot be written as UTF-8; only in-memory callers can hand us one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _label_lookup(labels: tuple[str, ...]) -> dict[str, str]:
    """Common spellings -> label, for a one-lookup fast path ("A", "Tie", "very strong", ...)."""
    lookup = {}
    for label in labels:
        for spelling in (label, label.replace("_", " "), label.replace("_", "-")):
            lookup.update({spelling: label, spelling.upper(): label, spelling.capitalize(): label,
                           spelling.title(): label})
    return lookup


CHOICE_LABELS = _label_lookup(schema.CHOICES)
STRENGTH_LABELS = _label_lookup(schema.STRENGTHS)


def label(value: Any, known: dict[str, str]) -> str | None:
    """The canonical label for "A", " Tie ", "very strong", "Very-Strong"...; None if unknown."""
    if type(value) is not str:
        return None
    return known.get(value) or known.get(value.strip().lower().replace(" ", "_").replace("-", "_"))


def prompt_messages(value: Any) -> list[dict[str, str]]:
    """A delivered prompt as messages ("\n\nHuman: ...\n\nAssistant:" transcripts as real turns); raises
    formats.ShapeError / schema.PromptError when it is neither text nor messages."""
    if formats.is_transcript(value):
        value = formats.parse_transcript(value, "prompt", open_end=True)
    return schema.to_messages(value)


def meta_json(extras: Mapping[str, Any]) -> str:
    """Raises TypeError (orjson.JSONEncodeError) for values nested too deeply to write: see `meta_or_bad`."""
    return orjson.dumps(extras, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS, default=str).decode()


def meta_or_bad(extras: Mapping[str, Any]) -> str | Bad:
    try:
        return meta_json(extras)
    except TypeError:
        return Bad("nested_too_deeply", f"field(s) {', '.join(sorted(map(str, extras)))[:200]} nest lists/objects "
                                        "more than ~250 deep: too deep to keep as metadata")


def margin_value(value: Any) -> float | None | Bad:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return Bad("bad_margin", f"margin {value!r} is not a number")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return Bad("bad_margin", f"margin {short(value)} is not a number")
    if isinstance(value, (int, float)):
        number = float(value)
        if np.isnan(number):
            return None  # a missing value in a numeric column
        if not np.isfinite(number):
            return Bad("bad_margin", f"margin {number} is not a finite number")
        return number
    return Bad("bad_margin", f"margin must be a number, got {type_name(value)}")


def n_votes_value(value: Any) -> int | Bad:
    """A pair row's own vote count: how many judgements its label stands for (1 when not given)."""
    if value is None or value == "" or (isinstance(value, float) and np.isnan(value)):
        return 1
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit() and len(value.strip()) <= 18:
        value = int(value.strip())  # (a longer or non-ASCII digit string is no vote count: int() would refuse it)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    return Bad("bad_n_votes", f"n_votes {short(value)} is not a whole number >= 1")


def score_margin(chosen: Any, rejected: Any) -> float | None | Bad:
    """collect.margin_from_scores: score_chosen - score_rejected (None when the row has no scores)."""
    if chosen in ABSENT and rejected in ABSENT:
        return None
    values = [margin_value(chosen), margin_value(rejected)]
    if any(isinstance(v, Bad) or v is None for v in values):
        return Bad("bad_score", f"score_chosen {short(chosen)} / score_rejected {short(rejected)} are not two numbers")
    gap = values[0] - values[1]
    if gap < 0:
        return Bad("bad_score", f"score_chosen {values[0]:g} is below score_rejected {values[1]:g}: the scores "
                                 "contradict the label")
    return gap


def given_pair_id(value: Any) -> str | None | Bad:
    """A delivered pair_id (kept as given), None to derive one, or why it cannot be used."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        if "\x00" not in text and len(text) <= 200:
            return text
    return Bad("wrong_type", f"field 'pair_id' must be a short string (or left out), got {short(value)}")

