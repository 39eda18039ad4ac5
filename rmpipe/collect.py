"""Collect: normalize every annotation batch in `collect.incoming_dir` into one vote table.

Every row of every batch ends in exactly one place: the vote table (columns
`schema.VOTE_COLUMNS`) or the quarantine, with its batch, line and a reason a person
can act on. Per batch the report counts where the rows went and why, and gives the
batch's status:

  accepted          its votes are in the table
  rejected          too many bad rows (over `max_bad_share`) or the file cannot be read
  refused           not read at all: a symlink, a bad name, or over `max_file_mb`
  duplicate_of:<b>  byte-identical to batch <b>, already counted

`on_rejected_batch` decides what a rejected/refused batch does to the run: `fail`
stops it (`raise_for_rejected`), `skip` drops the batch with a warning. Either way
its good rows never reach the vote table.

Speed: a file is parsed once (orjson per JSONL line, pyarrow for CSV and Parquet, the
csv module only for a CSV that pyarrow refuses); everything derived from the texts
(canonical prompt, prompt hash, pair id, the identical-responses check) is computed
once per *distinct* prompt / response pair, and equal texts share one string object,
so a million votes cost the memory of their distinct texts.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import json
import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from rmpipe import formats, hf_batches, retractions, schema
from rmpipe.errors import ConfigError, DataError
from rmpipe.io import atomic_path, folder_sha256, sha256_file
from rmpipe.params import fraction, get

log = logging.getLogger("rmpipe.collect")

FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}
POLICIES = ("fail", "skip")
RAW_MAX_CHARS = 4000  # a quarantined row keeps this much of its raw text

# Reason codes, with the label the report counts them under.
REASONS = {
    "invalid_json": "line is not valid JSON",
    "invalid_utf8": "not valid UTF-8",
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

_VOTE_FIELDS = ("response_a", "response_b", "choice")
_PAIR_FIELDS = ("chosen", "rejected")
_ABSENT = (None, "")  # an optional field left out or left blank (CSV)
# Fields with a column of their own; anything else in a row is kept in `meta`. A margin is
# read from pair rows only (the contract); on a vote row it is just metadata.
_VOTE_KNOWN = frozenset(("prompt", "annotator_id", "strength", "pair_id") + _VOTE_FIELDS)
_PAIR_KNOWN = frozenset(("prompt", "annotator_id", "strength", "pair_id", "margin", "n_votes") + _PAIR_FIELDS)
_RANKED_KNOWN = frozenset(("prompt", "annotator_id", "strength", "responses", "ranking", "scores"))


# ----------------------------------------------------------------------------------------------
# Config and results
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CollectConfig:
    incoming_dir: Path
    max_bad_share: float
    max_field_chars: int
    max_file_mb: float
    on_rejected_batch: str  # fail | skip
    margin_from_scores: bool = False  # score_chosen - score_rejected (a group's score gap) becomes the margin
    hf_split: str = "train"  # the split read from a DatasetDict folder or a shard folder

    @classmethod
    def from_params(cls, cfg: Mapping[str, Any]) -> "CollectConfig":
        """Read and check the `collect:` section of params.yaml."""
        if isinstance(cfg, CollectConfig):
            return cfg
        where = "collect"
        conf = cls(
            incoming_dir=Path(get(cfg, "incoming_dir", str, where)),
            max_bad_share=fraction(cfg, "max_bad_share", where),
            max_field_chars=get(cfg, "max_field_chars", int, where),
            max_file_mb=float(get(cfg, "max_file_mb", float, where)),
            on_rejected_batch=get(cfg, "on_rejected_batch", str, where, choices=POLICIES),
            # optional keys (older params files lack them): the defaults keep today's behaviour
            margin_from_scores=get({"margin_from_scores": False, **cfg}, "margin_from_scores", bool, where),
            hf_split=get({"hf_split": "train", **cfg}, "hf_split", str, where),
        )
        if conf.max_field_chars < 1 or conf.max_file_mb <= 0:
            raise ConfigError("params.yaml: collect.max_field_chars and collect.max_file_mb must be positive")
        return conf


@dataclass
class BatchResult:
    """One batch file, checked: its normalized votes, its quarantined rows and its report entry.

    `votes` holds the normalized rows whatever the status; `collect_dir` keeps them only
    when `accepted`.
    """

    batch_id: str
    votes: pd.DataFrame
    quarantine: list[dict]
    report: dict

    @property
    def accepted(self) -> bool:
        return self.report["status"] == "accepted"


@dataclass(frozen=True)
class _Bad:
    """Why a row goes to quarantine: a code (counted in the report) and a sentence (for the person)."""

    code: str
    reason: str


# A normalized vote is a plain tuple of the values of schema.VOTE_COLUMNS[2:] (pair_id ... group_id):
# a million of them stay small and cheap to build (a NamedTuple costs ~2 us more per row), and
# zip(*votes) gives the columns.
_Vote = tuple
_VOTE_FIELDS_OUT = tuple(schema.VOTE_COLUMNS[2:])
_PAIR_ID, _ANNOTATOR = _VOTE_FIELDS_OUT.index("pair_id"), _VOTE_FIELDS_OUT.index("annotator_id")
_PREJUDGED = _VOTE_FIELDS_OUT.index("prejudged")


# ----------------------------------------------------------------------------------------------
# One row -> one vote
# ----------------------------------------------------------------------------------------------


def _has_surrogate(text: str) -> bool:
    """Lone surrogates cannot be written as UTF-8; only in-memory callers can hand us one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _short(value: Any, limit: int = 60) -> str:
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


_CHOICES = _label_lookup(schema.CHOICES)
_STRENGTHS = _label_lookup(schema.STRENGTHS)


def _label(value: Any, known: dict[str, str]) -> str | None:
    """The canonical label for "A", " Tie ", "very strong", "Very-Strong"...; None if unknown."""
    if type(value) is not str:
        return None
    return known.get(value) or known.get(value.strip().lower().replace(" ", "_").replace("-", "_"))


class _Normalizer:
    """Turns records (dicts, any input format) into votes, caching what is derived from texts.

    Caches are keyed by text, so a prompt's canonical form and hash, a response's
    normalized form, and a pair's id are computed once however many votes share them,
    and every vote holds the same string objects. Only texts that passed the checks are
    cached, so a cache hit is also a pass.
    """

    def __init__(self, max_field_chars: int, margin_from_scores: bool = False):
        self.max_chars = max_field_chars
        self.margin_from_scores = margin_from_scores
        self._prompts: dict[Any, tuple[str, str] | _Bad] = {}  # delivered prompt -> (canonical, hash)
        self._canonical: dict[str, str] = {}  # one shared object per canonical prompt
        self._texts: dict[str, tuple[str, str, str]] = {}  # response -> (shared, normalized, its sha256)
        self._pairs: dict[tuple[str, str, str], str] = {}  # (canonical prompt, a, b) -> pair_id
        self._annotators: dict[str, str] = {}  # as delivered -> clean id
        self._meta: dict[str, str] = {}  # one shared object per distinct meta JSON

    def _too_long(self, name: str, size: int) -> _Bad:
        return _Bad("field_too_long", f"field '{name}' is {size} chars, over collect.max_field_chars={self.max_chars}")

    # -- fields (slow paths: first sight of a value) -------------------------------------------
    def _new_text(self, value: Any, name: str) -> tuple[str, str, str] | _Bad:
        if value is None:
            return _Bad("missing_field", f"missing required field '{name}'")
        if not isinstance(value, str):
            return _Bad("wrong_type", f"field '{name}' must be a string, got {_type_name(value)}")
        if len(value) > self.max_chars:
            return self._too_long(name, len(value))
        if not value or value.isspace():
            return _Bad("empty_text", f"{name} is empty")
        if "\x00" in value:
            return _Bad("nul_character", f"{name} contains a NUL character")
        if not value.isascii() and _has_surrogate(value):
            return _Bad("invalid_utf8", f"{name} holds a lone surrogate (not valid UTF-8)")
        normalized = schema.normalize_text(value)
        if normalized == value:
            normalized = value  # share the object: no extra memory for already-clean text
        digest = schema.text_sha256(normalized)
        cached = self._texts[value] = (value, normalized, digest)
        return cached

    def _new_annotator(self, value: Any) -> str | _Bad:
        if value is None:
            return _Bad("missing_field", "missing required field 'annotator_id'")
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            return _Bad("wrong_type", f"field 'annotator_id' must be a string, got {_type_name(value)}")
        text = str(value).strip()
        if not text:
            return _Bad("empty_text", "annotator_id is empty")
        if len(text) > self.max_chars:
            return self._too_long("annotator_id", len(text))
        if "\x00" in text:
            return _Bad("nul_character", "annotator_id contains a NUL character")
        if isinstance(value, str):
            self._annotators[value] = text
        return self._annotators.setdefault(text, text)

    def _new_prompt(self, value: Any) -> tuple[str, str] | _Bad:
        if value is None:
            return _Bad("missing_field", "missing required field 'prompt'")
        if isinstance(value, str):
            key: Any = value
        elif isinstance(value, (list, tuple)):
            try:
                key = ("chat", orjson.dumps(list(value)))
            except TypeError:
                return _Bad("bad_prompt", "prompt messages hold values that are not text")
        else:
            return _Bad("wrong_type", "field 'prompt' must be a string or a list of {role, content} messages, "
                                      f"got {_type_name(value)}")
        cached = self._prompts.get(key)
        if cached is None:
            cached = self._prompts[key] = self._prompt_info(value)
        return cached

    def _prompt_info(self, value: Any) -> tuple[str, str] | _Bad:
        if isinstance(value, str) and len(value) > self.max_chars:
            return self._too_long("prompt", len(value))
        try:
            if formats.is_transcript(value):  # "\n\nHuman: ...\n\nAssistant:" -> real turns
                value = formats.parse_transcript(value, "prompt", open_end=True)
            messages = schema.to_messages(value)
        except formats.ShapeError as exc:
            return _Bad(exc.code, exc.reason)
        except schema.PromptError as exc:
            return _Bad("empty_text" if "empty" in str(exc) else "bad_prompt", str(exc))
        size = sum(len(m["content"]) for m in messages)
        if size > self.max_chars:
            return self._too_long("prompt", size)
        if any("\x00" in m["content"] or "\x00" in m["role"] for m in messages):
            return _Bad("nul_character", "prompt contains a NUL character")
        if not all(m["content"].isascii() and m["role"].isascii() for m in messages) and any(
                _has_surrogate(m["content"]) or _has_surrogate(m["role"]) for m in messages):
            return _Bad("invalid_utf8", "prompt holds a lone surrogate (not valid UTF-8)")
        canonical = schema.canonical_messages(messages)
        return self._canonical.setdefault(canonical, canonical), schema.messages_hash(messages)

    def _pair_id(self, prompt: tuple[str, str], a: tuple[str, str, str], b: tuple[str, str, str]) -> str:
        """schema.pair_id, from the cached prompt hash and response digests."""
        key = (prompt[0], a[0], b[0])
        found = self._pairs.get(key)
        if found is None:
            first, second = (a, b) if a[1] <= b[1] else (b, a)
            found = schema.pair_id_from_digests(prompt[1], first[2], second[2])
            self._pairs[key] = found
        return found

    # -- the row -------------------------------------------------------------------------------
    def normalize(self, rec: Mapping[str, Any], batch_id: str) -> _Vote | list[_Vote] | _Bad:
        """One record -> a vote (vote row, pair row in any shape of rmpipe.formats), the votes of a
        ranked/rated group, or the reason it cannot be normalized."""
        get = rec.get
        if "responses" in rec and get("responses") not in _ABSENT:
            return self._group(rec, batch_id)
        is_pair = ("chosen" in rec or "rejected" in rec) and (get("chosen") not in _ABSENT or get("rejected") not in _ABSENT)
        if is_pair and any(get(name) not in _ABSENT for name in _VOTE_FIELDS):
            return _Bad("mixed_shape", "row has both vote fields (response_a/response_b/choice) and pair fields "
                                       "(chosen/rejected): send one shape per row")
        if is_pair:
            try:
                rec = formats.pair_row(rec)  # conversational / implicit-prompt / HH pairs -> prompt + two texts
            except formats.ShapeError as exc:
                return _Bad(exc.code, exc.reason)
            get = rec.get
        a_name, b_name = ("chosen", "rejected") if is_pair else ("response_a", "response_b")
        # Each field: a cache hit (type(...) is str, seen before) is the fast path.
        value = get(a_name)
        a = (type(value) is str and self._texts.get(value)) or self._new_text(value, a_name)
        if isinstance(a, _Bad):
            return a
        value = get(b_name)
        b = (type(value) is str and self._texts.get(value)) or self._new_text(value, b_name)
        if isinstance(b, _Bad):
            return b

        value = get("annotator_id")
        if value in _ABSENT and is_pair:
            value = f"anonymous:{batch_id}"  # pair rows may come without annotators
        elif value == "":
            return _Bad("empty_text", "annotator_id is empty")
        annotator = (type(value) is str and self._annotators.get(value)) or self._new_annotator(value)
        if isinstance(annotator, _Bad):
            return annotator

        if is_pair:
            choice = "a"  # a pair row is one vote for `chosen`, which becomes response_a
        else:
            value = get("choice")
            if value is None:
                return _Bad("missing_field", "missing required field 'choice'")
            choice = _label(value, _CHOICES)  # type: ignore[assignment]
            if choice is None:
                return _Bad("bad_choice", f"choice {_short(value)} is not one of a, b, tie")
        value = get("strength")
        strength = None
        if value not in _ABSENT:
            strength = _label(value, _STRENGTHS)
            if strength is None:
                return _Bad("bad_strength", f"strength {_short(value)} is not one of {', '.join(schema.STRENGTHS)}")
        margin = get("margin") if is_pair else None
        if margin is not None:
            margin = _margin(margin)
            if isinstance(margin, _Bad):
                return margin
        n_votes = 1
        if is_pair:
            n_votes = _n_votes(get("n_votes"))
            if isinstance(n_votes, _Bad):
                return n_votes
            if margin is None and self.margin_from_scores:
                margin = _score_margin(get("score_chosen"), get("score_rejected"))
                if isinstance(margin, _Bad):
                    return margin

        value = get("prompt")
        prompt = (type(value) is str and self._prompts.get(value)) or self._new_prompt(value)
        if isinstance(prompt, _Bad):
            return prompt
        if a[1] == b[1]:
            same = " after whitespace/Unicode normalization" if a[0] != b[0] else ""
            return _Bad("identical_responses", f"{a_name} and {b_name} are identical{same}")
        pair_id = get("pair_id")
        if pair_id is not None:
            pair_id = _given_pair_id(pair_id)
            if isinstance(pair_id, _Bad):
                return pair_id

        meta = "{}"
        extra_keys = rec.keys() - (_PAIR_KNOWN if is_pair else _VOTE_KNOWN)
        if extra_keys:
            extras = {k: rec[k] for k in extra_keys}
            meta = orjson.dumps(extras, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS, default=str).decode()
            meta = self._meta.setdefault(meta, meta)
        return (pair_id or self._pair_id(prompt, a, b), prompt[0], prompt[1], a[0], b[0], annotator, choice,
                strength, margin, meta, is_pair, n_votes, None)

    def _group(self, rec: Mapping[str, Any], batch_id: str) -> list[_Vote] | _Bad:
        """A ranked/rated group -> one vote per comparison (K(K-1)/2), all sharing a group_id.

        Each comparison goes through `normalize` as a vote row, so its texts get the same checks.
        """
        if any(rec.get(name) not in _ABSENT for name in _VOTE_FIELDS + _PAIR_FIELDS if name in rec):
            return _Bad("mixed_shape", "row has 'responses' (a ranked group) and vote or pair fields: one shape per row")
        try:
            responses, comparisons = formats.ranked_comparisons(rec)
        except formats.ShapeError as exc:
            return _Bad(exc.code, exc.reason)
        annotator = rec.get("annotator_id")
        annotator = f"anonymous:{batch_id}" if annotator in _ABSENT else annotator
        scores = formats.json_cell(rec.get("scores")) if formats.present(rec, "scores") else None
        extras = {k: rec[k] for k in rec.keys() - _RANKED_KNOWN}
        votes = []
        for i, j, choice in comparisons:
            vote = self.normalize({"prompt": rec.get("prompt"), "response_a": responses[i], "response_b": responses[j],
                                   "annotator_id": annotator, "choice": choice, "strength": rec.get("strength")}, batch_id)
            if isinstance(vote, _Bad):
                return _Bad(vote.code, f"responses {i} vs {j}: {vote.reason}")
            votes.append(vote)
        # The group: its prompt and its set of responses (not the annotator: two annotators' rankings
        # of one group share the id).
        digests = sorted(self._texts[r][2] for r in responses)
        group_id = "g-" + schema.text_sha256("\x1f".join([votes[0][2], *digests]))[:22]
        out = []
        for (i, j, _), vote in zip(comparisons, votes):
            margin = abs(scores[i] - scores[j]) * 1.0 if scores is not None and self.margin_from_scores else None
            meta = {**extras, **({"score_a": scores[i], "score_b": scores[j]} if scores is not None else {}),
                    "group_index": [i, j]}
            meta_json = orjson.dumps(meta, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS, default=str).decode()
            out.append(vote[:8] + (margin, meta_json, True, 1, group_id))
        return out


def _margin(value: Any) -> float | None | _Bad:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return _Bad("bad_margin", f"margin {value!r} is not a number")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return _Bad("bad_margin", f"margin {_short(value)} is not a number")
    if isinstance(value, (int, float)):
        number = float(value)
        if np.isnan(number):
            return None  # a missing value in a numeric column
        if not np.isfinite(number):
            return _Bad("bad_margin", f"margin {number} is not a finite number")
        return number
    return _Bad("bad_margin", f"margin must be a number, got {_type_name(value)}")


def _n_votes(value: Any) -> int | _Bad:
    """A pair row's own vote count: how many judgements its label stands for (1 when not given)."""
    if value is None or value == "" or (isinstance(value, float) and np.isnan(value)):
        return 1
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    return _Bad("bad_n_votes", f"n_votes {_short(value)} is not a whole number >= 1")


def _score_margin(chosen: Any, rejected: Any) -> float | None | _Bad:
    """collect.margin_from_scores: score_chosen - score_rejected (None when the row has no scores)."""
    if chosen in _ABSENT and rejected in _ABSENT:
        return None
    values = [_margin(chosen), _margin(rejected)]
    if any(isinstance(v, _Bad) or v is None for v in values):
        return _Bad("bad_score", f"score_chosen {_short(chosen)} / score_rejected {_short(rejected)} are not two numbers")
    gap = values[0] - values[1]
    if gap < 0:
        return _Bad("bad_score", f"score_chosen {values[0]:g} is below score_rejected {values[1]:g}: the scores "
                                 "contradict the label")
    return gap


def _given_pair_id(value: Any) -> str | None | _Bad:
    """A delivered pair_id (kept as given), None to derive one, or why it cannot be used."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        if "\x00" not in text and len(text) <= 200:
            return text
    return _Bad("wrong_type", f"field 'pair_id' must be a short string (or left out), got {_short(value)}")


# ----------------------------------------------------------------------------------------------
# Readers: (line, record or _Bad, raw) per row
# ----------------------------------------------------------------------------------------------


def _json_problem(raw: bytes) -> _Bad:
    """Why orjson refused a line, in words (the stdlib parser gives the friendlier message)."""
    if b"\x00" in raw:
        return _Bad("nul_character", f"line contains a NUL byte at byte {raw.index(0)}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _Bad("invalid_utf8", f"not valid UTF-8 at byte {exc.start} of the line (0x{raw[exc.start]:02x})")
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        return _Bad("invalid_json", f"line is not valid JSON: {exc.msg} at column {exc.colno}")
    except RecursionError:
        return _Bad("invalid_json", "line is not valid JSON: nested too deeply")
    return _Bad("invalid_json", "line is not valid JSON: it holds an unpaired surrogate escape or an out-of-range number")


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any, Any]]:
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, 1):
            if raw.isspace():
                continue  # a blank line holds no row
            try:
                rec = orjson.loads(raw)
            except orjson.JSONDecodeError:
                yield line_no, _json_problem(raw), raw
                continue
            if not isinstance(rec, dict):
                yield line_no, _Bad("not_an_object", f"line is a JSON {_type_name(rec)}, not an object of fields"), raw
                continue
            yield line_no, rec, raw


def _bad_utf8_field(header: list[str], row: list[str]) -> _Bad | None:
    """CSV is decoded with surrogateescape: a bad byte survives as a lone surrogate we can point at."""
    for name, value in zip(header, row):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                byte = ord(value[exc.start]) - 0xDC00
                return _Bad("invalid_utf8", f"field '{name}' is not valid UTF-8 (byte 0x{byte:02x} at char {exc.start})")
    return None


def _read_csv(path: Path) -> Iterator[tuple[int, Any, Any]]:
    """Records (1-based, header excluded); quoted fields may hold newlines, quotes and commas.

    Fast path: pyarrow parses the whole file. If it refuses (bad UTF-8, a ragged record...),
    the csv module reads it record by record so each bad record gets its own reason.
    """
    with path.open("r", encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        header = next(csv.reader(fh), None)
    if not header:
        return
    names = [name.strip() for name in header]
    if len(set(header)) == len(header):
        try:
            table = pa_csv.read_csv(
                path,
                parse_options=pa_csv.ParseOptions(newlines_in_values=True),
                convert_options=pa_csv.ConvertOptions(
                    column_types={name: pa.string() for name in header},
                    strings_can_be_null=False,
                    quoted_strings_can_be_null=False,
                ),
            )
        except pa.ArrowInvalid:
            pass
        else:
            record = 0
            for batch in table.to_batches(max_chunksize=65_536):
                for values in zip(*(column.to_pylist() for column in batch.columns)):
                    record += 1
                    rec = dict(zip(names, values))
                    yield record, rec, rec
            return
    yield from _read_csv_records(path, names)


def _read_csv_records(path: Path, names: list[str]) -> Iterator[tuple[int, Any, Any]]:
    previous_limit = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # our own max_field_chars check gives the better message
    try:
        with path.open("r", encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
            reader = csv.reader(fh)
            next(reader, None)  # the header
            record = 0
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    record += 1
                    yield record, _Bad("malformed_csv", f"CSV record is malformed: {exc}"), None
                    continue
                if not row:
                    continue  # a blank line holds no record
                record += 1
                if len(row) != len(names):
                    problem = _Bad("malformed_csv", f"record has {len(row)} fields but the header has {len(names)}")
                    yield record, problem, row
                    continue
                yield record, _bad_utf8_field(names, row) or dict(zip(names, row)), row
    finally:
        csv.field_size_limit(previous_limit)


def _read_parquet(path: Path) -> Iterator[tuple[int, Any, Any]]:
    """Row index + 1; list<struct<role, content>> prompt columns arrive as message lists."""
    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=65_536):
        names = batch.schema.names
        for values in zip(*(column.to_pylist() for column in batch.columns)):
            row += 1
            rec = dict(zip(names, values))
            yield row, rec, rec


_READERS = {"jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet}
_UNREADABLE = (OSError, pa.ArrowException, ValueError, UnicodeError)  # hf_batches.UnreadableDataset is a ValueError


def _raw_text(raw: Any) -> str | None:
    """The row as delivered, for a person to fix: the JSONL line, or the CSV/Parquet record as JSON."""
    if raw is None:
        return None
    if isinstance(raw, bytes):
        text = raw.decode("utf-8", errors="backslashreplace").rstrip("\r\n")
    else:
        text = json.dumps(raw, ensure_ascii=False, default=str)
        try:  # CSV bytes that were not UTF-8 survive as lone surrogates: show them as \xNN escapes
            text = text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="backslashreplace")
        except UnicodeEncodeError:
            text = text.encode("utf-8", errors="backslashreplace").decode("utf-8")
    if len(text) > RAW_MAX_CHARS:
        return f"{text[:RAW_MAX_CHARS]}... [{len(text) - RAW_MAX_CHARS} more chars]"
    return text


# ----------------------------------------------------------------------------------------------
# One batch
# ----------------------------------------------------------------------------------------------


def _file_problem(path: Path, conf: CollectConfig) -> str | None:
    """Why a batch file (or dataset folder) is refused unread, or None."""
    name = path.name
    if "/" in name or "\\" in name or ".." in name:
        return f"file name {name!r} holds a path separator or '..': rename it"
    if path.is_symlink():
        return ("is a symbolic link; batches must be regular files inside the incoming folder "
                "(copy the file in; with DVC use `dvc config cache.type copy`)")
    if path.is_dir():
        return _folder_problem(path, conf)
    if not path.is_file():
        return "is not a regular file"
    size_mb = path.stat().st_size / 2**20
    if size_mb > conf.max_file_mb:
        return f"file is {size_mb:.1f} MB, over collect.max_file_mb={conf.max_file_mb:g}: split it into smaller batches"
    return None


def _folder_problem(path: Path, conf: CollectConfig) -> str | None:
    """A dataset folder: every file inside a regular file (no links out of the incoming folder), within max_file_mb."""
    files = hf_batches.folder_files(path)
    links = [f.relative_to(path).as_posix() for f in files if f.is_symlink()]
    if links:
        return (f"holds symbolic links ({', '.join(links[:3])}); a dataset folder must hold regular files only "
                "(copy them in; with DVC use `dvc config cache.type copy`)")
    size_mb = sum(f.stat().st_size for f in files) / 2**20
    if size_mb > conf.max_file_mb:
        return (f"dataset folder is {size_mb:.1f} MB, over collect.max_file_mb={conf.max_file_mb:g}: "
                "split it into smaller batches")
    return None


def _new_entry(path: Path) -> dict[str, Any]:
    return {
        "batch_id": path.name,
        "format": hf_batches.folder_kind(path) if path.is_dir() and not path.is_symlink() else FORMATS.get(path.suffix.lower()),
        "bytes": None,
        "sha256": None,
        "status": None,
        "rows_read": 0,
        "rows_normalized": 0,
        "rows_quarantined": 0,
        "rows_excluded_with_batch": 0,
        "votes": 0,
        "shapes": {},
        "bad_share": 0.0,
        "top_reasons": [],
        "message": None,
    }


def _top_reasons(quarantine: list[dict], n: int = 5) -> list[dict]:
    counts = Counter(row["code"] for row in quarantine)
    first = {}
    for row in quarantine:
        first.setdefault(row["code"], row)
    return [
        {"reason": REASONS[code], "code": code, "count": count,
         "example": f"line {first[code]['line']}: {first[code]['reason']}"}
        for code, count in counts.most_common(n)
    ]


def _rejection_message(entry: dict, conf: CollectConfig) -> str:
    top = "; ".join(f"{r['reason']} x{r['count']} (e.g. {r['example']})" for r in entry["top_reasons"][:3])
    return (f"{entry['batch_id']}: {entry['bad_share']:.1%} of its {entry['rows_read']} rows are bad, over "
            f"collect.max_bad_share={conf.max_bad_share:g}; top reasons: {top}")


_NUMERIC = {"margin": float, "prejudged": bool, "n_votes": np.int64}


def _votes_frame(batch_id: str, lines: list[int], votes: list[_Vote]) -> pd.DataFrame:
    """Object columns on purpose: they share the normalizer's string objects (a str column would copy)."""
    columns: dict[str, Any] = {"batch_id": pd.Series([batch_id] * len(votes), dtype=object),
                               "line": np.asarray(lines, dtype=np.int64)}
    values = list(zip(*votes)) if votes else [()] * len(_VOTE_FIELDS_OUT)
    for name, column in zip(_VOTE_FIELDS_OUT, values):
        if name in _NUMERIC:
            columns[name] = np.asarray(column, dtype=_NUMERIC[name])
        else:
            columns[name] = pd.Series(column, dtype=object)
    return pd.DataFrame(columns, columns=schema.VOTE_COLUMNS)


def _collect_batch(
    path: Path,
    conf: CollectConfig,
    normalizer: _Normalizer,
    accepted: dict[tuple[str, str], tuple[str, int]],
    seen_files: dict[str, str],
    retracted: list[dict],
) -> BatchResult:
    """Read one batch. `accepted` holds (annotator, pair) -> (batch, line) of votes already in the
    table (a repeat is a duplicate); `seen_files` maps content sha256 -> batch of files already read;
    `retracted` is the retraction register (a retracted batch is refused unread)."""
    entry = _new_entry(path)
    batch_id = path.name
    empty = BatchResult(batch_id, _votes_frame(batch_id, [], []), [], entry)
    problem = _file_problem(path, conf)
    if problem:
        entry.update(status="refused", message=f"{batch_id}: {problem}")
        return empty
    try:
        if path.is_dir():
            entry["bytes"] = sum(f.stat().st_size for f in hf_batches.folder_files(path))
            entry["sha256"] = folder_sha256(path)
        else:
            entry["bytes"] = path.stat().st_size
            entry["sha256"] = sha256_file(path)
    except OSError as exc:  # e.g. chmod 000: the batch cannot be read at all
        entry.update(status="rejected", message=f"{batch_id}: cannot read the file ({exc.strerror or exc}): "
                                                "fix its permissions (chmod a+r) or remove it")
        return empty
    if (why := retractions.refusal(retracted, batch_id, entry["sha256"])) is not None:
        entry.update(status="refused", message=why)
        return empty
    if entry["sha256"] in seen_files:
        original = seen_files[entry["sha256"]]
        entry.update(status=f"duplicate_of:{original}",
                     message=f"{batch_id} has the same bytes as {original}: counted once, under {original}")
        return empty
    seen_files[entry["sha256"]] = batch_id

    lines: list[int] = []
    votes: list[_Vote] = []
    quarantine: list[dict] = []
    first_here: dict[tuple[str, str], int] = {}  # (annotator, pair) -> line of its vote in this batch
    shapes = Counter({"vote": 0, "pair": 0, "ranked": 0})  # normalized rows per shape
    group_votes = 0
    unreadable = None
    rows_read = 0
    if path.is_dir():
        rows = hf_batches.read_rows(path, entry["format"], conf.hf_split)
    else:
        rows = _READERS[entry["format"]](path)
    while True:
        try:
            line, rec, raw = next(rows)
        except StopIteration:
            break
        except _UNREADABLE as exc:  # the file itself is broken (not one row): reject the batch
            unreadable = f"{batch_id}: cannot read the {entry['format']} file after {rows_read} rows: {exc}"
            break
        rows_read += 1
        outcome = rec if type(rec) is _Bad else normalizer.normalize(rec, batch_id)
        if type(outcome) is tuple:
            key = (outcome[_ANNOTATOR], outcome[_PAIR_ID])
            if key not in first_here and key not in accepted:
                first_here[key] = line
                lines.append(line)
                votes.append(outcome)
                shapes["pair" if outcome[_PREJUDGED] else "vote"] += 1
                continue
            earlier = f"line {first_here[key]}" if key in first_here else "{} line {}".format(*accepted[key])
            outcome = _Bad("duplicate_vote", f"duplicate vote: annotator {key[0]} already judged this pair "
                                              f"({earlier}); the first vote is kept")
        elif type(outcome) is list:  # a ranked/rated group: all its comparisons, or (any repeated) none
            repeated = next(((v[_ANNOTATOR], v[_PAIR_ID]) for v in outcome
                             if (v[_ANNOTATOR], v[_PAIR_ID]) in first_here or (v[_ANNOTATOR], v[_PAIR_ID]) in accepted), None)
            if repeated is None:
                first_here.update({(v[_ANNOTATOR], v[_PAIR_ID]): line for v in outcome})
                lines.extend([line] * len(outcome))
                votes.extend(outcome)
                shapes["ranked"] += 1
                group_votes += len(outcome)
                continue
            earlier = (f"line {first_here[repeated]}" if repeated in first_here
                       else "{} line {}".format(*accepted[repeated]))
            outcome = _Bad("duplicate_vote", f"duplicate vote: annotator {repeated[0]} already judged a comparison of "
                                              f"this group ({earlier}); the first vote is kept, this whole group is not")
        quarantine.append({"batch_id": batch_id, "line": line, "code": outcome.code,
                           "reason": outcome.reason, "raw": _raw_text(raw)})
    entry["rows_read"] = rows_read

    entry["rows_normalized"] = sum(shapes.values())
    entry["votes"] = len(votes)
    # What each row became: a vote row or pair row is one vote; a group of K responses is K(K-1)/2 votes.
    entry["shapes"] = {"vote_rows": shapes["vote"], "pair_rows": shapes["pair"], "ranked_rows": shapes["ranked"],
                       "votes_from_ranked_rows": group_votes}
    entry["rows_quarantined"] = len(quarantine)
    entry["bad_share"] = round(len(quarantine) / entry["rows_read"], 6) if entry["rows_read"] else 0.0
    entry["top_reasons"] = _top_reasons(quarantine)
    if unreadable:
        entry.update(status="rejected", message=unreadable)
    elif entry["bad_share"] > conf.max_bad_share:
        entry.update(status="rejected", message=_rejection_message(entry, conf))
    else:
        entry["status"] = "accepted"
    if entry["status"] == "accepted":
        accepted.update({key: (batch_id, line) for key, line in first_here.items()})
    else:
        entry["rows_excluded_with_batch"] = entry["rows_normalized"]
    return BatchResult(batch_id, _votes_frame(batch_id, lines, votes), quarantine, entry)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Collect builds millions of small tuples and no reference cycles: without this the cycle
    collector rescans them all, again and again (about 20% of the run time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def check_batch(path: str | Path, cfg: Mapping[str, Any] | CollectConfig,
                retracted: list[dict] | None = None) -> BatchResult:
    """Check one batch file on its own (e.g. before registering a new delivery).

    Same rules as the collect stage, minus what needs the other batches (duplicate
    files, duplicate votes across batches). `retracted`: the project's retraction register.
    """
    conf = CollectConfig.from_params(cfg)
    with _gc_paused():
        result = _collect_batch(Path(path), conf, _Normalizer(conf.max_field_chars, conf.margin_from_scores), {}, {}, retracted or [])
    _log_batch(result.report)
    return result


# ----------------------------------------------------------------------------------------------
# The folder
# ----------------------------------------------------------------------------------------------


def _batch_files(incoming_dir: Path) -> tuple[list[Path], list[dict]]:
    """Candidate batches (files and dataset folders, sorted by name) and the entries skipped with a
    reason. Dotfiles and `rmpipe import` sidecars (<batch>.source.json) are not batches."""
    if not incoming_dir.is_dir():
        raise DataError(f"collect.incoming_dir '{incoming_dir}' is not a folder: create it and put batch files "
                        "(.jsonl, .csv, .parquet) in it, or run `rmpipe sample-data`")
    files, skipped = [], []
    names = sorted(os.listdir(incoming_dir))
    for name in names:
        if name.startswith("."):
            continue
        path = incoming_dir / name
        if name.endswith(hf_batches.SOURCE_SUFFIX):
            if name[: -len(hf_batches.SOURCE_SUFFIX)] not in names:
                skipped.append({"file": name, "reason": "is the import record of a batch that is not here"})
        elif path.suffix.lower() in FORMATS:
            files.append(path)
        elif path.is_dir():
            if path.is_symlink() or hf_batches.folder_kind(path):
                files.append(path)  # a symlinked folder is refused with its reason, like a symlinked file
            else:
                skipped.append({"file": name, "reason": "is a folder, but no dataset: neither a save_to_disk folder nor "
                                                        "data files (.parquet, .jsonl, .json, .csv) inside"})
        else:
            skipped.append({"file": name, "reason": f"extension {path.suffix or '(none)'!r} is not one of "
                                                    f"{', '.join(FORMATS)}"})
    return files, skipped


def _log_batch(entry: dict) -> None:
    status = entry["status"]
    if status == "accepted":
        log.info("%s: %d rows read, %d normalized, %d quarantined -> accepted", entry["batch_id"],
                 entry["rows_read"], entry["rows_normalized"], entry["rows_quarantined"])
    elif status.startswith("duplicate_of:"):
        log.warning("%s", entry["message"])
    else:
        log.warning("%s %s: %s", status.upper(), entry["batch_id"], entry["message"])


class IncomingChanged(DataError):
    """The incoming folder changed while collect read it: its outputs must not be recorded against it."""


Snapshot = dict[str, tuple[int, int, int]]


def incoming_snapshot(incoming_dir: str | Path) -> Snapshot:
    """{relative path: (size, mtime_ns, inode)} of every file under `incoming_dir`, dotfiles included:
    everything DVC hashes as the stage's dependency. A replaced, added, removed or rewritten file
    changes it (the same signals DVC's own hash cache trusts)."""
    root = Path(incoming_dir)
    snap: Snapshot = {}
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            snap[path.relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return snap


def raise_if_changed(incoming_dir: str | Path, before: Snapshot) -> None:
    """Fail when `incoming_dir` no longer matches the snapshot taken before reading it.

    DVC releases its repo lock while a stage runs and hashes the stage's dependencies
    after the command exits: a batch added meanwhile would be recorded in dvc.lock as
    read when it was not. Failing here keeps dvc.lock unchanged, so the next
    `dvc repro` runs collect again on what is there.
    """
    after = incoming_snapshot(incoming_dir)
    if after == before:
        return
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(n for n in set(before) & set(after) if before[n] != after[n])
    parts = [f"{what}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
             for what, names in (("added", added), ("removed", removed), ("rewritten", changed)) if names]
    raise IncomingChanged(f"{incoming_dir} changed while collect read it ({'; '.join(parts)}); nothing is recorded "
                          "for this run: run `dvc repro` again to collect what is there now")


def collect_dir(
    incoming_dir: str | Path, cfg: Mapping[str, Any] | CollectConfig, retracted: list[dict] | None = None
) -> tuple[pd.DataFrame, list[dict], dict]:
    """Collect every batch in `incoming_dir`: (votes, quarantine rows, report).

    votes: `schema.VOTE_COLUMNS`, accepted batches only, in file-name then line order.
    Text columns are object dtype sharing strings; use `write_votes` to store them.
    Rejected batches never raise here: call `raise_for_rejected(report, cfg)` after
    writing the report and quarantine, so the user can read why.
    """
    conf = CollectConfig.from_params(cfg)
    files, skipped = _batch_files(Path(incoming_dir))
    for item in skipped:
        log.warning("skipped %s: %s", item["file"], item["reason"])
    normalizer = _Normalizer(conf.max_field_chars, conf.margin_from_scores)
    accepted: dict[tuple[str, str], tuple[str, int]] = {}
    seen_files: dict[str, str] = {}
    frames, quarantine, entries = [], [], []
    with _gc_paused():
        for path in files:
            result = _collect_batch(path, conf, normalizer, accepted, seen_files, retracted or [])
            sidecar = path.with_name(path.name + hf_batches.SOURCE_SUFFIX)
            if sidecar.is_file():  # where `rmpipe import` got it: lineage reads it from the report
                result.report["source"] = hf_batches.read_source(sidecar)
            _log_batch(result.report)
            entries.append(result.report)
            quarantine.extend(result.quarantine)
            if result.accepted and len(result.votes):
                frames.append(result.votes)
        del normalizer, accepted
        votes = pd.concat(frames, ignore_index=True) if frames else _votes_frame("", [], [])
    return votes, quarantine, _report(entries, skipped, votes, conf)


def _report(entries: list[dict], skipped: list[dict], votes: pd.DataFrame, conf: CollectConfig) -> dict:
    def total(key: str) -> int:
        return int(sum(e[key] for e in entries))

    statuses = Counter(e["status"].split(":")[0] for e in entries)
    return {
        "totals": {
            "batches": len(entries),
            "accepted": statuses["accepted"],
            "rejected": statuses["rejected"],
            "refused": statuses["refused"],
            "duplicate_files": statuses["duplicate_of"],
            "skipped_files": len(skipped),
            "rows_read": total("rows_read"),
            "rows_normalized": total("rows_normalized"),
            "rows_quarantined": total("rows_quarantined"),
            "rows_excluded_with_batch": total("rows_excluded_with_batch"),
            "votes": len(votes),
            "pairs": int(votes["pair_id"].nunique()),
            "annotators": int(votes["annotator_id"].nunique()),
        },
        "policy": {"max_bad_share": conf.max_bad_share, "on_rejected_batch": conf.on_rejected_batch},
        "batches": entries,
        "skipped_files": skipped,
    }


def raise_for_rejected(report: dict, cfg: Mapping[str, Any] | CollectConfig) -> None:
    """Stop the run (DataError) when a batch was rejected or refused under `on_rejected_batch: fail`,
    or when nothing at all was collected. Under `skip`, warn loudly and go on."""
    conf = CollectConfig.from_params(cfg)
    bad = [e for e in report["batches"] if e["status"] in ("rejected", "refused")]
    if bad and conf.on_rejected_batch == "fail":
        more = f" (and {len(bad) - 1} more batch(es), see reports/collect.json)" if len(bad) > 1 else ""
        fix = ("Fix the rows listed in data/collected/quarantine.jsonl" if bad[0]["status"] == "rejected" else
               f"Remove {bad[0]['batch_id']} from {conf.incoming_dir}")
        raise DataError(f"batch {bad[0]['status']}: {bad[0]['message']}{more}. {fix}, or set "
                        "collect.on_rejected_batch: skip to go on without it")
    for entry in bad:
        log.warning("!!! %s %s and SKIPPED (collect.on_rejected_batch=skip): %d good rows left out with it",
                    entry["batch_id"], entry["status"].upper(), entry["rows_excluded_with_batch"])
    if report["totals"]["votes"] == 0:
        raise DataError("no votes collected: every batch is empty, rejected, refused or a duplicate "
                        "(see reports/collect.json)" if report["batches"] else
                        "no batch files (.jsonl, .csv, .parquet) in the incoming folder: add some or run `rmpipe sample-data`")


def write_votes(path: str | Path, votes: pd.DataFrame, rows_per_group: int = 100_000) -> None:
    """Write the vote table to parquet in slices, so a million long-text votes never sit in
    Arrow memory at once. Text columns are plain strings (parquet dictionary-encodes repeats)."""
    types = {"line": pa.int64(), "margin": pa.float64(), "prejudged": pa.bool_(), "n_votes": pa.int64()}  # others: text
    arrow_schema = pa.schema([(name, types.get(name, pa.string())) for name in schema.VOTE_COLUMNS])
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, arrow_schema, compression="zstd") as writer:
            for start in range(0, max(len(votes), 1), rows_per_group):
                part = votes.iloc[start:start + rows_per_group]
                writer.write_table(pa.Table.from_pandas(part, schema=arrow_schema, preserve_index=False))
