"""The data contract shared by every stage: column names, prompt canonical form, hashes.

Prompts arrive as a plain string or as a list of chat messages. Inside rmpipe
every prompt is stored as *canonical chat JSON*: a list of `{"role", "content"}`
messages serialised with sorted keys and no extra whitespace. A plain string `s`
becomes `[{"role": "user", "content": s}]`, so the same question asked as text or
as a one-turn chat is the same prompt.

`prompt_hash` is SHA-256 over the *normalized* canonical form (Unicode NFKC,
whitespace runs collapsed to one space, ends stripped, roles lower-cased): two
deliveries of a prompt that differ only in such invisible ways hash alike, which
is what keeps a prompt in one split forever.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from typing import Any

import orjson

# --- vote rows (one annotator's judgement), as written by the collect stage -------------
VOTE_COLUMNS = [
    "batch_id",  # file name of the delivery (without folder)
    "line",  # 1-based line / row number in that file
    "pair_id",
    "prompt",  # canonical chat JSON
    "prompt_hash",  # prompt_hash(prompt), computed once per distinct prompt by collect
    "response_a",
    "response_b",
    "annotator_id",
    "choice",  # "a" | "b" | "tie"
    "strength",  # "slight" | "moderate" | "strong" | "very_strong" | None
    "margin",  # explicit margin from pair rows, else None
    "meta",  # JSON of any extra fields
    "prejudged",  # True: from an already-judged row (a pair row, or a ranked/rated group), not an A/B vote row
    "n_votes",  # judgements the row stands for: a pair row's own `n_votes` (else 1); 1 for every other vote
    "group_id",  # the ranked/rated group (prompt + its K responses) the vote was expanded from, else None
]
# Columns a vote table written before they existed may lack, with the value they mean there.
VOTE_DEFAULTS = {"prejudged": False, "n_votes": 1, "group_id": None}
CHOICES = ("a", "b", "tie")
STRENGTHS = ("slight", "moderate", "strong", "very_strong")

# --- aggregated pairs (what training reads) ----------------------------------------------
PAIR_COLUMNS = [
    "pair_id",
    "prompt",
    "chosen",
    "rejected",
    "n_votes",
    "n_chosen",
    "n_rejected",
    "n_tie",
    "agreement",
    "soft_label",
    "margin",
    "prompt_hash",
    "split",
    "batch_ids",
]
SPLITS = ("train", "val", "test")

# A batch is one file of these kinds (or a dataset folder); its name is its batch id.
BATCH_FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}
# A batch id (its file name) longer than this is refused by admission and collect alike: the names derived
# from it (<name>.source.json, temp files, records) must fit the file system's 255 bytes.
MAX_BATCH_NAME_BYTES = 200


def anonymous_annotator(batch_id: str) -> str:
    """The annotator of a judgement delivered without one: one anonymous annotator per batch."""
    return f"anonymous:{batch_id}"

_ASCII_SPACE_NOT_SPACE = bytes([9, 10, 11, 12, 13, 28, 29, 30, 31])  # what str.isspace() adds to " "
_ASCII_SPACE_TO_SPACE = bytes.maketrans(_ASCII_SPACE_NOT_SPACE, b" " * len(_ASCII_SPACE_NOT_SPACE))


def normalize_text(text: str) -> str:
    """NFKC, whitespace runs collapsed to one space, ends stripped.

    Runs on every distinct text of a batch (hundreds of thousands per run), hence the fast paths:
    NFKC keeps ASCII, so ASCII text only has its whitespace collapsed, with byte operations
    (several times faster than split()/join on texts with newlines) and clean ASCII is returned
    as is. Other text: split()/join is the regex `\\s+` -> " " plus strip.
    """
    if text.isascii():
        raw = text.encode("ascii")
        spaced = raw.translate(_ASCII_SPACE_TO_SPACE)  # every whitespace character -> " "
        if spaced == raw and b"  " not in raw and raw[:1] != b" " and raw[-1:] != b" ":
            return text  # already normal: share the object
        while b"  " in spaced:  # each pass halves every run of spaces
            spaced = spaced.replace(b"  ", b" ")
        return spaced.strip(b" ").decode("ascii")
    return " ".join(unicodedata.normalize("NFKC", text).split())


class PromptError(ValueError):
    """The prompt is neither a non-empty string nor a list of {role, content} messages."""


def to_messages(prompt: Any) -> list[dict[str, str]]:
    """Turn a delivered prompt (string, message list, or JSON of a message list) into messages."""
    if isinstance(prompt, str):
        stripped = prompt.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            try:
                parsed = json.loads(stripped)
            except json.JSONDecodeError:
                parsed = None
            if isinstance(parsed, list) and parsed and all(isinstance(m, dict) for m in parsed):
                return to_messages(parsed)
        if not stripped:
            raise PromptError("prompt is empty")
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, (list, tuple)):
        if not prompt:
            raise PromptError("prompt is an empty message list")
        messages = []
        for i, message in enumerate(prompt):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise PromptError(f"prompt message {i} is not a {{role, content}} object")
            role, content = message["role"], message["content"]
            if not isinstance(role, str) or not isinstance(content, str):
                raise PromptError(f"prompt message {i} has a non-string role or content")
            if not role.strip():
                raise PromptError(f"prompt message {i} has an empty role")
            messages.append({"role": role.strip().lower(), "content": content})
        if not any(m["content"].strip() for m in messages):
            raise PromptError("every prompt message is empty")
        return messages
    raise PromptError(f"prompt must be a string or a list of messages, got {type(prompt).__name__}")


def _canonical_json(messages: list[dict[str, str]]) -> str:
    # Compact, sorted keys, non-ASCII kept: the same text json.dumps(sort_keys, separators) writes.
    return orjson.dumps(messages, option=orjson.OPT_SORT_KEYS).decode()


def canonical_messages(messages: list[dict[str, str]]) -> str:
    """`canonical_prompt` for messages that already came out of `to_messages`."""
    return _canonical_json(messages)


def canonical_prompt(prompt: Any) -> str:
    """The stored form of a prompt: canonical JSON of its messages (content kept verbatim)."""
    return canonical_messages(to_messages(prompt))


def prompt_messages(canonical: str) -> list[dict[str, str]]:
    """Inverse of `canonical_prompt` for a stored prompt."""
    return json.loads(canonical)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def messages_hash(messages: list[dict[str, str]]) -> str:
    """`prompt_hash` for messages that already came out of `to_messages`."""
    normalized = [{"role": m["role"], "content": normalize_text(m["content"])} for m in messages]
    return text_sha256(_canonical_json(normalized))


def prompt_hash(prompt: Any) -> str:
    """SHA-256 of the normalized prompt (NFKC, whitespace collapsed, chat canonicalized)."""
    return messages_hash(to_messages(prompt))


def pair_id_from_digests(prompt_digest: str, first_digest: str, second_digest: str) -> str:
    """`pair_id` from the prompt hash and the sha256 of each normalized response, in canonical
    order: the response whose normalized text sorts first comes first."""
    return text_sha256("\x1f".join((prompt_digest, first_digest, second_digest)))[:24]


def pair_id(prompt: Any, response_1: str, response_2: str) -> str:
    """Id of a comparison: the prompt plus the *unordered* pair of responses.

    A/B and B/A presentations of the same two responses get the same id.
    """
    first, second = sorted((normalize_text(response_1), normalize_text(response_2)))
    return pair_id_from_digests(prompt_hash(prompt), text_sha256(first), text_sha256(second))
