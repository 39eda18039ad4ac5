"""Reverse lineage: from a batch or an annotator to every recorded model it reached.

For each model in the run history that used the batch (or the annotator's votes):
was it promoted, is it the current export or the promoted model, how many of its
training pairs the batch/annotator *contributed* to (a vote on the pair) and how many
it *decided*: pairs that flip their chosen response, or drop out, when those votes are
removed and the same aggregation (rmpipe.data.aggregate.run, with that model's recorded
aggregate params) runs again. The votes and splits of past models are read from the
DVC cache by the md5s the history recorded; a model whose objects are gone (gc, purge)
is listed without the decided count.
"""

from __future__ import annotations

import difflib
import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from rmpipe.audit import dvc_cache, history
from rmpipe.core.errors import DataError, UserError
from rmpipe.core.paths import part_order, read_parts

COLLECTED = "data/collected"  # collect's output folder: its cached listing names every votes part
VOTES = "votes/"  # the votes: a part per batch inside it (rmpipe.core.paths.vote_parts)
VOTES_FILE = "data/collected/votes.parquet"  # what models recorded before the votes were parts
SPLIT = "data/split"


class DamagedCache(Exception):
    """A past model's votes or splits are in the DVC cache, but their bytes are not what was recorded."""


def _cached_votes(root: Path, lock: dict[str, str]) -> list[Path] | None:
    """A recorded model's votes files in the DVC cache, verified, in batch order: the parts listed in collect's
    output folder (DVC caches the listing of an output, not of a folder inside it), or the one votes.parquet
    of a model recorded before the parts. None when anything is not cached."""
    if lock.get(VOTES_FILE):
        votes = dvc_cache.file_in_output(root, lock[VOTES_FILE])
        return None if votes is None else [dvc_cache.verified(votes, lock[VOTES_FILE])]
    listing = dvc_cache.dir_listing(root, lock.get(COLLECTED) or "")
    parts = {rel[len(VOTES):]: md5 for rel, md5 in listing.items() if rel.startswith(VOTES)}
    files = []
    for name in sorted(parts, key=lambda rel: part_order(Path(rel))):
        cached = dvc_cache.file_in_output(root, parts[name])
        if cached is None:
            return None
        files.append(dvc_cache.verified(cached, parts[name]))
    return files or None


def _cached_inputs(root: Path, record: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """(votes, train split) of a recorded model from the DVC cache, or None when not cached. Each object is
    checked against its md5 before it is read; a damaged one raises `DamagedCache` naming it."""
    lock = record.get("upstream_lock_md5") or {}
    votes_md5, split_md5 = lock.get(VOTES_FILE) or lock.get(COLLECTED), lock.get(SPLIT)
    try:
        listing = dvc_cache.dir_listing(root, split_md5) if split_md5 else {}
        # the train split's parts in batch order (data/split/train/<part>.parquet), or one file of an older layout
        names = sorted((n for n in listing if n.startswith("train/") and n.endswith(".parquet")),
                       key=lambda n: part_order(Path(n))) or [n for n in ("train.parquet",) if n in listing]
        train = [dvc_cache.file_in_output(root, split_md5, name) for name in names]
        if not train or any(part is None for part in train):
            return None
        votes = _cached_votes(root, lock) if votes_md5 else None
        if votes is None:
            return None
        for name, part in zip(names, train):
            dvc_cache.verified(part, listing[name])
        frames = [pd.read_parquet(part) for part in votes]
        return pd.concat(frames, ignore_index=True), read_parts(train, columns=["pair_id", "chosen"])
    except dvc_cache.DamagedObject as exc:
        raise DamagedCache(str(exc)) from None
    except (OSError, ValueError, KeyError, pa.ArrowException) as exc:  # an unreadable listing or parquet
        raise DamagedCache(f"the votes ({votes_md5}) or {SPLIT} ({split_md5}) cannot be read: "
                           f"{type(exc).__name__}: {exc}"[:500]) from None


def influence(votes: pd.DataFrame, train: pd.DataFrame, removed: pd.Series, aggregate_params: dict) -> dict[str, Any]:
    """Training pairs the `removed` votes contributed to, and those they decided (see module doc)."""
    from rmpipe.data.aggregate.run import AggregateSettings, aggregate

    # The params recorded when that model was built: keys a later rmpipe no longer knows are left out.
    settings = AggregateSettings.from_section({k: v for k, v in aggregate_params.items()
                                               if k in AggregateSettings.model_fields})
    train_ids = set(train["pair_id"])
    contributed = sorted(set(votes.loc[removed, "pair_id"]) & train_ids)
    quiet = logging.getLogger("rmpipe.aggregate")  # the re-run's own summary line is not the trace's to print
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        reduced = aggregate(votes[~removed].reset_index(drop=True), settings).pairs
        chosen_without = dict(zip(reduced["pair_id"], reduced["chosen"]))
    except DataError:  # nothing left to aggregate: every pair depended on these votes
        chosen_without = {}
    finally:
        quiet.setLevel(level)
    decided = sorted(p for p, chosen in zip(train["pair_id"], train["chosen"]) if chosen_without.get(p) != chosen)
    flipped = [p for p in decided if p in chosen_without]
    return {"contributed": len(contributed), "decided": len(decided), "flipped": len(flipped),
            "dropped_out": len(decided) - len(flipped), "decided_pair_ids": decided}


def _current_digests(root: Path) -> dict[str, str]:
    """{'export'|'promoted': manifest digest} of the models in the workspace now."""
    from rmpipe.audit.lineage import MANIFEST_FILE, manifest_sha256
    from rmpipe.core.params import load_params

    found = {}
    cfg = load_params(root / "params.yaml").get("export") or {}
    for key, folder in (("export", cfg.get("out_dir")), ("promoted", cfg.get("promoted_dir"))):
        if folder and (root / folder / MANIFEST_FILE).exists():
            found[key] = manifest_sha256(root / folder)
    return found


def registry_view(root: Path) -> tuple[dict[str, dict[str, Any]], str | None]:
    """({manifest digest: registry version}, None) or ({}, why the registry is unavailable)."""
    from rmpipe.audit import registry

    reason = registry.unavailable_reason(root)
    if reason is not None:
        return {}, reason
    return {v["body"]["manifest_sha256"]: v for v in registry.versions(root) if v["body"].get("manifest_sha256")}, None


def registry_status(record: dict[str, Any], view: dict[str, dict[str, Any]], note: str | None) -> dict[str, Any]:
    """A recorded model's standing: from the registry (version, stages now, deprecated) when there is one;
    without it, the gate's decision at build time is all there is (`source` says which)."""
    gate = bool((record.get("promotion") or {}).get("promoted"))
    if note is not None:
        return {"promoted": gate, "version": None, "stages": [], "deprecated": None, "source": "gate (" + note + ")"}
    version = view.get((record.get("model") or {}).get("manifest_sha256") or "")
    if version is None:
        return {"promoted": False, "version": None, "stages": [], "deprecated": None, "source": "registry: not a version"}
    return {"promoted": "prod" in version["stages"], "version": version["version"], "stages": version["stages"],
            "deprecated": version["deprecated"], "source": "registry"}


def _known_or_fail(records: list[dict[str, Any]], batch: str | None, annotator: str | None) -> None:
    """A name no recorded model ever saw is a typo until shown otherwise: refuse it, naming the closest known."""
    field, name, flag = ("batches", batch, "--batch") if batch is not None else ("annotators", annotator, "--annotator")
    known = sorted({k for r in records for k in (r.get(field) or {})})
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5) or known[:3]
    raise UserError(f"{flag} {name}: no recorded model used it; closest known: {', '.join(close) or 'none'} "
                    f"({len(known)} known, `rmpipe history` lists the models)")


def trace(root: Path, batch: str | None = None, annotator: str | None = None) -> dict[str, Any]:
    """Every recorded model the batch / annotator reached (see module doc), oldest first."""
    if (batch is None) == (annotator is None):
        raise UserError("trace needs exactly one of --batch NAME or --annotator ID")
    root = Path(root)
    records = history.read(root)
    if not records:
        raise DataError(f"no run history in {history.location(root)}: run the pipeline (dvc repro) to record one")
    _known_or_fail(records, batch, annotator)
    current = _current_digests(root)
    view, note = registry_view(root)
    models = []
    for record in records:
        digest = (record.get("model") or {}).get("manifest_sha256")
        if batch is not None:
            used = batch in (record.get("batches") or {})
        else:
            info = (record.get("annotators") or {}).get(annotator) or {}
            used = bool(info.get("votes")) and not info.get("excluded")
        if not used:
            continue
        entry = {
            "seq": record.get("seq"), "model": history.model_id(record), "time": record.get("time"),
            "trigger": record.get("trigger"), "export_md5": (record.get("model") or {}).get("md5"),
            **registry_status(record, view, note),
            "gate_promoted": bool((record.get("promotion") or {}).get("promoted")),
            "promotion_reason": (record.get("promotion") or {}).get("reason"),
            "accuracy": (record.get("metrics") or {}).get("accuracy"),
            "current_export": digest is not None and digest == current.get("export"),
            "current_promoted": digest is not None and digest == current.get("promoted"),
            "n_train_pairs": record.get("n_train_pairs"),
        }
        try:
            cached = _cached_inputs(root, record)
        except DamagedCache as exc:  # this model's data only: the others are still traced
            entry.update(contributed=None, decided=None, damaged=str(exc),
                         note="this model's votes/splits in the DVC cache are damaged")
            models.append(entry)
            continue
        if cached is None:
            entry.update(contributed=None, decided=None,
                         note="this model's votes/splits are no longer in the DVC cache (gc or purge)")
        else:
            votes, train = cached
            removed = votes["batch_id"] == batch if batch is not None else votes["annotator_id"] == annotator
            entry.update(influence(votes, train, removed, record.get("aggregate_params") or {}))
            entry["votes"] = int(removed.sum())
        models.append(entry)
    return {"batch": batch, "annotator": annotator, "n_models": len(models),
            "n_promoted": sum(m["promoted"] for m in models), "n_recorded_models": len(records),
            "damaged": [f"#{m['seq']} {m['model']}" for m in models if m.get("damaged")],
            "registry": note or "gto", "models": models}


def render(result: dict[str, Any]) -> str:
    """The trace as a person reads it in a terminal."""
    what = f"batch {result['batch']}" if result["batch"] is not None else f"annotator {result['annotator']}"
    registry = result.get("registry") in (None, "gto")
    lines = [f"{what}: reached {result['n_models']} of {result['n_recorded_models']} recorded models, "
             + (f"{result['n_promoted']} of them in prod now" if registry else
                f"{result['n_promoted']} of them promoted by the gate ({result['registry']})")]
    for m in result["models"]:
        now = ", ".join(n for n, on in (("current export", m["current_export"]), ("promoted now", m["current_promoted"]))
                        if on)
        share = (f"pairs: DAMAGED in the DVC cache: {m['damaged']}" if m.get("damaged") else
                 "pairs: not in the DVC cache any more" if m.get("decided") is None else
                 f"{m['votes']} votes; of {m['n_train_pairs']} training pairs {m['contributed']} contributed, "
                 f"{m['decided']} decided ({m['flipped']} flip, {m['dropped_out']} drop out without them)")
        acc = f"{m['accuracy']:.3f}" if isinstance(m.get("accuracy"), (int, float)) else "-"
        lines.append(f"  #{m['seq']:<3} {m['model']}  {m['time']}  {m['trigger']}")
        standing = ("in prod" if m["promoted"] else "deprecated" if m.get("deprecated") else
                    "not in prod") if m.get("version") else ("PROMOTED" if m["promoted"] else "not promoted")
        lines.append(f"       {m.get('version') or '-'} {standing} (gate at build: "
                     f"{'promoted' if m['gate_promoted'] else 'refused'})  accuracy {acc}" + (f"  [{now}]" if now else ""))
        lines.append(f"       {share}")
    return "\n".join(lines)


def raise_if_damaged(result: dict[str, Any]) -> None:
    """After the trace is printed: a `DataError` (one line) naming the models whose cached data is damaged."""
    damaged = result.get("damaged") or []
    if damaged:
        raise DataError(f"the DVC cache holds damaged data of {len(damaged)} recorded model(s) ({', '.join(damaged)}): "
                        "their decided pairs are unknown, the other models are traced above; delete the damaged "
                        "object(s) named there and run `dvc fetch --all-commits` to restore them from the DVC remote")


def to_json(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2, default=str)
