"""data.engine: the collect stage on a real two-worker Dask cluster writes what the local path writes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rmpipe.core.errors import ConfigError
from rmpipe.data.sample.batches import write_sample_batches
from rmpipe.core.settings import DataSettings

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ["data/collected/votes.parquet", "data/collected/quarantine.jsonl", "reports/collect.json",
           "data/aggregated/pairs.parquet", "reports/annotators.json", "reports/annotators.md"]


def _project(where: Path, engine: dict) -> Path:
    """Sample batches plus the cases where a batch collected alone differs from one collected after the
    others: a byte-identical copy of a batch, and a late batch holding a vote already in an earlier one."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"] = engine
    params["collect"]["on_rejected_batch"] = "skip"
    where.mkdir(parents=True)
    (where / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    incoming = where / "data" / "incoming"
    write_sample_batches(incoming, {**params["sample_data"], "n_pairs": 150, "n_batches": 4, "pair_rows": 20})
    first = incoming / "batch-0001.jsonl"
    lines = first.read_text().splitlines(keepends=True)
    first.write_text("".join(lines[:-30]))
    (incoming / "batch-0005-late.jsonl").write_text("".join(lines[-30:] + lines[:1]))  # one cross-batch repeat
    shutil.copy(incoming / "batch-0002.csv", incoming / "batch-0006-copy.csv")  # a duplicate file
    return where


def _run(stage: str, cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def test_collect_and_aggregate_on_a_two_worker_dask_cluster_write_the_local_bytes(tmp_path):
    """Collect reads the batches on the workers; aggregate's group-by on the pair code runs there as
    partial counts (majority labels from them, crowd-kit's on the local path). Mutation tried: `_reuse`
    keeping every batch collected ahead (no check against the earlier batches) lets the duplicate file
    and the cross-batch repeat through on the cluster, and this turns red."""
    local = _project(tmp_path / "local", {"engine": "local", "scheduler": "", "workers": 0})
    dask = _project(tmp_path / "dask", {"engine": "dask", "scheduler": "", "workers": 2})
    for stage in ("collect", "aggregate"):
        assert "data.engine=dask" not in _run(stage, local)
        log = _run(stage, dask)
        assert "data.engine=dask: scheduler tcp://127.0.0.1:" in log and ", 2 workers" in log, log
    for rel in OUTPUTS:
        assert (dask / rel).read_bytes() == (local / rel).read_bytes(), rel
    report = yaml.safe_load((local / "reports/collect.json").read_text())
    statuses = {b["batch_id"]: b["status"] for b in report["batches"]}
    assert statuses["batch-0006-copy.csv"] == "duplicate_of:batch-0002.csv"
    late = next(b for b in report["batches"] if b["batch_id"] == "batch-0005-late.jsonl")
    assert late["status"] == "accepted" and late["rows_quarantined"] == 1


@pytest.mark.parametrize("data, words", [
    ({"engine": "spark"}, "data.engine"),
    ({"engine": "dask", "scheduler": 8786}, "data.scheduler"),
    ({"engine": "dask", "workers": -1}, "data.workers"),
])
def test_bad_engine_params_are_a_config_error(data, words):
    with pytest.raises(ConfigError, match=words):
        DataSettings.parse({"data": data})
    assert DataSettings.parse({}).engine == "local"
