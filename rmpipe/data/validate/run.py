"""The data contract of the splits, checked by Great Expectations before any training.

Eight suites, one data-docs page each (a split's suites run a part and a chunk of rows at a time
and their results are merged: validate_runs, validate_contract; the cross-split frames hold codes of
the ids: validate_ids):
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

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import great_expectations.expectations as gxe
import pandas as pd

from rmpipe.core.schema import PAIR_COLUMNS
from rmpipe.core.settings import ValidateSettings
from rmpipe.data.validate.frames import INTEGER_COLUMNS
from rmpipe.data.validate.runs import EXAMPLES, exception_message

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
