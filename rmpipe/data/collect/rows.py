"""Collect, one row: a record (a dict, from any input format) -> a vote, the votes of a ranked group, or why not.

`Normalizer.normalize` is the per-row path: every check and every reason a quarantined row
gets lives here. The column-wise fast path (`collect.fast`) calls the same per-value checks
(`text_info`, `annotator_info`, `prompt_info`) once per distinct value, so both paths agree.
Everything derived from a text is cached by text; `Normalizer.trim` bounds the caches so a
batch of any size costs the memory of a chunk.
"""

from __future__ import annotations

from typing import Any, Mapping

import orjson

from rmpipe.core import schema
from rmpipe.data.collect import formats
from rmpipe.data.collect.fields import (
    ABSENT,
    CHOICE_LABELS,
    STRENGTH_LABELS,
    Bad,
    given_pair_id,
    has_surrogate,
    label,
    margin_value,
    meta_or_bad,
    n_votes_value,
    prompt_messages,
    score_margin,
    short,
    type_name,
)

_VOTE_FIELDS = ("response_a", "response_b", "choice")
_PAIR_FIELDS = ("chosen", "rejected")
# Fields with a column of their own; anything else in a row is kept in `meta`. A margin is
# read from pair rows only (the contract); on a vote row it is just metadata.
VOTE_KNOWN = frozenset(("prompt", "annotator_id", "strength", "pair_id") + _VOTE_FIELDS)
_PAIR_KNOWN = frozenset(("prompt", "annotator_id", "strength", "pair_id", "margin", "n_votes") + _PAIR_FIELDS)
_RANKED_KNOWN = frozenset(("prompt", "annotator_id", "strength", "responses", "ranking", "scores"))


# A normalized vote is a plain tuple of the values of schema.VOTE_COLUMNS[2:] (pair_id ... group_id):
# a million of them stay small and cheap to build (a NamedTuple costs ~2 us more per row), and
# zip(*votes) gives the columns.
Vote = tuple
VOTE_FIELDS_OUT = tuple(schema.VOTE_COLUMNS[2:])
PAIR_ID, ANNOTATOR = VOTE_FIELDS_OUT.index("pair_id"), VOTE_FIELDS_OUT.index("annotator_id")
PREJUDGED = VOTE_FIELDS_OUT.index("prejudged")


# ----------------------------------------------------------------------------------------------
# One row -> one vote
# ----------------------------------------------------------------------------------------------


class Normalizer:
    """Turns records (dicts, any input format) into votes, caching what is derived from texts.

    Caches are keyed by text, so a prompt's canonical form and hash, a response's
    normalized form, and a pair's id are computed once however many votes share them,
    and every vote holds the same string objects. Only texts that passed the checks are
    cached, so a cache hit is also a pass.
    """

    def __init__(self, max_field_chars: int, margin_from_scores: bool = False):
        self.max_chars = max_field_chars
        self.margin_from_scores = margin_from_scores
        self._prompts: dict[Any, tuple[str, str] | Bad] = {}  # delivered prompt -> (canonical, hash)
        self._canonical: dict[str, str] = {}  # one shared object per canonical prompt
        self._texts: dict[str, tuple[str, str, str]] = {}  # response -> (shared, normalized, its sha256)
        self._pairs: dict[tuple[str, str, str], str] = {}  # (canonical prompt, a, b) -> pair_id
        self._annotators: dict[str, str] = {}  # as delivered -> clean id
        self._meta_cache: dict[str, str] = {}  # one shared object per distinct meta JSON

    def trim(self, max_entries: int = 50_000) -> None:
        """Forget cached texts once there are many: results do not depend on the caches, memory does."""
        if len(self._texts) + len(self._prompts) + len(self._pairs) > max_entries:
            for cache in (self._prompts, self._canonical, self._texts, self._pairs, self._meta_cache):
                cache.clear()
        if len(self._annotators) > max_entries:
            self._annotators.clear()

    def text(self, value: Any, name: str) -> tuple[str, str, str] | Bad:
        """(as delivered, normalized, sha256 of normalized) of a response text, or why it is unusable."""
        return (type(value) is str and self._texts.get(value)) or self.text_info(value, name)

    def annotator(self, value: Any) -> str | Bad:
        """The clean annotator id of a vote row's annotator_id, or why it is unusable."""
        if value == "":
            return Bad("empty_text", "annotator_id is empty")
        return (type(value) is str and self._annotators.get(value)) or self.annotator_info(value)

    def _too_long(self, name: str, size: int) -> Bad:
        return Bad("field_too_long", f"field '{name}' is {size} chars, over collect.max_field_chars={self.max_chars}")

    # -- fields (slow paths: first sight of a value) -------------------------------------------
    def text_info(self, value: Any, name: str) -> tuple[str, str, str] | Bad:
        if value is None:
            return Bad("missing_field", f"missing required field '{name}'")
        if not isinstance(value, str):
            return Bad("wrong_type", f"field '{name}' must be a string, got {type_name(value)}")
        if len(value) > self.max_chars:
            return self._too_long(name, len(value))
        if not value or value.isspace():
            return Bad("empty_text", f"{name} is empty")
        if "\x00" in value:
            return Bad("nul_character", f"{name} contains a NUL character")
        if not value.isascii() and has_surrogate(value):
            return Bad("invalid_utf8", f"{name} holds a lone surrogate (not valid UTF-8)")
        normalized = schema.normalize_text(value)
        if normalized == value:
            normalized = value  # share the object: no extra memory for already-clean text
        digest = schema.text_sha256(normalized)
        cached = self._texts[value] = (value, normalized, digest)
        return cached

    def annotator_info(self, value: Any) -> str | Bad:
        if value is None:
            return Bad("missing_field", "missing required field 'annotator_id'")
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            return Bad("wrong_type", f"field 'annotator_id' must be a string, got {type_name(value)}")
        text = str(value).strip()
        if not text:
            return Bad("empty_text", "annotator_id is empty")
        if len(text) > self.max_chars:
            return self._too_long("annotator_id", len(text))
        if "\x00" in text:
            return Bad("nul_character", "annotator_id contains a NUL character")
        if isinstance(value, str):
            self._annotators[value] = text
        return self._annotators.setdefault(text, text)

    def prompt_info(self, value: Any) -> tuple[str, str] | Bad:
        if value is None:
            return Bad("missing_field", "missing required field 'prompt'")
        if isinstance(value, str):
            key: Any = value
        elif isinstance(value, (list, tuple)):
            try:
                key = ("chat", orjson.dumps(list(value)))
            except TypeError:
                return Bad("bad_prompt", "prompt messages hold values that are not text")
        else:
            return Bad("wrong_type", "field 'prompt' must be a string or a list of {role, content} messages, "
                                      f"got {type_name(value)}")
        cached = self._prompts.get(key)
        if cached is None:
            cached = self._prompts[key] = self._prompt_info(value)
        return cached

    def _prompt_info(self, value: Any) -> tuple[str, str] | Bad:
        if isinstance(value, str) and len(value) > self.max_chars:
            return self._too_long("prompt", len(value))
        try:
            messages = prompt_messages(value)
        except formats.ShapeError as exc:
            return Bad(exc.code, exc.reason)
        except schema.PromptError as exc:
            return Bad("empty_text" if "empty" in str(exc) else "bad_prompt", str(exc))
        size = sum(len(m["content"]) for m in messages)
        if size > self.max_chars:
            return self._too_long("prompt", size)
        if any("\x00" in m["content"] or "\x00" in m["role"] for m in messages):
            return Bad("nul_character", "prompt contains a NUL character")
        if not all(m["content"].isascii() and m["role"].isascii() for m in messages) and any(
                has_surrogate(m["content"]) or has_surrogate(m["role"]) for m in messages):
            return Bad("invalid_utf8", "prompt holds a lone surrogate (not valid UTF-8)")
        canonical = schema.canonical_messages(messages)
        return self._canonical.setdefault(canonical, canonical), schema.messages_hash(messages)

    def pair_id(self, prompt: tuple[str, str], a: tuple[str, str, str], b: tuple[str, str, str]) -> str:
        """schema.pair_id, from the cached prompt hash and response digests."""
        key = (prompt[0], a[0], b[0])
        found = self._pairs.get(key)
        if found is None:
            first, second = (a, b) if a[1] <= b[1] else (b, a)
            found = schema.pair_id_from_digests(prompt[1], first[2], second[2])
            self._pairs[key] = found
        return found

    # -- the row -------------------------------------------------------------------------------
    def normalize(self, rec: Mapping[str, Any], batch_id: str) -> Vote | list[Vote] | Bad:
        """One record -> a vote (vote row, pair row in any shape of rmpipe.data.collect.formats), the votes of a
        ranked/rated group, or the reason it cannot be normalized."""
        get = rec.get
        if "responses" in rec and get("responses") not in ABSENT:
            return self._group(rec, batch_id)
        is_pair = ("chosen" in rec or "rejected" in rec) and (get("chosen") not in ABSENT or get("rejected") not in ABSENT)
        if is_pair and any(get(name) not in ABSENT for name in _VOTE_FIELDS):
            return Bad("mixed_shape", "row has both vote fields (response_a/response_b/choice) and pair fields "
                                      "(chosen/rejected): send one shape per row")
        if is_pair:
            try:
                rec = formats.pair_row(rec)  # conversational / implicit-prompt / HH pairs -> prompt + two texts
            except formats.ShapeError as exc:
                return Bad(exc.code, exc.reason)
            get = rec.get
        a_name, b_name = ("chosen", "rejected") if is_pair else ("response_a", "response_b")
        # Each field: a cache hit (type(...) is str, seen before) is the fast path.
        value = get(a_name)
        a = (type(value) is str and self._texts.get(value)) or self.text_info(value, a_name)
        if isinstance(a, Bad):
            return a
        value = get(b_name)
        b = (type(value) is str and self._texts.get(value)) or self.text_info(value, b_name)
        if isinstance(b, Bad):
            return b
        value = get("annotator_id")
        if value in ABSENT and is_pair:
            value = schema.anonymous_annotator(batch_id)  # pair rows may come without annotators
        elif value == "":
            return Bad("empty_text", "annotator_id is empty")
        annotator = (type(value) is str and self._annotators.get(value)) or self.annotator_info(value)
        if isinstance(annotator, Bad):
            return annotator
        labels = self._labels(rec, is_pair)
        if isinstance(labels, Bad):
            return labels
        value = get("prompt")
        prompt = (type(value) is str and self._prompts.get(value)) or self.prompt_info(value)
        if isinstance(prompt, Bad):
            return prompt
        if a[1] == b[1]:
            same = " after whitespace/Unicode normalization" if a[0] != b[0] else ""
            return Bad("identical_responses", f"{a_name} and {b_name} are identical{same}")
        pair_id = get("pair_id")
        if pair_id is not None:
            pair_id = given_pair_id(pair_id)
            if isinstance(pair_id, Bad):
                return pair_id
        choice, strength, margin, n_votes = labels
        meta = self._meta(rec, is_pair)
        if isinstance(meta, Bad):
            return meta
        return (pair_id or self.pair_id(prompt, a, b), prompt[0], prompt[1], a[0], b[0], annotator, choice,
                strength, margin, meta, is_pair, n_votes, None)

    def _labels(self, rec: Mapping[str, Any], is_pair: bool) -> tuple[str, str | None, float | None, int] | Bad:
        """(choice, strength, margin, n_votes) of a vote or pair row."""
        get = rec.get
        if is_pair:
            choice = "a"  # a pair row is one vote for `chosen`, which becomes response_a
        else:
            value = get("choice")
            if value is None:
                return Bad("missing_field", "missing required field 'choice'")
            choice = label(value, CHOICE_LABELS)  # type: ignore[assignment]
            if choice is None:
                return Bad("bad_choice", f"choice {short(value)} is not one of a, b, tie")
        value = get("strength")
        strength = None
        if value not in ABSENT:
            strength = label(value, STRENGTH_LABELS)
            if strength is None:
                return Bad("bad_strength", f"strength {short(value)} is not one of {', '.join(schema.STRENGTHS)}")
        margin = get("margin") if is_pair else None
        if margin is not None:
            margin = margin_value(margin)
            if isinstance(margin, Bad):
                return margin
        n_votes = 1
        if is_pair:
            n_votes = n_votes_value(get("n_votes"))
            if isinstance(n_votes, Bad):
                return n_votes
            if margin is None and self.margin_from_scores:
                margin = score_margin(get("score_chosen"), get("score_rejected"))
                if isinstance(margin, Bad):
                    return margin
        return choice, strength, margin, n_votes

    def _meta(self, rec: Mapping[str, Any], is_pair: bool) -> str | Bad:
        """Fields without a column of their own, as sorted JSON (one shared object per distinct JSON)."""
        extra_keys = rec.keys() - (_PAIR_KNOWN if is_pair else VOTE_KNOWN)
        if not extra_keys:
            return "{}"
        meta = meta_or_bad({k: rec[k] for k in extra_keys})
        return meta if isinstance(meta, Bad) else self._meta_cache.setdefault(meta, meta)

    def _group(self, rec: Mapping[str, Any], batch_id: str) -> list[Vote] | Bad:
        """A ranked/rated group -> one vote per comparison (K(K-1)/2), all sharing a group_id.

        Each comparison goes through `normalize` as a vote row, so its texts get the same checks.
        """
        if any(rec.get(name) not in ABSENT for name in _VOTE_FIELDS + _PAIR_FIELDS if name in rec):
            return Bad("mixed_shape", "row has 'responses' (a ranked group) and vote or pair fields: one shape per row")
        try:
            responses, comparisons = formats.ranked_comparisons(rec)
        except formats.ShapeError as exc:
            return Bad(exc.code, exc.reason)
        annotator = rec.get("annotator_id")
        annotator = schema.anonymous_annotator(batch_id) if annotator in ABSENT else annotator
        scores = formats.json_cell(rec.get("scores")) if formats.present(rec, "scores") else None
        extras = {k: rec[k] for k in rec.keys() - _RANKED_KNOWN}
        votes = []
        for i, j, choice in comparisons:
            vote = self.normalize({"prompt": rec.get("prompt"), "response_a": responses[i], "response_b": responses[j],
                                   "annotator_id": annotator, "choice": choice, "strength": rec.get("strength")}, batch_id)
            if isinstance(vote, Bad):
                return Bad(vote.code, f"responses {i} vs {j}: {vote.reason}")
            votes.append(vote)
        # The group: its prompt and its set of responses (not the annotator: two annotators' rankings
        # of one group share the id).
        digests = sorted(self._texts[r][2] for r in responses)
        group_id = "g-" + schema.text_sha256("\x1f".join([votes[0][2], *digests]))[:22]
        out = []
        for (i, j, _), vote in zip(comparisons, votes):
            margin = abs(scores[i] - scores[j]) * 1.0 if scores is not None and self.margin_from_scores else None
            meta = meta_or_bad({**extras, **({"score_a": scores[i], "score_b": scores[j]} if scores is not None else {}),
                                "group_index": [i, j]})
            if isinstance(meta, Bad):
                return meta
            out.append(vote[:8] + (margin, meta, True, 1, group_id))
        return out

