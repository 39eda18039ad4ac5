"""Running the contract (rmpipe.data.validate.run's suites) over the splits, a part at a time.

A split is a list of parts (the split stage's files, in name order; a DataFrame counts as one part).
Consecutive parts are checked in groups: their chunks' schema and values suites run `gx_rows` rows or
more a GX run (a GX run has a fixed cost of ~0.25 s a suite, so small parts share runs), and a group ends
at the first part boundary past `gx_rows` rows. A group's results, merged over its runs, are its record
(validate_parts.PartCheck); the records of a split are merged the same way into its verdict (counts
summed, first examples kept, in part order), the chosen-longer share is put back as GX's verdict on the
whole split's column, and the cross-split checks run on codes of every part's ids (validate_ids).

A group's record is a function of its parts' bytes and the contract, so with a memo
(rmpipe.data.part_memo) a group of unchanged parts is read back instead of checked again, keyed by the
split and its parts' sha256 in order (the longest stored group at each place is taken); the parts around
them are checked as new groups. Merging is associative and the split's parts share one schema (checked),
so however the parts fall into groups the verdicts, and reports/validation.json, are those of a run
without the memo. A new part costs its own group's runs; a changed or removed part, its group's.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rmpipe.core.errors import DataError
from rmpipe.core.paths import CHUNK_ROWS, read_chunks
from rmpipe.data.part_memo import PartMemo
from rmpipe.data.validate.frames import response_keys, schema_frame, values_frame
from rmpipe.data.validate.ids import (
    ID_COLUMNS,
    all_splits_frame,
    decode_examples,
    encode,
    prompts_frame,
)
from rmpipe.data.validate.parts import (
    KINDS,
    PartCheck,
    as_json,
    expectation_shapes,
    suite_result,
)
from rmpipe.data.validate.run import (
    ALL_SPLITS,
    FLOAT_COLUMNS,
    INTEGER_COLUMNS,
    PROMPTS,
    TEXT_COLUMNS,
    ContractParams,
    ContractResult,
    all_splits_expectations,
    prompts_expectations,
    schema_expectations,
    share_expectation,
    values_expectations,
)
from rmpipe.data.validate.runs import EXAMPLES, Runner, merge_chunk_results

GX_ROWS = 131_072  # rows a GX run of a part's suites (text-free frames, ~500 B a row): GX costs ~0.3 s a run
_VALUE_TYPED = {*TEXT_COLUMNS, *INTEGER_COLUMNS, *FLOAT_COLUMNS}
Part = pd.DataFrame | Path
SplitParts = Part | Sequence[Part]


def as_parts(split: SplitParts) -> list[Part]:
    """A split as its list of parts (a frame or a file is one part)."""
    return [split] if isinstance(split, (pd.DataFrame, str, Path)) else list(split)


def part_rows(part: Part) -> int:
    return len(part) if isinstance(part, pd.DataFrame) else pq.ParquetFile(part).metadata.num_rows


def _chunks(part: Part, rows: int) -> Iterator[pd.DataFrame]:
    """A part's consecutive chunks of at most `rows` rows; an empty part is one empty chunk."""
    if not isinstance(part, pd.DataFrame):
        yield from read_chunks(part, rows, "split")
    elif len(part) == 0:
        yield part
    else:
        for start in range(0, len(part), rows):
            yield part.iloc[start:start + rows].reset_index(drop=True)


def _run_suites(runner: Runner, name: str, pending: list, params: ContractParams, runs: dict[str, list]) -> None:
    """The split's schema and values suites on the pending chunks' frames (stacked), the chunks then dropped."""
    schema, values = (frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True) for frames in zip(*pending))
    pending.clear()
    runs["schema"].append(runner.run(f"{name}_schema", schema, schema_expectations(schema), None))
    runs["values"].append(runner.run(f"{name}_values", values, values_expectations(name, values, params), "pair_id"))


class _Group:
    """Consecutive parts of one split being checked together: their chunks' frames and what they leave."""

    def __init__(self) -> None:
        self.runs: dict[str, list] = {kind: [] for kind in KINDS}
        self.pending, self.keys, self.longer, self.rows, self.parts = [], [], [], 0, []

    def add(self, chunk: pd.DataFrame) -> None:
        self.pending.append((schema_frame(chunk, _VALUE_TYPED), values_frame(chunk)))
        self.keys.append(response_keys(chunk))
        if "chosen_longer" in self.pending[-1][1].columns:
            self.longer.append(self.pending[-1][1]["chosen_longer"].to_numpy(np.uint8))
        self.rows += len(chunk)

    def pending_rows(self) -> int:
        return sum(len(frames[0]) for frames in self.pending)

    def record(self) -> PartCheck:
        """The group's suites merged over its GX runs, as the memo keeps them."""
        suites = {}
        for kind, kind_runs in self.runs.items():
            last = copy.copy(kind_runs[-1])
            last.results = merge_chunk_results([run.results for run in kind_runs])
            suites[kind] = as_json(last)
        keys = None if any(k is None for k in self.keys) else (np.concatenate([k[0] for k in self.keys]),
                                                                 np.concatenate([k[1] for k in self.keys]))
        return PartCheck(self.rows, suites, len(self.runs["values"]), keys,
                         np.concatenate(self.longer) if self.longer else None)


def check_parts(runner: Runner, name: str, parts: list[Part], params: ContractParams, chunk_rows: int,
                gx_rows: int) -> Iterator[tuple[list[int], PartCheck]]:
    """Consecutive parts of split `name`, checked on their chunks `gx_rows` rows or more a GX run, in groups
    that end at the first part boundary past `gx_rows` rows: (the group's part indices, its record) each.
    A part is one GX run's worth of fixed cost (~0.25 s a suite) only when it is that big: small parts share runs."""
    group = _Group()
    for index, part in enumerate(parts):
        for chunk in _chunks(part, chunk_rows):
            group.add(chunk)
            del chunk
            pa.default_memory_pool().release_unused()  # Arrow's allocator keeps a freed chunk's pages otherwise
            if group.pending_rows() >= gx_rows:
                _run_suites(runner, name, group.pending, params, group.runs)
        group.parts.append(index)
        if group.rows >= gx_rows or index == len(parts) - 1:
            if group.pending:
                _run_suites(runner, name, group.pending, params, group.runs)
            yield group.parts, group.record()
            group = _Group()


def _whole_share(runner: Runner, name: str, results: list, longer: list, params: ContractParams) -> list:
    """`results` with the chosen-longer share's result replaced by GX's on the whole split's column
    (one byte a pair), run aside: the docs keep it as an entry of the values suite. Done wherever the split
    took more than one GX run; with one, that run's share is the whole split's (a mean of 0/1 flags is their
    exact count over the rows, so both ways give the same figure, however the parts were grouped)."""
    at = next((i for i, r in enumerate(results) if r.expectation_config.type == "expect_column_mean_to_be_between"), None)
    if at is None:
        return results
    frame = pd.DataFrame({"chosen_longer": np.concatenate(longer)})
    share = runner.aside().run(f"{name}_share", frame, [share_expectation(params)], None).results[0]
    whole = copy.copy(results[at])
    whole.result, whole.success, whole.exception_info = share.result, share.success, share.exception_info
    return [*results[:at], whole, *results[at + 1:]]


class PartChecks:
    """A split's records, in part order: groups of consecutive parts the memo holds for these very bytes
    (the longest at each place), and the other parts checked (in groups, stored)."""

    def __init__(self, runner: Runner, params: ContractParams, memo: PartMemo | None, chunk_rows: int, gx_rows: int):
        self.runner, self.params, self.memo = runner, params, memo
        self.chunk_rows, self.gx_rows = chunk_rows, gx_rows

    def _key(self, name: str, shas: list[str | None]) -> str | None:
        if self.memo is None or any(sha is None for sha in shas):
            return None  # a frame has no bytes to be known by
        return self.memo.key(json.dumps([name, shas]))  # the split's name is in its suites

    def _stored(self, name: str, parts: list[Part], shas: list, at: int) -> tuple[int, PartCheck] | None:
        """The longest group starting at `at` the memo holds (verified), as (its length, its record)."""
        for end in range(len(parts), at, -1):
            key = self._key(name, shas[at:end])
            if key is None or not self.memo.has(key):
                continue
            entry = self.memo.load(key, f"{name}: {Path(parts[at]).name} and {end - at - 1} more part(s)")
            if entry is None:
                continue  # damaged: deleted, checked again
            try:
                return end - at, PartCheck.read(entry)
            except (OSError, ValueError, KeyError) as exc:  # sealed but unreadable: a format this code does not know
                raise DataError(f"validate memo entry {entry} cannot be read ({exc}): delete {self.memo.root}") from None
        return None

    def _fresh(self, name: str, parts: list[Part], shas: list, indices: list[int]) -> list[PartCheck]:
        records = []
        for members, record in check_parts(self.runner, name, [parts[i] for i in indices], self.params,
                                           self.chunk_rows, self.gx_rows):
            key = self._key(name, [shas[indices[m]] for m in members])
            if key is not None:
                self.memo.store(key, record.write)
            records.append(record)
        return records

    def __call__(self, name: str, parts: list[Part]) -> list[PartCheck]:
        shas = [self.memo.sha_of(Path(p)) if self.memo is not None and not isinstance(p, pd.DataFrame) else None
                for p in parts]
        records, fresh, at = [], [], 0
        while at < len(parts):
            stored = self._stored(name, parts, shas, at) if self.memo is not None else None
            if stored is None:
                fresh.append(at)
                at += 1
                continue
            if fresh:
                records += self._fresh(name, parts, shas, fresh)
                fresh = []
            records.append(stored[1])
            at += stored[0]
        if fresh:
            records += self._fresh(name, parts, shas, fresh)
        return records


def _same_columns(name: str, parts: list[Part]) -> None:
    """A split's parts share one schema (the split stage writes them so): checked together or apart, their
    chunks then give the same verdicts."""
    schemas = {str(pq.read_schema(p).remove_metadata()) for p in parts if not isinstance(p, pd.DataFrame)}
    frames = {tuple(map(str, p.dtypes.items())) for p in parts if isinstance(p, pd.DataFrame)}
    if len(schemas) > 1 or len(frames) > 1:
        raise DataError(f"the parts of the {name} split disagree on their columns or types: rebuild them "
                        "(dvc repro split)")


def _validate_split(checks: PartChecks, name: str, parts: list[Part], outcome: ContractResult
                    ) -> tuple[int, tuple | None]:
    """One split's verdict from its parts' records (empty parts add nothing unless all are empty: then the
    first stands for the split); returns its rows and its response keys."""
    used = [p for p in parts if part_rows(p) > 0] or parts[:1]
    _same_columns(name, used)
    records = checks(name, used)
    for kind in KINDS:
        if len({tuple(expectation_shapes(r, kind)) for r in records}) > 1:
            raise DataError(f"the parts of the {name} split disagree on their columns: rebuild them (dvc repro split)")
    rows = sum(r.rows for r in records)
    outcome.rows[name] = rows
    for kind in KINDS:
        results = merge_chunk_results([r.results(kind) for r in records])
        if kind == "values" and sum(r.value_runs for r in records) > 1 and all(r.longer is not None for r in records):
            results = _whole_share(checks.runner, name, results, [r.longer for r in records], checks.params)
        checks.runner.publish(f"{name}_{kind}", suite_result(records[-1].suites[kind]), results)
        outcome.add(name, f"{name}_{kind}", results, rows)
    if any(r.keys is None for r in records):
        return rows, None
    return rows, (np.concatenate([r.keys[0] for r in records]), np.concatenate([r.keys[1] for r in records]))


def _cross_split_checks(runner: Runner, splits: dict[str, list[Part]], outcome: ContractResult, rows: list[int],
                        keys: list) -> None:
    """pair_id and (prompt, chosen, rejected) unique across splits, each prompt in one split: on codes (validate_ids)."""
    coded = {}
    for column in ID_COLUMNS:  # one column's strings at a time
        column_codes = encode(list(splits.values()), column, rows)
        pa.default_memory_pool().release_unused()
        if column_codes is not None:
            coded[column] = column_codes
    stacked = all_splits_frame(coded.get("pair_id"), coded.get("prompt_hash"), keys, sum(rows))
    run = runner.run("all_splits", stacked, all_splits_expectations(stacked), "pair_id")
    if decode_examples(run.results, coded, EXAMPLES):
        runner.keep("all_splits", run, run.results)
    outcome.add(ALL_SPLITS, "all_splits", run.results, len(stacked))
    del stacked
    prompts = prompts_frame(coded.get("prompt_hash"), rows)
    run = runner.run("prompts", prompts, prompts_expectations(), "prompt_hash")
    if decode_examples(run.results, coded, EXAMPLES):
        runner.keep("prompts", run, run.results)
    outcome.add(PROMPTS, "prompts", run.results, len(prompts))


def validate_splits(splits: dict[str, SplitParts], params: ContractParams, docs_dir: str | Path,
                    chunk_rows: int = CHUNK_ROWS, gx_rows: int | None = None, memo: PartMemo | None = None
                    ) -> ContractResult:
    """Run the contract over the splits, build the HTML data docs in `docs_dir`, return the outcome.

    A split is a DataFrame, a parquet file or a list of either (its parts, in order), read `chunk_rows`
    rows at a time. `memo`: part records kept across runs (keyed by each file's bytes; frames are always
    checked). Held from one split to the next: ~17 bytes a pair (response keys, chosen-longer flags).
    `docs_dir` should be a fresh folder (the stage passes an atomic temp folder).
    """
    runner = Runner(Path(docs_dir).resolve())
    checks = PartChecks(runner, params, memo, chunk_rows, gx_rows or GX_ROWS)
    outcome = ContractResult(rows={})
    parts = {name: as_parts(split) for name, split in splits.items()}
    rows, keys = [], []
    for name, split_parts in parts.items():
        n, k = _validate_split(checks, name, split_parts, outcome)
        rows.append(n)
        keys.append(k)
    _cross_split_checks(runner, parts, outcome, rows, keys)
    runner.context.build_data_docs()
    return outcome
