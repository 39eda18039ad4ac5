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
OUTPUTS = ["data/collected/votes", "data/collected/quarantine.jsonl", "reports/collect.json",
           "data/aggregated/pairs", "reports/annotators.json", "reports/annotators.md"]


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
        assert _sha(dask / rel) == _sha(local / rel), rel
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


# --- the Dask path checks what workers say, and chunking changes no byte (issue #29, item 9) ----------------


def _mixed_batches(incoming: Path) -> Path:
    """Sample vote files (.jsonl, .csv) and pair rows (.parquet), plus long-text vote and pair batches: enough
    text in the prompt column for its dictionary to overflow into plain pages, across many read chunks."""
    import json
    import random

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    write_sample_batches(incoming, {**params["sample_data"], "n_pairs": 1500, "n_batches": 2, "pair_rows": 300})
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "ember", "quartz", "lumen", "übung", "海"]

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    votes = [{"prompt": f"{i} " + text(rng.randint(50, 600)), "response_a": text(80), "response_b": text(90),
              "annotator_id": f"L{i % 9}", "choice": rng.choice("ab")} for i in range(5000)]
    pairs = [{"prompt": f"p{i} " + text(rng.randint(20, 400)), "chosen": text(70), "rejected": text(60)}
             for i in range(2500)]
    for name, rows in (("batch-0009-long.jsonl", votes), ("batch-0010-pairs.jsonl", pairs)):
        (incoming / name).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return incoming


@pytest.fixture(scope="module")
def two_workers():
    from rmpipe.data.engine import dask_client

    with dask_client(DataSettings.parse({"data": {"engine": "dask", "scheduler": "", "workers": 2}})) as client:
        yield client


def _sha(path: Path) -> str | dict[str, str]:
    """A file's sha256, or a folder's {file: sha256}."""
    import hashlib

    from rmpipe.core.io import folder_hashes

    return folder_hashes(path) if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()


def test_local_and_dask_write_the_same_votes_bytes_at_any_chunk_size_on_long_mixed_texts(tmp_path):
    """The issue's case: same rows and row groups, other pages in the prompt column. Mutation tried: writing
    each row group as it comes (no fixed 1024-row windows) makes the Dask file and the 1000-row chunks differ."""
    from rmpipe.core.settings import CollectSettings
    from rmpipe.data.collect.batch import collect_batch
    from rmpipe.data.collect.run import collect_to
    from rmpipe.data.engine import batch_runner

    incoming = _mixed_batches(tmp_path / "incoming")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    conf = CollectSettings.from_section({**params["collect"], "incoming_dir": str(incoming), "on_rejected_batch": "skip"})
    written = {}
    for engine, chunk_rows in (("local", 16_384), ("local", 1000), ("dask", 1000), ("dask", 16_384)):
        settings = DataSettings.parse({"data": {"engine": engine, "scheduler": "", "workers": 2}})
        out = tmp_path / f"{engine}-{chunk_rows}"
        with batch_runner(settings, collect_batch) as ahead:
            _, report = collect_to(incoming, conf, out, [], ahead=ahead, chunk_rows=chunk_rows)
        written[(engine, chunk_rows)] = _sha(out)
    assert report["totals"]["votes"] > 12_000 and report["totals"]["accepted"] == 5
    assert all(parts == written[("local", 16_384)] for parts in written.values()), written


def test_a_worker_with_other_code_or_libraries_is_refused_in_one_line(tmp_path, two_workers):
    from rmpipe.core.settings import CollectSettings
    from rmpipe.data.collect.batch import collect_batch
    from rmpipe.data.engine import WorkerMismatch, collect_on_worker, stack_fingerprint

    batch = tmp_path / "b.jsonl"
    batch.write_text('{"prompt": "p", "response_a": "a", "response_b": "b", "annotator_id": "x", "choice": "a"}\n')
    conf = CollectSettings.from_section({**yaml.safe_load((ROOT / "params.yaml").read_text())["collect"]})
    expected = stack_fingerprint()
    assert set(expected) >= {"code", "python", "pyarrow", "numpy", "pandas"} and len(expected["code"]) == 64
    for key, value in (("pyarrow", "0.0.1"), ("code", "0" * 64)):  # the stage's view differs from the worker's
        future = two_workers.submit(collect_on_worker, collect_batch, {**expected, key: value}, batch, conf,
                                    tmp_path, 0, pure=False)
        with pytest.raises(WorkerMismatch, match=f"runs other code or libraries than the collect stage: {key} ") as err:
            future.result()
        assert "\n" not in str(err.value) and "requirements.lock" in str(err.value)
    assert not list(tmp_path.glob("ahead-*"))  # refused before reading: nothing written


def test_the_stage_checks_each_workers_sha256_and_attempts_write_their_own_parts(tmp_path, two_workers):
    from rmpipe.core.settings import CollectSettings
    from rmpipe.data.collect.batch import collect_batch
    from rmpipe.data.engine import Checked, WorkerMismatch, collect_on_worker, stack_fingerprint

    rows = [f'{{"prompt": "p{i}", "response_a": "a", "response_b": "b", "annotator_id": "x", "choice": "a"}}\n'
            for i in range(3)]
    batch = tmp_path / "b.jsonl"
    batch.write_text("".join(rows))
    conf = CollectSettings.from_section({**yaml.safe_load((ROOT / "params.yaml").read_text())["collect"]})
    expected = stack_fingerprint()
    parts = tmp_path / "parts"
    parts.mkdir()

    attempts = [two_workers.submit(collect_on_worker, collect_batch, expected, batch, conf, parts, 0, pure=False)
                for _ in range(2)]  # a task and its re-run, at once: each its own part
    names = sorted(f.result().part.name for f in attempts)
    assert len(set(names)) == 2 and all(n.startswith("ahead-000000.") and n.endswith(".parquet") for n in names)
    taken = Checked(attempts[0], batch, parts / "ahead-000000.parquet").result()
    assert taken.part == parts / "ahead-000000.parquet" and taken.part.exists() and taken.accepted

    late = Checked(two_workers.submit(collect_on_worker, collect_batch, expected, batch, conf, parts, 1, pure=False),
                   batch, parts / "ahead-000001.parquet")
    late.future.result()  # the worker has read and hashed the file ...
    batch.write_text("".join(rows[:2]))  # ... which then changes under it (or the worker saw other storage)
    with pytest.raises(WorkerMismatch, match="the Dask worker read sha256 .* this process reads"):
        late.result()
