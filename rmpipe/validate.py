"""The data contract of the splits, checked by Great Expectations before any training.

Eight frames are validated, each with its own expectation suite:
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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from rmpipe.schema import PAIR_COLUMNS
from rmpipe.settings import ValidateSettings
from rmpipe.validate_frames import (
    INTEGER_COLUMNS, all_splits_frame, identity_frame, prompts_frame, schema_frame, values_frame,
)

# GX decides about analytics when it is imported: switch it off first, whatever the caller's env says.
os.environ["GX_ANALYTICS_ENABLED"] = "false"

import great_expectations as gx  # noqa: E402
import great_expectations.expectations as gxe  # noqa: E402
from great_expectations.data_context.types.base import (  # noqa: E402
    DataContextConfig,
    InMemoryStoreBackendDefaults,
    ProgressBarsConfig,
)

log = logging.getLogger("rmpipe.validate")
logging.getLogger("great_expectations").setLevel(logging.ERROR)

TEXT_COLUMNS = ("pair_id", "prompt", "chosen", "rejected", "prompt_hash", "split")
FLOAT_COLUMNS = ("agreement", "soft_label", "margin")
ALL_SPLITS, PROMPTS = "all splits", "prompts"
EXAMPLES = 3
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
    """Value ranges, response lengths and the length-bias band; absent columns are left to the schema suite."""
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
        if len(values):  # on an empty split the row-count check already says it all
            low, high = p.chosen_longer_share
            checks.append(_check(gxe.ExpectColumnMeanToBeBetween, f"chosen-longer share in [{low:g}, {high:g}]",
                                 column="chosen_longer", min_value=low, max_value=high))
    return checks


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


def _context(docs_dir: Path):
    """An in-memory GX context whose only on-disk output is the data-docs site in `docs_dir`."""
    site = {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        data_docs_sites={"rmpipe": site},
        progress_bars=ProgressBarsConfig(globally=False),
        analytics_enabled=False,
    )
    return gx.get_context(project_config=config, mode="ephemeral")


def _result_format(frame: pd.DataFrame, id_column: str | None) -> dict:
    """SUMMARY (examples with the row's id) for narrow frames; BASIC for frames holding the long texts.

    SUMMARY makes GX copy the whole frame twice per column-map expectation to list the
    failing rows' index, which on a split's texts costs seconds; BASIC lists values only.
    """
    if id_column is None:
        return {"result_format": "BASIC", "partial_unexpected_count": EXAMPLES}
    fmt: dict[str, Any] = {"result_format": "SUMMARY", "partial_unexpected_count": EXAMPLES}
    if id_column in frame.columns:
        fmt["unexpected_index_column_names"] = [id_column]
    return fmt


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


def _exception_message(info: dict) -> str | None:
    """GX reports an exception either flat or keyed by metric; return the first message."""
    if not info:
        return None
    if "raised_exception" in info:
        return info.get("exception_message") if info["raised_exception"] else None
    for value in info.values():
        if isinstance(value, dict) and value.get("raised_exception"):
            return value.get("exception_message")
    return None


def failure_line(frame_name: str, validation_result) -> str:
    """`FAIL train: agreement in [0, 1] — 3 of 2400 rows outside (e.g. 1.2, -0.1)`."""
    config = validation_result.expectation_config
    meta = config.meta or {}
    label = meta.get("check", config.type)
    result = validation_result.result or {}
    error = _exception_message(validation_result.exception_info)
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


class _Runner:
    """One GX suite per asset (train_schema, train_values, ...), run on a frame or on each chunk of one."""

    def __init__(self, docs_dir: Path):
        self.context = _context(docs_dir)
        self.source = self.context.data_sources.add_pandas("rmpipe_splits")
        self._definitions: dict[str, Any] = {}

    def run(self, asset_name: str, frame: pd.DataFrame, expectations: list, id_column: str | None) -> list:
        """The expectations' results on `frame`, in the order they were given."""
        definition = self._definitions.get(asset_name)
        if definition is None:
            batch = self.source.add_dataframe_asset(asset_name).add_batch_definition_whole_dataframe("whole")
            suite = self.context.suites.add(gx.ExpectationSuite(name=f"rmpipe.{asset_name}", expectations=expectations))
            definition = self._definitions[asset_name] = self.context.validation_definitions.add(
                gx.ValidationDefinition(name=f"rmpipe.{asset_name}", data=batch, suite=suite))
        run = definition.run(batch_parameters={"dataframe": frame}, result_format=_result_format(frame, id_column))
        order = {e.id: i for i, e in enumerate(definition.suite.expectations)}
        return sorted(run.results, key=lambda r: order.get(r.expectation_config.id, len(order)))


def merge_chunk_results(runs: list[list]) -> list:
    """One result per expectation from its results on consecutive chunks of a table: counts summed,
    the first examples kept (as on the whole table), a failure or an error on any chunk fails it."""
    if len(runs) == 1:
        return runs[0]
    merged = []
    for parts in zip(*runs):
        first = copy.copy(parts[0])
        result = dict(first.result or {})
        if "unexpected_count" in result:
            for key in ("unexpected_count", "element_count", "missing_count"):
                if key in result:
                    result[key] = sum((p.result or {}).get(key) or 0 for p in parts)
            result["partial_unexpected_list"] = [
                v for p in parts for v in (p.result or {}).get("partial_unexpected_list") or []][:EXAMPLES]
        elif first.expectation_config.type == "expect_table_row_count_to_be_between":
            result["observed_value"] = sum((p.result or {}).get("observed_value") or 0 for p in parts)
        broken = next((p for p in parts if _exception_message(p.exception_info)), None)
        first.result, first.success = result, all(p.success for p in parts)
        if broken is not None:
            first.exception_info = broken.exception_info
        merged.append(first)
    return merged


def _chunks(split: pd.DataFrame | Iterable[pd.DataFrame]) -> Iterable[pd.DataFrame]:
    return [split] if isinstance(split, pd.DataFrame) else split


SCHEMA_ROWS = 1_048_576  # rows per schema run: its frame holds no text (validate_frames.schema_frame)
_VALUE_TYPED = {*TEXT_COLUMNS, *INTEGER_COLUMNS, *FLOAT_COLUMNS}


def _validate_split(runner: _Runner, name: str, split: pd.DataFrame | Iterable[pd.DataFrame], params: ContractParams,
                    outcome: ContractResult, identities: list[pd.DataFrame], schema_rows: int) -> None:
    """One split's schema suite (over its chunks, `schema_rows` a run, results merged) and values suite."""
    schema_runs, pending, values, rows = [], [], [], 0

    def run_schema() -> None:
        frame = pending[0] if len(pending) == 1 else pd.concat(pending, ignore_index=True)
        schema_runs.append(runner.run(f"{name}_schema", frame, schema_expectations(frame), None))
        pending.clear()

    for chunk in _chunks(split):
        pending.append(schema_frame(chunk, _VALUE_TYPED))
        values.append(values_frame(chunk))
        identities.append(identity_frame(name, chunk, values[-1]))
        rows += len(chunk)
        if sum(map(len, pending)) >= schema_rows:
            run_schema()
    if pending or not schema_runs:
        run_schema()
    outcome.rows[name] = rows
    outcome.add(name, f"{name}_schema", merge_chunk_results(schema_runs), rows)
    whole = values[0] if len(values) == 1 else pd.concat(values, ignore_index=True)
    del values
    checks = values_expectations(name, whole, params)
    outcome.add(name, f"{name}_values", runner.run(f"{name}_values", whole, checks, "pair_id"), rows)


def validate_splits(splits: dict[str, pd.DataFrame | Iterable[pd.DataFrame]], params: ContractParams,
                    docs_dir: str | Path, schema_rows: int = SCHEMA_ROWS) -> ContractResult:
    """Run the contract over the splits, build the HTML data docs in `docs_dir`, return the outcome.

    A split is a DataFrame or an iterable of chunk frames (at least one, maybe empty): the schema
    suite runs on consecutive chunks of `schema_rows` rows or more and its results are merged; everything else is validated whole on
    frames without the texts. `docs_dir` should be a fresh folder (the stage passes an atomic temp folder).
    """
    runner = _Runner(Path(docs_dir).resolve())
    outcome = ContractResult(rows={})
    identities: list[pd.DataFrame] = []
    for name, split in splits.items():
        _validate_split(runner, name, split, params, outcome, identities, schema_rows)
    stacked = all_splits_frame(identities)
    del identities
    outcome.add(ALL_SPLITS, "all_splits", runner.run("all_splits", stacked, all_splits_expectations(stacked), "pair_id"),
                len(stacked))
    prompts = prompts_frame(stacked)
    outcome.add(PROMPTS, "prompts", runner.run("prompts", prompts, prompts_expectations(), "prompt_hash"), len(prompts))
    runner.context.build_data_docs()
    return outcome
