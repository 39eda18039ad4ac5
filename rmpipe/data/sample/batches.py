"""Deterministic sample preference batches: the bundled default data and the benchmark generator.

Every comparison is a good response (the ground truth) against one with a single,
clear flaw of a known kind: a refusal, waffle that never answers, a wrong fact, a
rude tone, or an off-topic answer. Each flaw leaves a lexical or stylistic trace a
tiny transformer can learn in minutes. Phrasings are composed from slots (hundreds of
refusals, rude openers, hedges; trivia on many subjects; each fact stated several ways)
so the model learns the general signal: the evaluation "unit battery" shares their
style but none of their sentences (tests/test_sample_data.py checks that). The phrase banks
are data tables of their own, `rmpipe.data.sample.vocab`.

Crowd realism: ~12 annotators judge each pair (3-5 each) with the A/B order drawn
per vote; most are good, one is careless (near-random), one always answers "a",
and one good annotator casts over 30% of all votes.

All randomness comes from generators seeded by `seed`: the same params give
byte-identical files.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rmpipe.core.errors import ConfigError, UserError
from rmpipe.core.io import atomic_path
from rmpipe.core.schema import BATCH_FORMATS
from rmpipe.core.settings import SampleDataSettings
from rmpipe.data.collect.hf_batches import folder_kind
from rmpipe.data.sample import vocab
from rmpipe.data.sample.texts import generate_pairs, objects

# --- The annotator crowd ----------------------------------------------------------------------


class Annotator(NamedTuple):
    """One simulated annotator."""

    id: str
    kind: str  # good, careless (near-random) or always_a
    accuracy: float  # how often a good annotator picks the right response (before ties)
    weight: float  # how likely to be drawn for a pair, relative to the others


DOMINANT_ANNOTATOR = "ann-01"
CARELESS_ANNOTATOR = "ann-11"
ALWAYS_A_ANNOTATOR = "ann-12"
ANNOTATORS: tuple[Annotator, ...] = (
    Annotator(DOMINANT_ANNOTATOR, "good", 0.985, 0.0),  # weight unused: judges every pair
    *(Annotator(f"ann-{i:02d}", "good", accuracy, 1.0)
      for i, accuracy in enumerate((0.98, 0.975, 0.97, 0.98, 0.965, 0.975, 0.97, 0.98, 0.965), start=2)),
    Annotator(CARELESS_ANNOTATOR, "careless", 0.5, 0.3),
    Annotator(ALWAYS_A_ANNOTATOR, "always_a", 0.5, 0.3),
)
# A good annotator's tie / error rates scale with how subtle the flaw is.
TIE_RATE = {"slight": 0.06, "moderate": 0.045, "strong": 0.03, "very_strong": 0.02}
ERROR_SCALE = {"slight": 1.4, "moderate": 1.0, "strong": 0.6, "very_strong": 0.4}
MISSING_STRENGTH_RATE = 0.04  # annotators sometimes leave the strength blank


# --- Config -----------------------------------------------------------------------------------


def sample_settings(cfg: Mapping[str, Any] | SampleDataSettings) -> SampleDataSettings:
    """The `sample_data:` section, parsed (rmpipe.core.settings) and checked against the annotator table."""
    conf = cfg if isinstance(cfg, SampleDataSettings) else SampleDataSettings.from_section(cfg)
    if max(conf.votes_per_pair) > len(ANNOTATORS):
        raise ConfigError(f"params.yaml: 'sample_data.votes_per_pair' asks for up to {max(conf.votes_per_pair)} votes "
                          f"per pair, but the sample has {len(ANNOTATORS)} annotators")
    return conf


# --- Votes ------------------------------------------------------------------------------------


def _draw_annotators(
    rng: np.random.Generator, n_pairs: int, votes_per_pair: Mapping[int, float]
) -> tuple[np.ndarray, np.ndarray]:
    """(pair index, annotator index) per vote: the dominant annotator plus k-1 distinct others per pair."""
    counts = rng.choice(list(votes_per_pair), p=list(votes_per_pair.values()), size=n_pairs)
    weights = np.array([a.weight for a in ANNOTATORS[1:]])
    # Weighted sampling without replacement, vectorized: top-k of log(weight) + Gumbel noise.
    keys = np.log(weights)[None, :] + rng.gumbel(size=(n_pairs, len(weights)))
    order = np.argsort(-keys, axis=1) + 1  # +1: index 0 is the dominant annotator
    picks = np.concatenate([np.zeros((n_pairs, 1), dtype=np.int64), order], axis=1)
    mask = np.arange(picks.shape[1])[None, :] < counts[:, None]
    pair_idx = np.broadcast_to(np.arange(n_pairs)[:, None], picks.shape)[mask]
    return pair_idx, picks[mask]


def _judge(rng: np.random.Generator, annotator: np.ndarray, strength: np.ndarray) -> np.ndarray:
    """Per vote: 'right', 'wrong' or 'tie' relative to the ground truth."""
    kinds = np.array([a.kind for a in ANNOTATORS])[annotator]
    accuracy = np.array([a.accuracy for a in ANNOTATORS])[annotator]
    tie_rate = pd.Series(strength).map(TIE_RATE).to_numpy(float)
    wrong_rate = (1 - accuracy) * pd.Series(strength).map(ERROR_SCALE).to_numpy(float)
    u = rng.random(len(annotator))
    outcome = np.where(u < tie_rate, "tie", np.where(u < tie_rate + wrong_rate, "wrong", "right"))
    careless = kinds == "careless"
    outcome[careless] = rng.choice(["right", "wrong", "tie"], p=[0.45, 0.45, 0.1], size=careless.sum())
    return outcome


def _strength_labels(rng: np.random.Generator, strength: np.ndarray, annotator: np.ndarray, tie: np.ndarray):
    level = pd.Series(strength).map({s: i for i, s in enumerate(vocab.STRENGTHS)}).to_numpy()
    level = np.clip(level + rng.choice([-1, 0, 1], p=[0.15, 0.7, 0.15], size=len(level)), 0, 3)
    careless = np.array([a.kind != "good" for a in ANNOTATORS])[annotator]
    level[careless] = rng.integers(0, 4, size=careless.sum())
    labels = np.array(vocab.STRENGTHS, dtype=object)[level]
    labels[tie | (rng.random(len(level)) < MISSING_STRENGTH_RATE)] = None
    return labels


def generate_votes(cfg: Mapping[str, Any] | SampleDataSettings) -> pd.DataFrame:
    """All vote rows for `cfg.n_pairs` comparisons, in memory.

    Columns: prompt, response_a, response_b, annotator_id, choice, strength, time_spent_s (the
    fields an annotation tool exports) plus the ground truth, never written to files:
    true_pair (comparison index), true_choice (where the good response is shown: "a"/"b"),
    true_flaw. Text columns are object dtype sharing one string per comparison, so 1M rows
    cost the memory of the distinct texts only.
    """
    conf = sample_settings(cfg)
    pairs = generate_pairs(conf.seed, conf.n_pairs + conf.pair_rows, conf.long_texts).iloc[: conf.n_pairs]
    rng = np.random.default_rng(conf.seed)
    pair_idx, annotator = _draw_annotators(rng, len(pairs), conf.votes_per_pair)
    strength = pairs["strength"].to_numpy()[pair_idx]
    outcome = _judge(rng, annotator, strength)
    good_in_a = rng.random(len(pair_idx)) < 0.5  # A/B order drawn per vote
    good = pairs["good"].to_numpy()[pair_idx]
    bad = pairs["bad"].to_numpy()[pair_idx]
    true_choice = np.where(good_in_a, "a", "b")
    choice = np.where(outcome == "right", true_choice, np.where(good_in_a, "b", "a"))
    choice = np.where(outcome == "tie", "tie", choice)
    kinds = np.array([a.kind for a in ANNOTATORS])[annotator]
    choice = np.where(kinds == "always_a", "a", choice)
    fast = kinds != "good"
    return pd.DataFrame(
        {
            "prompt": objects(pairs["prompt"].to_numpy()[pair_idx]),
            "response_a": objects(np.where(good_in_a, good, bad)),
            "response_b": objects(np.where(good_in_a, bad, good)),
            "annotator_id": objects(np.array([a.id for a in ANNOTATORS], dtype=object)[annotator]),
            "choice": objects(choice.astype(object)),
            "strength": objects(_strength_labels(rng, strength, annotator, choice == "tie")),
            "time_spent_s": np.where(fast, rng.integers(2, 9, len(fast)), rng.integers(15, 180, len(fast))),
            "true_pair": pair_idx,
            "true_choice": objects(true_choice.astype(object)),
            "true_flaw": objects(pairs["flaw"].to_numpy()[pair_idx]),
        }
    )


def generate_pair_rows(cfg: Mapping[str, Any] | SampleDataSettings) -> pd.DataFrame:
    """`cfg.pair_rows` extra comparisons as already-judged pair rows (prompt, chosen, rejected,
    annotator_id, margin), each judged by two annotators; `true_pair`/`true_flaw` hold the truth."""
    conf = sample_settings(cfg)
    pairs = generate_pairs(conf.seed, conf.n_pairs + conf.pair_rows, conf.long_texts).iloc[conf.n_pairs:]
    rng = np.random.default_rng(conf.seed + 1)
    rows = []
    for i, pair in enumerate(pairs.itertuples(index=False)):
        messages = pair.prompt if isinstance(pair.prompt, list) else [{"role": "user", "content": pair.prompt}]
        second = ANNOTATORS[1 + rng.integers(0, 9)].id  # a good annotator other than the dominant one
        for annotator in (DOMINANT_ANNOTATOR, second):
            agrees = rng.random() < 0.95
            chosen, rejected = (pair.good, pair.bad) if agrees else (pair.bad, pair.good)
            margin = None if rng.random() < 0.5 else float(vocab.STRENGTHS.index(pair.strength)) / 3
            rows.append((messages, chosen, rejected, annotator, margin, conf.n_pairs + i, pair.flaw))
    return pd.DataFrame(
        rows, columns=["prompt", "chosen", "rejected", "annotator_id", "margin", "true_pair", "true_flaw"]
    )


# --- Files ------------------------------------------------------------------------------------

DATA_SUFFIXES = tuple(BATCH_FORMATS)


def _public(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[[c for c in frame.columns if not c.startswith("true_")]]


def _write_jsonl(path: Path, frame: pd.DataFrame) -> None:
    columns = list(frame.columns)
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        for values in zip(*(frame[c].to_numpy() for c in columns)):
            row = {c: v.item() if isinstance(v, np.generic) else v for c, v in zip(columns, values) if v is not None}
            fh.write(orjson.dumps(row) + b"\n")


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    """One vote per record; chat prompts as a JSON string in the cell (as spreadsheet exports do)."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(frame.columns)
        for values in zip(*(frame[c].to_numpy() for c in frame.columns)):
            writer.writerow(
                orjson.dumps(v).decode() if isinstance(v, list) else ("" if v is None else v) for v in values
            )


def _write_pair_parquet(path: Path, frame: pd.DataFrame) -> None:
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    schema = pa.schema([("prompt", pa.list_(message)), ("chosen", pa.string()), ("rejected", pa.string()),
                        ("annotator_id", pa.string()), ("margin", pa.float64())])
    table = pa.Table.from_pydict({c: frame[c].tolist() for c in schema.names}, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_sample_batches(out_dir: str | Path, cfg: Mapping[str, Any] | SampleDataSettings) -> list[Path]:
    """Write the sample batches into `out_dir` and return their paths.

    `n_batches` vote-row files (batch-0001.jsonl, batch-0002.csv, ... alternating) holding the
    votes in shuffled order, plus batch-NNNN-pairs.parquet with the pair rows (if pair_rows > 0).
    Refuses to write beside other batch files, which would be collected together with these.
    """
    conf = sample_settings(cfg)
    out_dir = Path(out_dir)
    names = [f"batch-{i + 1:04d}{'.jsonl' if i % 2 == 0 else '.csv'}" for i in range(conf.n_batches)]
    if conf.pair_rows:
        names.append(f"batch-{conf.n_batches + 1:04d}-pairs.parquet")
    if out_dir.is_dir():
        others = sorted(
            p.name for p in out_dir.iterdir() if not p.name.startswith(".") and p.name not in names
            and (p.suffix in DATA_SUFFIXES or (p.is_dir() and folder_kind(p)))  # a dataset folder is a batch too
        )
        if others:
            raise UserError(
                f"{out_dir} already holds other batch files ({', '.join(others[:5])}); they would be collected "
                "together with the samples: remove them or write into an empty folder (--out)"
            )
    votes = _public(generate_votes(conf))
    shuffled = votes.iloc[np.random.default_rng(conf.seed + 2).permutation(len(votes))]
    paths = []
    for i, chunk in enumerate(np.array_split(np.arange(len(shuffled)), conf.n_batches)):
        path = out_dir / names[i]
        (_write_jsonl if path.suffix == ".jsonl" else _write_csv)(path, shuffled.iloc[chunk])
        paths.append(path)
    if conf.pair_rows:
        path = out_dir / names[-1]
        _write_pair_parquet(path, _public(generate_pair_rows(conf)))
        paths.append(path)
    return paths
