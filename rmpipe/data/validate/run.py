"""The data contract of the splits, checked by Great Expectations before any training.

Eight suites, one data-docs page each (a split's suites run a chunk of rows at a time and their
results are merged: validate_runs; the cross-split frames hold codes of the ids: validate_ids):
  <split>_schema   (train, val, test) the stored columns: present, typed, never null;
                   the split non-empty;
  <split>_values   value ranges, n_votes >= aggregate.min_votes (vote-built pairs; a pre-judged
                   pair carries its own count), response lengths,
                   chosen != rejected, the chosen-longer share (a length-bias alarm);
  all_splits       pair_id and (prompt, chosen, rejected) unique across splits;
  prompts          one row per prompt_hash with the number of splits it sits in,
                   expected to be exactly 1 (no prompt leaks between splits).
Columns GX has no expectation for (lengths, chosen == rejected, chosen longer) are
derived in pandas and then checked by GX. Every expectation carries a plain-words
label in its `meta`, so a failure prints as one line a person can act on:
    FAIL train: agreement in [0, 1] — 3 of 2400 rows outside (e.g. 1.2, -0.1)
The GX context is ephemeral (in-memory stores); only the HTML data docs are written,
to the folder the caller names. Nothing goes to the home folder or the network.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import great_expectations.expectations as gxe  # noqa: E402  (after validate_runs: GX analytics off)
import numpy as np
import pandas as pd
import pyarrow as pa

from rmpipe.core.paths import CHUNK_ROWS, read_chunks
from rmpipe.core.schema import PAIR_COLUMNS
from rmpipe.core.settings import ValidateSettings
from rmpipe.data.validate.frames import (
    INTEGER_COLUMNS,
    response_keys,
    schema_frame,
    values_frame,
)
from rmpipe.data.validate.ids import (
    ID_COLUMNS,
    SplitSource,
    all_splits_frame,
    decode_examples,
    encode,
    prompts_frame,
)
from rmpipe.data.validate.runs import (
    EXAMPLES,
    Runner,
    exception_message,
    merge_chunk_results,
)

log = logging.getLogger("rmpipe.validate")
logging.getLogger("great_expectations").setLevel(logging.ERROR)

TEXT_COLUMNS = ("pair_id", "prompt", "chosen", "rejected", "prompt_hash", "split")
FLOAT_COLUMNS = ("agreement", "soft_label", "margin")
ALL_SPLITS, PROMPTS = "all splits", "prompts"
SHA256_HEX = r"^[0-9a-f]{64}$"


@dataclass(frozen=True)
class ContractParams:
    min_votes: int
    min_response_chars: int
    max_response_chars: int
    chosen_longer_share: tuple[float, float]


def contract_params(settings: ValidateSettings, min_votes: int) -> ContractParams:
    """The contract's thresholds: the `validate:` section and `aggregate.min_votes`."""
    return ContractParams(min_votes, settings.min_response_chars, settings.max_response_chars,
                          settings.chosen_longer_share)


# --- suites ---------------------------------------------------------------------------------


def _check(kind: type, label: str, bad: str = "fail", noun: str = "rows", example: str | None = None, **kwargs):
    """An expectation labelled for the failure line: `label — N of M <noun> <bad> (e.g. ...)`.

    `example` names a column whose values identify failing rows (when the checked
    values themselves, e.g. `True`, would say nothing).
    """
    meta = {"check": label, "bad": bad, "noun": noun}
    if example:
        meta["example"] = example
    return kind(meta=meta, **kwargs)


def schema_expectations(frame: pd.DataFrame) -> list:
    """Contract columns present, of the right type, never null; the split non-empty.

    Type and null checks run only on the columns present: a missing column reads as
    one line from the column-set check rather than one error per expectation.
    """
    has = set(frame.columns)
    checks = [_check(gxe.ExpectTableColumnsToMatchSet, "contract columns present", column_set=PAIR_COLUMNS,
                     exact_match=False)]  # extra columns are allowed (kept as metadata)
    checks += [_check(gxe.ExpectColumnValuesToBeOfType, f"{c} is text", column=c, type_="str")
               for c in TEXT_COLUMNS if c in has]
    checks += [_check(gxe.ExpectColumnValuesToBeInTypeList, f"{c} is an integer", column=c,
                      type_list=["int64", "int32"]) for c in INTEGER_COLUMNS if c in has]
    checks += [_check(gxe.ExpectColumnValuesToBeInTypeList, f"{c} is a float", column=c,
                      type_list=["float64", "float32"]) for c in FLOAT_COLUMNS if c in has]
    checks += [_check(gxe.ExpectColumnValuesToNotBeNull, f"{c} not null", "null", column=c)
               for c in PAIR_COLUMNS if c in has]
    checks.append(_check(gxe.ExpectTableRowCountToBeBetween, "split non-empty", min_value=1))
    return checks


def values_expectations(name: str, values: pd.DataFrame, p: ContractParams) -> list:
    """Value ranges, response lengths and the length-bias band; absent columns are left to the schema suite.

    The share is a statistic of the whole split: each chunk's run computes its own, and
    `_validate_split` puts GX's verdict on the split's whole `chosen_longer` column in its place."""
    has = set(values.columns)
    checks = []
    if "split" in has:
        checks.append(_check(gxe.ExpectColumnValuesToBeInSet, f"split column says {name}", "say otherwise",
                             column="split", value_set=[name]))
    if "prompt_hash" in has:
        checks.append(_check(gxe.ExpectColumnValuesToMatchRegex, "prompt_hash is a sha256 hex digest",
                             "malformed", column="prompt_hash", regex=SHA256_HEX))
    if "vote_built_n_votes" in has:
        checks.append(_check(gxe.ExpectColumnValuesToBeBetween, f"n_votes >= {p.min_votes} (vote-built pairs)", "below",
                             column="vote_built_n_votes", min_value=p.min_votes))
        checks.append(_check(gxe.ExpectColumnValuesToBeBetween, "n_votes >= 1", "below", column="n_votes", min_value=1))
    elif "n_votes" in has:
        checks.append(_check(gxe.ExpectColumnValuesToBeBetween, f"n_votes >= {p.min_votes}", "below",
                             column="n_votes", min_value=p.min_votes))
    checks += [_check(gxe.ExpectColumnValuesToBeBetween, f"{c} >= 0", "negative", column=c, min_value=0)
               for c in ("n_chosen", "n_rejected", "n_tie") if c in has]
    checks += [_check(gxe.ExpectColumnValuesToBeBetween, f"{c} in [0, 1]", "outside", column=c,
                      min_value=0, max_value=1) for c in ("agreement", "soft_label") if c in has]
    if "same_response" in has:
        lo, hi = p.min_response_chars, p.max_response_chars
        example = "pair_id" if "pair_id" in has else None
        checks.append(_check(gxe.ExpectColumnValuesToBeInSet, "chosen != rejected", "have chosen == rejected",
                             example=example, column="same_response", value_set=[False]))
        checks += [_check(gxe.ExpectColumnValuesToBeBetween, f"{c} length in [{lo}, {hi}] chars", "outside",
                          column=f"{c}_chars", min_value=lo, max_value=hi) for c in ("chosen", "rejected")]
        if len(values):  # on an empty split (its one chunk empty) the row-count check already says it all
            checks.append(share_expectation(p))
    return checks


def share_expectation(p: ContractParams):
    low, high = p.chosen_longer_share
    return _check(gxe.ExpectColumnMeanToBeBetween, f"chosen-longer share in [{low:g}, {high:g}]",
                  column="chosen_longer", min_value=low, max_value=high)


def all_splits_expectations(stacked: pd.DataFrame) -> list:
    has = set(stacked.columns)
    checks = []
    if "pair_id" in has:
        checks.append(_check(gxe.ExpectColumnValuesToBeUnique, "pair_id unique across splits", "share a pair_id",
                             column="pair_id"))
    keys = ["prompt_hash", "chosen_key", "rejected_key"]
    if set(keys) <= has:
        checks.append(_check(gxe.ExpectCompoundColumnsToBeUnique, "(prompt, chosen, rejected) unique across splits",
                             "duplicated", example="pair_id" if "pair_id" in has else None, column_list=keys))
    return checks


def prompts_expectations() -> list:
    return [_check(gxe.ExpectColumnValuesToBeBetween, "each prompt_hash in exactly one split", "in several splits",
                   noun="prompts", example="prompt_hash", column="n_splits", min_value=1, max_value=1)]


# --- running GX -----------------------------------------------------------------------------


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return "/".join(_short(v) for v in value.values())
    text = str(value)
    return text if len(text) <= 24 else text[:23] + "…"


def _examples(result: dict, meta: dict) -> list[str]:
    column = meta.get("example")
    if column:
        values = [row.get(column) for row in result.get("partial_unexpected_index_list") or []]
    else:
        values = result.get("partial_unexpected_list") or []
    shown: list[str] = []
    for value in values:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue  # a null says nothing the label does not
        text = _short(value.item() if hasattr(value, "item") else value)
        if text not in shown:
            shown.append(text)
    return shown[:EXAMPLES]


def failure_line(frame_name: str, validation_result) -> str:
    """`FAIL train: agreement in [0, 1] — 3 of 2400 rows outside (e.g. 1.2, -0.1)`."""
    config = validation_result.expectation_config
    meta = config.meta or {}
    label = meta.get("check", config.type)
    result = validation_result.result or {}
    error = exception_message(validation_result.exception_info)
    if error:
        detail = f"could not be checked: {error.splitlines()[0]}"
    elif config.type == "expect_table_columns_to_match_set":
        missing = result.get("details", {}).get("mismatched", {}).get("missing", [])
        detail = f"missing {', '.join(missing)}"
    elif "unexpected_count" in result:
        detail = f"{result['unexpected_count']} of {result['element_count']} {meta.get('noun', 'rows')} {meta.get('bad', 'fail')}"
        examples = _examples(result, meta)
        if examples:
            detail += f" (e.g. {', '.join(examples)})"
    elif config.type == "expect_table_row_count_to_be_between":
        detail = f"observed {result.get('observed_value')} rows"
    else:
        observed = result.get("observed_value")
        if isinstance(observed, float) and not math.isnan(observed):
            observed = round(observed, 4)
        detail = f"observed {observed}"
    return f"FAIL {frame_name}: {label} — {detail}"


@dataclass
class ContractResult:
    rows: dict[str, int]
    n_expectations: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return not self.failures

    def summary(self) -> dict[str, Any]:
        """What reports/validation.json holds (DVC metrics)."""
        return {
            "success": self.success,
            "n_expectations": self.n_expectations,
            "n_failed": len(self.failures),
            "rows": self.rows,
            "failures": self.failures,
        }

    def add(self, frame_name: str, asset_name: str, results: list, rows: int) -> None:
        self.n_expectations += len(results)
        self.failures += [failure_line(frame_name, r) for r in results if not r.success]
        log.info("%-12s %7d rows  %2d expectations  %d failed", asset_name, rows, len(results),
                 sum(not r.success for r in results))




# --- running the contract -------------------------------------------------------------------

GX_ROWS = 131_072  # rows a GX run of a split's suites (text-free frames, ~500 B a row): GX costs ~0.3 s a run
_VALUE_TYPED = {*TEXT_COLUMNS, *INTEGER_COLUMNS, *FLOAT_COLUMNS}


def _chunks(split: SplitSource, rows: int) -> Iterator[pd.DataFrame]:
    """A split's consecutive chunks of at most `rows` rows; an empty split is one empty chunk."""
    if not isinstance(split, pd.DataFrame):
        yield from read_chunks(split, rows, "split")
    elif len(split) == 0:
        yield split
    else:
        for start in range(0, len(split), rows):
            yield split.iloc[start:start + rows].reset_index(drop=True)


def _whole_share(runner: Runner, name: str, results: list, longer: list, params: ContractParams) -> list:
    """`results` with the chosen-longer share's result replaced by GX's on the whole split's column
    (one byte a pair), run aside: the docs keep it as an entry of the values suite."""
    at = next((i for i, r in enumerate(results) if r.expectation_config.type == "expect_column_mean_to_be_between"), None)
    if at is None:
        return results
    frame = pd.DataFrame({"chosen_longer": np.concatenate(longer)})
    share = runner.aside().run(f"{name}_share", frame, [share_expectation(params)], None).results[0]
    whole = copy.copy(results[at])
    whole.result, whole.success, whole.exception_info = share.result, share.success, share.exception_info
    return [*results[:at], whole, *results[at + 1:]]


def _run_suites(runner: Runner, name: str, pending: list, params: ContractParams, runs: dict[str, list]) -> None:
    """The split's schema and values suites on the pending chunks' frames (stacked), the chunks then dropped."""
    schema, values = (frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True) for frames in zip(*pending))
    pending.clear()
    runs[f"{name}_schema"].append(runner.run(f"{name}_schema", schema, schema_expectations(schema), None))
    runs[f"{name}_values"].append(runner.run(f"{name}_values", values, values_expectations(name, values, params),
                                             "pair_id"))


def _validate_split(runner: Runner, name: str, split: SplitSource, params: ContractParams, outcome: ContractResult,
                    chunk_rows: int, gx_rows: int) -> tuple[int, tuple | None]:
    """One split's schema and values suites, run on `gx_rows` rows or more at a time from chunks of at most
    `chunk_rows` rows (the only frames holding texts); returns its rows and its response keys."""
    runs: dict[str, list] = {f"{name}_schema": [], f"{name}_values": []}
    pending, keys, longer, rows = [], [], [], 0
    for chunk in _chunks(split, chunk_rows):
        pending.append((schema_frame(chunk, _VALUE_TYPED), values_frame(chunk)))
        keys.append(response_keys(chunk))
        if "chosen_longer" in pending[-1][1].columns:
            longer.append(pending[-1][1]["chosen_longer"].to_numpy(np.uint8))
        rows += len(chunk)
        del chunk
        pa.default_memory_pool().release_unused()  # Arrow's allocator keeps a freed chunk's pages otherwise
        if sum(len(frames[0]) for frames in pending) >= gx_rows:
            _run_suites(runner, name, pending, params, runs)
    if pending:
        _run_suites(runner, name, pending, params, runs)
    outcome.rows[name] = rows
    for asset, asset_runs in runs.items():
        results = merge_chunk_results([run.results for run in asset_runs])
        if asset.endswith("_values") and len(asset_runs) > 1:
            results = _whole_share(runner, name, results, longer, params)
        if len(asset_runs) > 1:  # one run: GX stored its result already
            runner.keep(asset, asset_runs[-1], results)
        outcome.add(name, asset, results, rows)
    if any(k is None for k in keys):
        return rows, None
    return rows, (np.concatenate([k[0] for k in keys]), np.concatenate([k[1] for k in keys]))


def _cross_split_checks(runner: Runner, splits: dict[str, SplitSource], outcome: ContractResult, rows: list[int],
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


def validate_splits(splits: dict[str, SplitSource], params: ContractParams, docs_dir: str | Path,
                    chunk_rows: int = CHUNK_ROWS, gx_rows: int = GX_ROWS) -> ContractResult:
    """Run the contract over the splits, build the HTML data docs in `docs_dir`, return the outcome.

    A split is a DataFrame or its parquet file, read `chunk_rows` rows at a time. Its schema and values
    suites run on the chunks' text-free frames, `gx_rows` rows or more a run, their results merged into
    one per suite (validate_runs); the cross-split checks run on codes of the ids (validate_ids). Held
    from one run to the next: ~17 bytes a pair (response keys, chosen-longer flags).
    `docs_dir` should be a fresh folder (the stage passes an atomic temp folder).
    """
    runner = Runner(Path(docs_dir).resolve())
    outcome = ContractResult(rows={})
    rows, keys = [], []
    for name, split in splits.items():
        n, k = _validate_split(runner, name, split, params, outcome, chunk_rows, gx_rows)
        rows.append(n)
        keys.append(k)
    _cross_split_checks(runner, splits, outcome, rows, keys)
    runner.context.build_data_docs()
    return outcome
