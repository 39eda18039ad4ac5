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

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rmpipe.errors import ConfigError
from rmpipe.params import get, section
from rmpipe.schema import PAIR_COLUMNS

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
INTEGER_COLUMNS = ("n_votes", "n_chosen", "n_rejected", "n_tie")
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


def contract_params(params: dict[str, Any]) -> ContractParams:
    """The contract's thresholds from params.yaml (`aggregate.min_votes` and the `validate:` section)."""
    min_votes = get(section(params, "aggregate"), "min_votes", int, "aggregate")
    cfg = section(params, "validate")
    lo_chars = get(cfg, "min_response_chars", int, "validate")
    hi_chars = get(cfg, "max_response_chars", int, "validate")
    if not 0 <= lo_chars <= hi_chars:
        raise ConfigError(
            "params.yaml: 'validate.min_response_chars' and 'validate.max_response_chars' must satisfy "
            f"0 <= min <= max, got {lo_chars} and {hi_chars}"
        )
    band = get(cfg, "chosen_longer_share", list, "validate")
    if (
        len(band) != 2
        or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in band)
        or not 0 <= band[0] <= band[1] <= 1
    ):
        raise ConfigError(
            f"params.yaml: 'validate.chosen_longer_share' must be [low, high] with 0 <= low <= high <= 1, got {band!r}"
        )
    return ContractParams(min_votes, lo_chars, hi_chars, (float(band[0]), float(band[1])))


# --- the frames GX validates (derived columns computed in pandas) ---------------------------
#
# Each split is validated as two frames: its stored columns as they are (schema: presence,
# types, nulls) and a narrow frame of values (ranges, lengths, length bias). The long
# texts stay out of the values frame because GX copies the whole frame for every
# column-map expectation; with 200k pairs of real-length text that alone costs seconds.


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, np.ndarray)) else value


def schema_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The split as stored, with `batch_ids` lists as tuples.

    GX fingerprints every batch and falls back to pickling the whole frame (seconds
    on 200k pairs) when a column holds unhashable lists.
    """
    if "batch_ids" not in frame.columns:
        return frame
    return frame.assign(batch_ids=frame["batch_ids"].map(_hashable))


def _is_text(frame: pd.DataFrame, column: str) -> bool:
    return column in frame.columns and pd.api.types.is_string_dtype(frame[column])


def _pointer_strings(frame: pd.DataFrame) -> pd.DataFrame:
    """Short text columns as Python objects: GX filters the whole frame once per column-map
    expectation, and copying object pointers is far cheaper than copying Arrow strings."""
    text = [c for c in frame.columns if pd.api.types.is_string_dtype(frame[c]) and frame[c].dtype != object]
    return frame.astype({c: object for c in text}) if text else frame


def values_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Identity and number columns, plus response lengths, `same_response` and `chosen_longer`."""
    keep = ["pair_id", "prompt_hash", "split", *INTEGER_COLUMNS, "agreement", "soft_label"]
    values = _pointer_strings(frame[[c for c in keep if c in frame.columns]])
    if "prejudged" in frame.columns and "n_votes" in frame.columns:
        # min_votes governs pairs built from A/B votes; a pre-judged pair carries its own count (null here: not checked)
        values = values.assign(vote_built_n_votes=frame["n_votes"].where(~frame["prejudged"].astype(bool)).astype(float))
    if not (_is_text(frame, "chosen") and _is_text(frame, "rejected")):
        return values
    chosen_chars = frame["chosen"].str.len()
    rejected_chars = frame["rejected"].str.len()
    return values.assign(
        chosen_chars=chosen_chars,
        rejected_chars=rejected_chars,
        same_response=(frame["chosen"] == frame["rejected"]).fillna(False).astype(bool),
        chosen_longer=(chosen_chars > rejected_chars).fillna(False).astype(float),
    )


def all_splits_frame(splits: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Every split's identity columns stacked, `split` set from the file the row sits in.

    For the (prompt, chosen, rejected) duplicate check the prompt enters as its
    prompt_hash (the contract's identity of a prompt) and each response as an integer
    code (equal text, equal code): GX would otherwise fingerprint and copy ~1 GB of
    text once more just to find duplicates.
    """
    frames = list(splits.values())
    stacked = pd.concat(
        [f[[c for c in ("pair_id", "prompt_hash") if c in f.columns]].assign(split=name) for name, f in splits.items()],
        ignore_index=True,
    )
    responses = ("chosen", "rejected")
    if all(_is_text(f, c) for f in frames for c in responses):
        for c in responses:
            stacked[f"{c}_key"] = pd.factorize(pd.concat([f[c] for f in frames], ignore_index=True))[0]
    return _pointer_strings(stacked)


def prompts_frame(stacked: pd.DataFrame) -> pd.DataFrame:
    """One row per prompt_hash with the number of splits it appears in."""
    if "prompt_hash" not in stacked.columns:
        return pd.DataFrame({"prompt_hash": pd.Series(dtype="str"), "n_splits": pd.Series(dtype="int64")})
    placed = stacked[["prompt_hash", "split"]].dropna().drop_duplicates()
    return placed["prompt_hash"].value_counts(sort=False).rename("n_splits").rename_axis("prompt_hash").reset_index()


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


def validate_splits(splits: dict[str, pd.DataFrame], params: ContractParams, docs_dir: str | Path) -> ContractResult:
    """Run the contract over the splits, build the HTML data docs in `docs_dir`, return the outcome.

    `docs_dir` should be a fresh folder (the stage passes an atomic temp folder).
    """
    context = _context(Path(docs_dir).resolve())
    source = context.data_sources.add_pandas("rmpipe_splits")
    stacked = all_splits_frame(splits)
    # (label in failure lines, GX asset name, frame, expectations, column naming failing rows or None)
    frames = []
    for name, frame in splits.items():
        values = values_frame(frame)
        frames.append((name, f"{name}_schema", schema_frame(frame), schema_expectations(frame), None))
        frames.append((name, f"{name}_values", values, values_expectations(name, values, params), "pair_id"))
    frames.append((ALL_SPLITS, "all_splits", stacked, all_splits_expectations(stacked), "pair_id"))
    frames.append((PROMPTS, "prompts", prompts_frame(stacked), prompts_expectations(), "prompt_hash"))

    outcome = ContractResult(rows={name: len(frame) for name, frame in splits.items()})
    for name, asset_name, frame, expectations, id_column in frames:
        batch = source.add_dataframe_asset(asset_name).add_batch_definition_whole_dataframe("whole")
        suite = context.suites.add(gx.ExpectationSuite(name=f"rmpipe.{asset_name}", expectations=expectations))
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"rmpipe.{asset_name}", data=batch, suite=suite)
        )
        run = definition.run(batch_parameters={"dataframe": frame}, result_format=_result_format(frame, id_column))
        order = {e.id: i for i, e in enumerate(suite.expectations)}
        results = sorted(run.results, key=lambda r: order.get(r.expectation_config.id, len(order)))
        outcome.n_expectations += len(results)
        outcome.failures += [failure_line(name, r) for r in results if not r.success]
        log.info("%-12s %7d rows  %2d expectations  %d failed", asset_name, len(frame), len(results),
                 sum(not r.success for r in results))
    context.build_data_docs()
    return outcome
