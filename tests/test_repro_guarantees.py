"""The guarantees of one real run: a git checkout, the sample batches, and `rmpipe rebuild` (the rebuild
flow in Prefect's ephemeral mode, which runs `dvc repro` of every stage and logs its output into the flow
run) with fake secrets planted in the environment. One build for the module; every test reads it.

What is checked against the real thing rather than by hand: the lineage manifest against dvc.lock and
DVC's own hashing, `rmpipe verify` against a one-byte edit, the git commit against git, row counts against
independent readers of each format, and secrets against every byte the run wrote.
"""

from __future__ import annotations

import csv
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from test_dvc_pipeline import BIN, copy_project, run

# The first test pays for the whole build (~3 min on a quiet 2-core machine, 10+ on a busy one).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

PY = sys.executable
# Made at import, so no file (this one included: the project copy holds it) carries the value itself.
SECRET = f"rmpipe-planted-{secrets.token_hex(8)}"
# Where secrets live in a user's environment; each value carries SECRET so one search finds any of them.
PLANTED = {"RMPIPE_FAKE_SECRET": SECRET, "HF_TOKEN": f"hf_{SECRET}", "AWS_SECRET_ACCESS_KEY": f"aws-{SECRET}",
           "DVC_REMOTE_PASSWORD": f"dvc-{SECRET}", "WANDB_API_KEY": f"wandb-{SECRET}",
           "GIT_PASSWORD": f"git-{SECRET}"}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    proj = copy_project(tmp_path_factory.mktemp("audit") / "proj")
    run(["git", "init", "-q"], proj)
    run([str(BIN / "rmpipe"), "sample-data"], proj)
    run(["git", "add", "-A"], proj)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qm", "init"], proj)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PLANTED, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(proj),
               PREFECT_LOGGING_LEVEL="INFO")
    done = subprocess.run([str(BIN / "rmpipe"), "rebuild"], cwd=proj, env=env, capture_output=True, text=True,
                          timeout=1500)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-5000:]
    return {"project": proj, "log": log, "head": run(["git", "rev-parse", "HEAD"], proj).stdout.strip()}


def rmpipe(args: list[str], project: Path) -> subprocess.CompletedProcess:
    return run([str(BIN / "rmpipe"), *args], project, check=False)


def lock_entries(project: Path) -> dict[str, dict]:
    """Every dep and out in dvc.lock with its md5, read here independently of rmpipe.audit.lineage."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    entries = {}
    for stage, entry in lock["stages"].items():
        for item in entry.get("deps", []) + entry.get("outs", []):
            if "md5" in item:
                entries.setdefault(item["path"], {"md5": item["md5"], "stage": stage})
    return entries


def test_lineage_lists_every_upstream_input_with_dvc_hashes_and_the_real_commit(built):
    """The manifest's inputs are dvc.lock's (every stage but export), folders included as `<md5>.dir`, and
    rmpipe's re-hash of each path equals what DVC recorded; the git commit is the checkout's HEAD.
    Mutation tried: `git_state` returning None turns this red."""
    from rmpipe.audit.lineage import dvc_md5, read_manifest

    from rmpipe.audit.lineage import uncached_outs

    project = built["project"]
    manifest = read_manifest(project / "models/export")
    upstream = {path: info for path, info in lock_entries(project).items() if info["stage"] != "export"}
    uncached = uncached_outs(project)  # `cache: false`: no checkout restores them, so evidence, not inputs
    assert {"checkpoints/train", "metrics/train.json", "reports/validation.json"} <= uncached
    assert "reports/data_docs" not in uncached  # cached, so `dvc checkout` restores it
    assert {path: info["md5"] for path, info in manifest["inputs"].items()} == \
        {path: info["md5"] for path, info in upstream.items() if path not in uncached}
    assert {path: info["md5"] for path, info in manifest["evidence"].items()} == \
        {path: info["md5"] for path, info in upstream.items() if path in uncached}
    folders = [path for path, info in manifest["inputs"].items() if info["md5"].endswith(".dir")]
    assert {"data/collected", "data/split", "data/tokenized", "models/backbone", "models/reward_model",
            "data/incoming"} <= set(folders)
    assert "data/battery.jsonl" in manifest["inputs"] and "rmpipe/training/loop.py" in manifest["inputs"]
    for path, info in manifest["inputs"].items():
        assert dvc_md5(project / path) == info["md5"], path
    assert manifest["git"]["commit"] == built["head"] and len(built["head"]) == 40
    # everything that made the model is committed; the run's own products (dvc.lock first) are not yet
    assert manifest["git"]["dirty"] is False and manifest["git"]["dvc_lock"] == "untracked", manifest["git"]
    assert sorted(manifest["batch_ids"]["train"]) == sorted(
        p.name for p in (project / "data/incoming").iterdir() if p.suffix in (".jsonl", ".csv", ".parquet"))


@pytest.mark.parametrize("target", ["data/split/test", "data/battery.jsonl"])
def test_verify_fails_naming_the_one_input_whose_byte_changed(built, target):
    """`rmpipe verify` passes on the fresh build, then one flipped byte in an input (inside a folder input,
    and a plain file input) makes it exit non-zero naming that input; `--export-only` still passes, since
    the export's own files are untouched. Mutation tried: `_verify_inputs` skipping `.dir` entries turns the
    data/split case red (a byte edited inside a folder goes unnoticed)."""
    project = built["project"]
    ok = rmpipe(["verify", "models/export"], project)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    path = project / target
    if path.is_dir():  # a split is a folder of parts: damage its first
        path = min(path.glob("*.parquet"))
    original = path.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF
    try:
        path.write_bytes(bytes(damaged))
        bad = rmpipe(["verify", "models/export"], project)
        named = "data/split" if target.startswith("data/split/") else target
        assert bad.returncode != 0
        assert f"input changed since export: {named} " in bad.stdout + bad.stderr, bad.stdout + bad.stderr
        only = rmpipe(["verify", "--export-only", "models/export"], project)
        assert only.returncode == 0, only.stdout + only.stderr
    finally:
        path.write_bytes(original)
    assert rmpipe(["verify", "models/export"], project).returncode == 0


@pytest.fixture(scope="module")
def came_back(built) -> dict:
    """The run committed, then `dvc exp run -S train.lr=...` (train, evaluate and export again), then back:
    `git checkout -- . && dvc checkout`. The project ends as it was, plus the commit and the experiment."""
    from rmpipe.audit import history

    project, dvc = built["project"], str(BIN / "dvc")
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qm", "run record"], project)
    before = history.records(project)
    lr = yaml.safe_load((project / "params.yaml").read_text())["train"]["lr"]
    run(["git", "config", "user.name", "t"], project)
    run(["git", "config", "user.email", "t@example.invalid"], project)
    exp = run([dvc, "exp", "run", "-S", f"train.lr={lr * 2}"], project)
    during = rmpipe(["verify", "models/export"], project)
    run(["git", "checkout", "--", "."], project)
    run([dvc, "checkout"], project)
    return {"exp": exp, "during": during, "after": rmpipe(["verify", "models/export"], project),
            "before": before, "history": history.records(project), "status": run(["git", "status", "--porcelain"], project)}


def test_after_an_experiment_and_checkout_back_verify_passes_with_no_retrain(came_back):
    """Mutation tried: recording `cache: false` outputs (checkpoints/train, reports/data_docs) as inputs again
    turns this red (`input changed since export: checkpoints/train`)."""
    assert "Running stage 'train'" in came_back["exp"].stdout + came_back["exp"].stderr
    assert came_back["during"].returncode == 0  # the experiment's own export, verified against its own run
    after = came_back["after"]
    assert after.returncode == 0, after.stdout + after.stderr
    # the history: the experiment's model was appended, nothing went back with the checkout
    before, now = came_back["before"], came_back["history"]
    assert now[:len(before)] == before and [r["kind"] for r in now[len(before):]] == ["model"]
    assert came_back["status"].stdout.strip() == ""  # nothing of rmpipe's history in the work tree


def test_verify_export_only_catches_a_changed_export_file(built):
    """Mutation tried: `--export-only` skipping the file hashes too (returning no problems) turns this red."""
    project = built["project"]
    card = project / "models/export/README.md"
    original = card.read_bytes()
    try:
        card.write_bytes(original + b" ")
        bad = rmpipe(["verify", "--export-only", "models/export"], project)
        assert bad.returncode != 0 and "export file changed: README.md" in bad.stdout + bad.stderr
    finally:
        card.write_bytes(original)


def test_no_planted_secret_in_any_output_log_or_flow_run(built):
    """Every byte under the project after the run (data, models with the DeepSpeed config record, dvclive,
    GX data docs, reports, dvc.lock, Prefect's database holding the flow-run logs) and the run's own output.
    Mutation tried: adding `"env": dict(os.environ)` to train's training.json record turns this red."""
    project = built["project"]
    # the places a leak would land exist and hold what they should, so the search below means something
    training = json.loads((project / "models/reward_model/training.json").read_text())
    assert training["deepspeed_config"]["train_batch_size"]
    assert list((project / "dvclive/train").rglob("*.tsv"))
    assert (project / "reports/data_docs/index.html").stat().st_size > 0
    prefect_files = [p for p in (project / ".prefect").rglob("*") if p.is_file()]
    assert any(b"Running stage 'train'" in p.read_bytes() for p in prefect_files), \
        "the flow run's log lines were not found in Prefect's database: the search would prove nothing"

    needles = [value.encode() for value in PLANTED.values()] + [SECRET.encode()]
    leaked = [str(p.relative_to(project)) for p in project.rglob("*")
              if p.is_file() and any(n in p.read_bytes() for n in needles)]
    assert leaked == []
    assert SECRET not in built["log"]


def test_a_cli_flow_on_a_temporary_server_gives_no_advice_to_run_a_dedicated_one(built):
    """`rmpipe rebuild` runs its flow on Prefect's temporary server on purpose: Prefect's link to the docs on
    running a dedicated server is noise there (the filter in pipeline/tasks.py)."""
    assert "Starting temporary server" in built["log"]  # the ephemeral server really started in this run
    assert "docs.prefect.io" not in built["log"]


def _independent_rows(path: Path) -> int:
    """Rows in a batch file, counted by a reader that is not rmpipe's."""
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            records = list(csv.reader(fh))
        return sum(1 for record in records[1:] if record)  # a blank line holds no record
    if path.suffix == ".jsonl":
        return sum(1 for line in path.read_bytes().split(b"\n") if line.strip())
    return pq.ParquetFile(path).metadata.num_rows


def test_rows_read_match_independent_counts_in_every_format(built):
    """Per batch, rows_read equals the count of Python's csv module / raw JSONL lines / Parquet metadata, and
    the normalized and quarantined rows add up to the votes table and the quarantine file.
    Mutation tried: the CSV reader dropping its last record turns this red."""
    project = built["project"]
    report = json.loads((project / "reports/collect.json").read_text())
    by_batch = {entry["batch_id"]: entry for entry in report["batches"]}
    batches = sorted(p for p in (project / "data/incoming").iterdir() if p.suffix in (".jsonl", ".csv", ".parquet"))
    assert {p.suffix for p in batches} == {".jsonl", ".csv", ".parquet"}
    for path in batches:
        entry = by_batch[path.name]
        assert entry["rows_read"] == _independent_rows(path) > 0, path.name
        assert entry["rows_read"] == entry["rows_normalized"] + entry["rows_quarantined"]
    accepted = [e for e in report["batches"] if e["status"] == "accepted"]
    assert sum(pq.ParquetFile(part).metadata.num_rows for part in (project / "data/collected/votes").iterdir()) == \
        sum(e["rows_normalized"] for e in accepted)
    quarantine = (project / "data/collected/quarantine.jsonl").read_bytes().split(b"\n")
    assert sum(1 for line in quarantine if line.strip()) == sum(e["rows_quarantined"] for e in report["batches"])
