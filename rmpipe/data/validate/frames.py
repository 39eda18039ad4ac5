"""The frames Great Expectations validates, built from the splits a chunk at a time.

Each chunk of a split is validated as two frames: its stored columns' names, dtypes and nulls
(schema: presence, types, nulls) and a narrow frame of values (ranges, lengths, length bias).
The long texts stay out of every frame GX sees: GX fingerprints every batch and copies the whole
frame for every column-map expectation. What the texts contribute to the whole-table checks
(lengths, chosen == rejected, the identity of each response) is derived per chunk."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd

INTEGER_COLUMNS = ("n_votes", "n_chosen", "n_rejected", "n_tie")


def schema_frame(frame: pd.DataFrame, value_typed: Iterable[str] = ()) -> pd.DataFrame:
    """The split's columns as the schema suite reads them: names, dtypes and null masks.

    Its checks (columns present, type, not null, row count) read nothing else from a column of a
    string dtype (GX types it by its dtype; only an `object` column is typed value by value) or from
    an `object` column whose type is not checked (batch_ids; `value_typed` names those whose type
    is). Such a column goes to GX as a stand-in of the same dtype and nulls, "" for every other
    value: GX fingerprints (hashes) every batch it is given, and the texts would cost seconds.
    """
    stand_ins = {}
    for name in frame.columns:
        dtype = frame[name].dtype
        if (dtype == object and name not in value_typed) or (dtype != object and pd.api.types.is_string_dtype(dtype)):
            null = frame[name].isna().to_numpy()
            stand_ins[name] = pd.Series(np.where(null, None, ""), index=frame.index, dtype=dtype)
    return frame.assign(**stand_ins) if stand_ins else frame


def is_text(frame: pd.DataFrame, column: str) -> bool:
    return column in frame.columns and pd.api.types.is_string_dtype(frame[column])


def pointer_strings(frame: pd.DataFrame) -> pd.DataFrame:
    """Short text columns as Python objects: GX filters the whole frame once per column-map
    expectation, and copying object pointers is far cheaper than copying Arrow strings."""
    text = [c for c in frame.columns if pd.api.types.is_string_dtype(frame[c]) and frame[c].dtype != object]
    return frame.astype({c: object for c in text}) if text else frame


def values_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Identity and number columns, plus response lengths, `same_response` and `chosen_longer`."""
    keep = ["pair_id", "prompt_hash", "split", *INTEGER_COLUMNS, "agreement", "soft_label"]
    values = pointer_strings(frame[[c for c in keep if c in frame.columns]])
    if "prejudged" in frame.columns and "n_votes" in frame.columns:
        # min_votes governs pairs built from A/B votes; a pre-judged pair carries its own count (null here: not checked)
        values = values.assign(vote_built_n_votes=frame["n_votes"].where(~frame["prejudged"].astype(bool)).astype(float))
    if not (is_text(frame, "chosen") and is_text(frame, "rejected")):
        return values
    chosen_chars = frame["chosen"].str.len()
    rejected_chars = frame["rejected"].str.len()
    return values.assign(
        chosen_chars=chosen_chars,
        rejected_chars=rejected_chars,
        same_response=(frame["chosen"] == frame["rejected"]).fillna(False).astype(bool),
        chosen_longer=(chosen_chars > rejected_chars).fillna(False).astype(float),
    )


def response_keys(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray] | None:
    """Each response's 64-bit hash of its text, for the (prompt, chosen, rejected) duplicate check (None
    where the chunk lacks a response column): GX would otherwise fingerprint and copy the texts once more
    just to find duplicates. Equal text, equal key; unequal texts collide with odds ~1e-19 a pair, and
    a collision could only raise a false alarm, never hide a duplicate. 16 bytes a pair are all that
    the texts leave for the cross-split checks (rmpipe.data.validate.ids)."""
    if not (is_text(frame, "chosen") and is_text(frame, "rejected")):
        return None
    chosen, rejected = (pd.util.hash_array(frame[c].to_numpy(dtype=object, na_value=None), categorize=False)
                        for c in ("chosen", "rejected"))
    return chosen, rejected
