"""Tokenized splits on disk (data/tokenized/), so a re-run of training does not re-tokenize.

    data/tokenized/train.parquet, val.parquet   chosen_ids, rejected_ids (int32 lists), prefix, group, targets
    data/tokenized/manifest.json                what the tokens were made from (the cache key)

The key is the tokenizer's files, the split files, max_length, the tokenize stage's code and the
tokenizers/transformers versions. Training
uses the cache only when the key matches what it is about to train on; anything else (a changed
chat template, a new split) is tokenized afresh, with the reason logged. A stale cache is never used.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rmpipe.core import codedeps, io
from rmpipe.core.io import path_sha256, sha256_file
from rmpipe.model.batching import TokenizedPairs
from rmpipe.model.render import tokenize_splits

log = logging.getLogger("rmpipe.tokenized")

MANIFEST = "manifest.json"
# Files that decide how text becomes ids (tokenizer + chat template), whichever a backbone folder has.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")
# The code is the tokenize stage's import closure, the same list dvc.yaml's tokenize deps are written from.
CODE_ENTRY = "stages/tokenize.py"
TOKENIZING_LIBRARIES = ("tokenizers", "transformers")


def cache_key(backbone: Path | str, paths, max_length: int) -> dict:
    """What the cached tokens of `paths` (a `rmpipe.core.paths.ProjectPaths`) depend on; equal keys, equal tokens."""
    splits = {"train": paths.train_split, "val": paths.val_split}
    folder = Path(backbone)
    if folder.is_dir():
        tokenizer = {name: sha256_file(folder / name) for name in TOKENIZER_FILES if (folder / name).exists()}
    else:
        tokenizer = {"hub_id": str(backbone)}
    code = codedeps.code_hash(CODE_ENTRY)
    return {"tokenizer": tokenizer, "splits": {name: path_sha256(path) for name, path in splits.items()},
            "max_length": max_length, "code": code, "libraries": library_versions()}


def library_versions() -> dict[str, str | None]:
    """The versions of the libraries that turn text into ids: a new tokenizers or transformers may split or
    template the same text differently, so cached tokens of another version are not reused."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in TOKENIZING_LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def write(folder: Path, pairs: dict[str, TokenizedPairs], key: dict) -> None:
    """All splits plus the manifest as one atomic folder."""
    with io.atomic_dir(folder) as tmp:
        for name, split in pairs.items():
            table = pa.table({
                "chosen_ids": pa.array(split.chosen, type=pa.list_(pa.int32())),
                "rejected_ids": pa.array(split.rejected, type=pa.list_(pa.int32())),
                "prefix": pa.array(split.prefix, type=pa.int32()),
                "group": pa.array(split.group, type=pa.int64()),
                "margin": pa.array(split.margin, type=pa.float32()),
                "soft_label": pa.array(split.soft_label, type=pa.float32()),
                "pair_id": pa.array(split.pair_ids or [""] * len(split), type=pa.string()),
            })
            pq.write_table(table, tmp / f"{name}.parquet")
        counts = {name: {"pairs": len(s), "truncated": s.n_truncated} for name, s in pairs.items()}
        io.write_json(tmp / MANIFEST, {"key": key, "splits": counts})


def read(folder: Path, name: str, n_truncated: int) -> TokenizedPairs:
    table = pq.read_table(folder / f"{name}.parquet")
    pair_ids = table.column("pair_id").to_pylist()
    return TokenizedPairs(
        chosen=table.column("chosen_ids").to_pylist(),
        rejected=table.column("rejected_ids").to_pylist(),
        margin=table.column("margin").to_numpy().astype(np.float32),
        soft_label=table.column("soft_label").to_numpy().astype(np.float32),
        pair_ids=pair_ids if any(pair_ids) else [],
        n_truncated=n_truncated,
        prefix=table.column("prefix").to_numpy().astype(np.int64),
        group=table.column("group").to_numpy().astype(np.int64),
    )


def stale_reason(folder: Path, key: dict) -> str | None:
    """Why the cache in `folder` cannot be used for `key` (None: it can)."""
    manifest = folder / MANIFEST
    if not manifest.exists():
        return f"no tokenized cache at {folder}"
    try:
        recorded = json.loads(manifest.read_text(encoding="utf-8")).get("key", {})
    except (OSError, ValueError, AttributeError) as exc:  # a damaged cache is re-made, never trusted
        return f"tokenized cache manifest {manifest} is unreadable ({type(exc).__name__})"
    changed = [part for part in key if recorded.get(part) != key[part]]
    return f"tokenized cache at {folder} is stale ({', '.join(changed)} changed)" if changed else None


def load_or_tokenize(folder: Path, tokenizer, frames: dict[str, pd.DataFrame], key: dict) -> dict[str, TokenizedPairs]:
    """The cached tokens when their key matches, else freshly tokenized ones (the cache is left as it is)."""
    reason = stale_reason(folder, key)
    if reason is None:
        counts = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["splits"]
        log.info("using tokenized splits from %s", folder)
        return {name: read(folder, name, counts[name]["truncated"]) for name in frames}
    log.info("%s: tokenizing", reason)
    return tokenize_splits(tokenizer, frames, key["max_length"])
