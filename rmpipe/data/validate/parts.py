"""What a group of consecutive split parts contributes to the contract, as a record the validate memo can keep.

A split is checked a group of parts at a time (data/split/<split>/<part>.parquet; validate_contract):
the group's schema and values suites run on its chunks and their results are merged over them
(validate_runs), then the groups' records are merged the same way into the split's verdict. A record holds a suite's validation result as GX's own
JSON (the form it is kept in, so a record fresh from GX and one read back from the memo are the same
objects to everything after), the part's rows and GX runs, and what the whole-split checks need of its
rows: the response keys (16 bytes a pair) and the chosen-longer flags (1 byte a pair).

The memo (rmpipe.data.part_memo, `.rmpipe/memo/validate/`) keys a record by the split, its parts' content
sha256 in order, the contract's thresholds and the validate stage's code closure; the cross-split checks
never come from it: they run over every part each run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from great_expectations.core.expectation_validation_result import (
    ExpectationSuiteValidationResultSchema,
)

KINDS = ("schema", "values")


@dataclass
class PartCheck:
    """A group's suites (merged over its GX runs), rows, GX runs of the values suite, keys and flags."""

    rows: int
    suites: dict[str, dict[str, Any]]  # kind -> the suite's validation result as GX writes it (to_json_dict)
    value_runs: int
    keys: tuple[np.ndarray, np.ndarray] | None
    longer: np.ndarray | None  # uint8 chosen-longer flags; None where the part has no response texts

    def results(self, kind: str) -> list:
        """The suite's per-expectation results as GX objects (fresh ones each call: callers edit them)."""
        return suite_result(self.suites[kind]).results

    def write(self, folder: Path) -> None:
        meta = {"rows": self.rows, "value_runs": self.value_runs, "suites": self.suites,
                "has_keys": self.keys is not None, "has_longer": self.longer is not None}
        (folder / "check.json").write_text(json.dumps(meta, sort_keys=True), encoding="utf-8")
        if self.keys is not None:
            np.save(folder / "keys.npy", np.stack([self.keys[0], self.keys[1]]).astype(np.uint64), allow_pickle=False)
        if self.longer is not None:
            np.save(folder / "longer.npy", self.longer.astype(np.uint8), allow_pickle=False)

    @classmethod
    def read(cls, folder: Path) -> PartCheck:
        meta = json.loads((folder / "check.json").read_text(encoding="utf-8"))
        keys = None
        if meta["has_keys"]:
            stacked = np.load(folder / "keys.npy", allow_pickle=False)
            keys = (stacked[0], stacked[1])
        longer = np.load(folder / "longer.npy", allow_pickle=False) if meta["has_longer"] else None
        return cls(meta["rows"], meta["suites"], meta["value_runs"], keys, longer)


def as_json(run) -> dict[str, Any]:
    """A suite validation result as GX's JSON (numbers and examples in their JSON form)."""
    return json.loads(json.dumps(run.to_json_dict(), default=str))


def suite_result(data: dict[str, Any]):
    """GX's suite validation result object from its JSON."""
    return ExpectationSuiteValidationResultSchema().load(json.loads(json.dumps(data)))


def expectation_shapes(check: PartCheck, kind: str) -> list[tuple]:
    """The suite's expectations (type and column) in order: parts whose suites differ cannot be merged."""
    return [(r["expectation_config"]["type"], r["expectation_config"]["kwargs"].get("column"))
            for r in check.suites[kind]["results"]]
