"""The frames Great Expectations validates, built from the splits a chunk at a time.

Each split is validated as two frames: its stored columns' names, dtypes and nulls (schema:
presence, types, nulls), validated a million rows at a time, and a narrow frame of values
(ranges, lengths, length bias), validated whole. The long texts stay out of every frame GX
sees: GX fingerprints every batch and copies the whole frame for every column-map expectation,
and a split of real-length text held at once would cost gigabytes. What the texts contribute
to the whole-table checks (lengths, chosen == rejected, the identity of each response) is
derived per chunk."""

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


def identity_frame(name: str, frame: pd.DataFrame, values: pd.DataFrame | None = None) -> pd.DataFrame:
    """A chunk's identity columns, `split` set from the file the row sits in.

    `values`: the chunk's values_frame, whose pair_id / prompt_hash are Python strings already: the
    stacked identities then share those objects instead of holding a second copy of every id
    (~200 bytes a pair), and every `split` cell is one shared string.

    For the (prompt, chosen, rejected) duplicate check the prompt enters as its prompt_hash
    (the contract's identity of a prompt) and each response as a 64-bit hash of its text
    (equal text, equal key; unequal texts collide with odds ~1e-19 a pair, and a collision
    could only raise a false alarm, never hide a duplicate): GX would otherwise fingerprint
    and copy the texts once more just to find duplicates.
    """
    source = frame if values is None else values
    ids = source[[c for c in ("pair_id", "prompt_hash") if c in source.columns]]
    ids = ids.assign(split=pd.Series(np.full(len(ids), name, dtype=object), index=ids.index))
    for c in ("chosen", "rejected"):
        if is_text(frame, c):
            ids[f"{c}_key"] = pd.util.hash_array(frame[c].to_numpy(dtype=object, na_value=None), categorize=False)
    return ids


def all_splits_frame(identities: list[pd.DataFrame]) -> pd.DataFrame:
    """Every split's identity chunks stacked; the response keys only where every chunk has them."""
    stacked = pd.concat(identities, ignore_index=True)
    keys = [c for c in ("chosen_key", "rejected_key") if c in stacked.columns]
    if any(c not in part.columns for part in identities for c in keys) or len(keys) < 2:
        stacked = stacked.drop(columns=keys)
    return pointer_strings(stacked)


def prompts_frame(stacked: pd.DataFrame) -> pd.DataFrame:
    """One row per prompt_hash with the number of splits it appears in."""
    if "prompt_hash" not in stacked.columns:
        return pd.DataFrame({"prompt_hash": pd.Series(dtype="str"), "n_splits": pd.Series(dtype="int64")})
    placed = stacked[["prompt_hash", "split"]].dropna().drop_duplicates()
    return placed["prompt_hash"].value_counts(sort=False).rename("n_splits").rename_axis("prompt_hash").reset_index()
