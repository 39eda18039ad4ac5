"""Running the contract's GX suites a chunk at a time and keeping one result per suite.

Each suite runs on consecutive chunks of a table; `merge_chunk_results` folds the chunks' results
into what one run on the whole table reports (counts summed, percentages recomputed from them, the
first examples kept, a failure or an error on any chunk fails the expectation), and `Runner.keep`
stores that merged result as the suite's one validation result, so the data docs show one page per
suite with the whole table's verdicts, whatever the number of chunks.
"""

from __future__ import annotations

import copy
import datetime
import os
from pathlib import Path
from typing import Any

import pandas as pd

from rmpipe.data.validate.ids import unexpected_counts

# GX decides about analytics when it is imported: switch it off first, whatever the caller's env says.
os.environ["GX_ANALYTICS_ENABLED"] = "false"

import great_expectations as gx  # noqa: E402
from great_expectations.core.run_identifier import RunIdentifier  # noqa: E402
from great_expectations.data_context.types.base import (  # noqa: E402
    DataContextConfig,
    InMemoryStoreBackendDefaults,
    ProgressBarsConfig,
)
from great_expectations.data_context.types.resource_identifiers import (  # noqa: E402
    ExpectationSuiteIdentifier,
    ValidationResultIdentifier,
)

EXAMPLES = 3


def _context(docs_dir: Path | None):
    """An in-memory GX context whose only on-disk output is the data-docs site in `docs_dir` (none: no site)."""
    sites = {}
    if docs_dir is not None:
        sites["rmpipe"] = {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        data_docs_sites=sites,
        progress_bars=ProgressBarsConfig(globally=False),
        analytics_enabled=False,
    )
    return gx.get_context(project_config=config, mode="ephemeral")


def result_format(frame: pd.DataFrame, id_column: str | None) -> dict:
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


def exception_message(info: dict) -> str | None:
    """GX reports an exception either flat or keyed by metric; return the first message."""
    if not info:
        return None
    if "raised_exception" in info:
        return info.get("exception_message") if info["raised_exception"] else None
    for value in info.values():
        if isinstance(value, dict) and value.get("raised_exception"):
            return value.get("exception_message")
    return None


class Runner:
    """One GX suite per asset (train_schema, train_values, ...), run on a frame or on each chunk of one.

    Every run of an asset shares one run id, so GX stores each chunk's result under the same key
    and `keep` overwrites it with the merged one. `docs_dir=None`: a context that builds no docs
    (runs whose results only feed another suite's merged result).
    """

    def __init__(self, docs_dir: Path | None):
        self.context = _context(docs_dir)
        self.source = self.context.data_sources.add_pandas("rmpipe_splits")
        self._definitions: dict[str, Any] = {}
        self._run_ids: dict[str, RunIdentifier] = {}
        self._aside: Runner | None = None

    def aside(self) -> "Runner":
        """A runner whose results are no page of the docs (made on first use)."""
        if self._aside is None:
            self._aside = Runner(None)
        return self._aside

    def run(self, asset_name: str, frame: pd.DataFrame, expectations: list, id_column: str | None):
        """The suite's validation result on `frame`, its results in the order the expectations were given."""
        definition = self._definitions.get(asset_name)
        if definition is None:
            batch = self.source.add_dataframe_asset(asset_name).add_batch_definition_whole_dataframe("whole")
            suite = self.context.suites.add(gx.ExpectationSuite(name=f"rmpipe.{asset_name}", expectations=expectations))
            definition = self._definitions[asset_name] = self.context.validation_definitions.add(
                gx.ValidationDefinition(name=f"rmpipe.{asset_name}", data=batch, suite=suite))
            self._run_ids[asset_name] = RunIdentifier(run_time=datetime.datetime.now(datetime.timezone.utc))
        run = definition.run(batch_parameters={"dataframe": frame}, result_format=result_format(frame, id_column),
                             run_id=self._run_ids[asset_name])
        self._drop_batches()
        order = {e.id: i for i, e in enumerate(definition.suite.expectations)}
        run.results = sorted(run.results, key=lambda r: order.get(r.expectation_config.id, len(order)))
        return run

    def _drop_batches(self) -> None:
        """Forget the frames GX keeps after a run (the last of each asset): each run brings its own, and a
        kept frame per asset (a whole val or test split's values at 5M votes, the cross-split codes) adds up."""
        manager = self.source.get_execution_engine().batch_manager
        manager.reset_batch_cache()
        manager.batch_data_cache.clear()

    def keep(self, asset_name: str, run, results: list) -> None:
        """Store `results` (merged over the chunks, examples decoded) as the asset's one validation result."""
        store = self.context.validation_results_store
        name = f"rmpipe.{asset_name}"
        keys = [k for k in store.list_keys() if k.expectation_suite_identifier.name == name]
        run = copy.copy(run)
        run.results = results
        run.success = all(r.success for r in results)
        successful = sum(r.success for r in results)
        run.statistics = {**run.statistics, "evaluated_expectations": len(results),
                          "successful_expectations": successful, "unsuccessful_expectations": len(results) - successful,
                          "success_percent": successful / len(results) * 100 if results else None}
        for key in keys:
            store.set(key, run)

    def publish(self, asset_name: str, run, results: list) -> None:
        """`results` as the asset's one validation result, `run` (a fresh one, or one read back from the
        validate memo) standing for its meta; an asset no GX run of this runner made gets its suite and key
        here, so the docs show one page per suite whichever parts were checked this time."""
        name = f"rmpipe.{asset_name}"
        store = self.context.validation_results_store
        if not any(k.expectation_suite_identifier.name == name for k in store.list_keys()):
            configs = [r.expectation_config for r in results]
            self.context.suites.add(gx.ExpectationSuite(name=name, expectations=configs))
            run_id = RunIdentifier(run_time=datetime.datetime.now(datetime.timezone.utc))
            batch = run.batch_id or f"{self.source.name}-{asset_name}"  # the id GX gives the asset's batches
            store.set(ValidationResultIdentifier(ExpectationSuiteIdentifier(name), run_id, batch), run)
        self.keep(asset_name, run, results)


def _merge_counts(result: dict, parts: list[dict]) -> None:
    """A column-map expectation's counts over the chunks, and the percentages GX derives from them."""
    for key in ("element_count", "unexpected_count", "missing_count"):
        if key in result:
            result[key] = sum(p.get(key) or 0 for p in parts)
    for key in ("partial_unexpected_list", "partial_unexpected_index_list"):
        if key in result:
            result[key] = [v for p in parts for v in p.get(key) or []][:EXAMPLES]
    if "partial_unexpected_counts" in result:
        result["partial_unexpected_counts"] = unexpected_counts(result["partial_unexpected_list"], EXAMPLES)
    n, bad, missing = result["element_count"], result["unexpected_count"], result.get("missing_count")
    total = bad / n * 100 if n else None
    if "missing_count" in result:  # GX's `skip_missing` is off: percentages of the non-null rows
        nonmissing = bad / (n - missing) * 100 if n and n > missing else None
        result.update(missing_percent=missing / n * 100 if n else None, unexpected_percent_total=total,
                      unexpected_percent_nonmissing=nonmissing)
    else:
        nonmissing = total
    result["unexpected_percent"] = nonmissing


def merge_chunk_results(runs: list[list]) -> list:
    """One result per expectation from its results on consecutive chunks of a table: what one run on
    the whole table reports, for every expectation but a whole-table statistic (a mean: see the values suite)."""
    if len(runs) == 1:
        return runs[0]
    merged = []
    for parts in zip(*runs):
        first = copy.copy(parts[0])
        result = dict(first.result or {})
        if "unexpected_count" in result:
            _merge_counts(result, [p.result or {} for p in parts])
        elif first.expectation_config.type == "expect_table_row_count_to_be_between":
            result["observed_value"] = sum((p.result or {}).get("observed_value") or 0 for p in parts)
        broken = next((p for p in parts if exception_message(p.exception_info)), None)
        first.result, first.success = result, all(p.success for p in parts)
        if broken is not None:
            first.exception_info = broken.exception_info
        merged.append(first)
    return merged
