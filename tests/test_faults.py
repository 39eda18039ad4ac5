"""Faults of the machine end in one line naming the cause and the fix (issue #29, item 10).

Real faults, no mocks: a file name the file system's 255 bytes cannot extend, a real full disk (a small
tmpfs mounted over the folder written to; mounting needs root, so these tests skip without it), a corrupted
object in a real DVC cache.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
GOOD = {"prompt": "p", "response_a": "a", "response_b": "b", "annotator_id": "x", "choice": "a"}


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{Path(PY).parent}{os.pathsep}{os.environ['PATH']}"}


@pytest.fixture
def small_disk():
    """`small_disk(folder, kb)` mounts a tmpfs of `kb` KiB on `folder` (created); all unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill a real disk needs root (run the suite as root, e.g. in CI's container)")
    mounted: list[Path] = []

    def mount(folder: Path, kb: int) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kb}k", "tmpfs", str(folder)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): a container without CAP_SYS_ADMIN")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _project(tmp_path: Path) -> tuple[Path, Path]:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    incoming = tmp_path / params["collect"]["incoming_dir"]
    incoming.mkdir(parents=True)
    return tmp_path, incoming


def _collect(project: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "stages.collect"], cwd=project, env=_env(), capture_output=True, text=True, check=False,
                          timeout=180)


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    return errors[0]


def test_a_name_too_long_for_its_sidecar_is_refused_with_its_reason_and_the_rest_is_collected(tmp_path):
    project, incoming = _project(tmp_path)
    long_name = "n" * 245 + ".jsonl"  # 251 bytes: a file may have it, its <name>.source.json may not
    (incoming / long_name).write_bytes(orjson.dumps(GOOD) + b"\n")
    (incoming / "ok.jsonl").write_bytes(b"\n".join(orjson.dumps({**GOOD, "prompt": f"q{i}"}) for i in range(5)) + b"\n")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["collect"]["on_rejected_batch"] = "skip"
    (project / "params.yaml").write_text(yaml.safe_dump(params))

    done = _collect(project)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    report = json.loads((project / "reports/collect.json").read_text())
    entry = {e["batch_id"]: e for e in report["batches"]}
    assert entry[long_name]["status"] == "refused"
    assert "251 bytes long" in entry[long_name]["message"] and "rename it shorter" in entry[long_name]["message"]
    assert entry["ok.jsonl"]["status"] == "accepted" and report["totals"]["votes"] == 5

    params["collect"]["on_rejected_batch"] = "fail"  # the default: the run stops, in one line
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    line = _one_error_line(_collect(project))
    assert "batch refused" in line and "rename it shorter" in line


def test_collect_on_a_full_disk_ends_in_one_line_naming_the_folder_and_the_space(tmp_path, small_disk):
    project, incoming = _project(tmp_path)
    rng = random.Random(0)
    rows = [orjson.dumps({**GOOD, "prompt": f"q{i}", "response_a": rng.randbytes(300).hex(),
                          "annotator_id": f"a{i % 7}"}) for i in range(600)]
    (incoming / "big.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    small_disk(project / "data/collected", 64)  # the votes (~360 KB of random hex) cannot fit

    done = _collect(project)
    line = _one_error_line(done)
    assert done.returncode == 3
    assert "no space left on the disk" in line and "data/collected" in line
    assert "MB free of" in line and "needs up to about" in line and "free space there" in line
    assert not (project / "data/collected/votes").exists()


# ------------------------------------------------------------------------------- a damaged DVC cache


def _cache_object(project: Path, data: bytes) -> str:
    import hashlib

    md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
    path = project / ".dvc/cache/files/md5" / md5[:2] / md5[2:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return md5


def _model_inputs(project: Path, tag: str, parts: bool) -> dict[str, str]:
    """A model's votes (a folder of parts, or `not parts`: one votes.parquet, as models recorded before the
    parts) and split folder (train.parquet) as DVC 3 caches them: {path: md5}."""
    import io

    import pandas as pd

    def parquet(frame: pd.DataFrame) -> bytes:
        buffer = io.BytesIO()
        frame.to_parquet(buffer, compression="zstd")
        return buffer.getvalue()

    from rmpipe.data.aggregate.run import AggregateSettings, aggregate
    from rmpipe.data.collect.run import collect_dir

    incoming = project / f"incoming-{tag}"
    incoming.mkdir()
    (incoming / "b1.jsonl").write_bytes(b"\n".join(
        orjson.dumps({**GOOD, "prompt": f"{tag} prompt {i} " * 20, "annotator_id": f"a{k}"})
        for i in range(20) for k in range(2)) + b"\n")
    votes, _, _ = collect_dir(incoming, {**_params()["collect"], "incoming_dir": str(incoming)})
    train = aggregate(votes, AggregateSettings.from_section(_params()["aggregate"])).pairs[["pair_id", "chosen"]]
    train_md5 = _cache_object(project, parquet(train))
    listing = json.dumps([{"md5": train_md5, "relpath": "train.parquet"}]).encode()
    split = {"data/split": _dir_object(project, listing)}
    if not parts:
        return {"data/collected/votes.parquet": _cache_object(project, parquet(votes)), **split}
    half = len(votes) // 2  # two parts: b10 before b2 in batch (name) order
    collected = json.dumps([  # collect's output folder: the votes parts (listed out of batch order) and the quarantine
        {"md5": _cache_object(project, b""), "relpath": "quarantine.jsonl"},
        {"md5": _cache_object(project, parquet(votes.iloc[half:])), "relpath": "votes/b2.jsonl.parquet"},
        {"md5": _cache_object(project, parquet(votes.iloc[:half])), "relpath": "votes/b10.jsonl.parquet"}])
    return {"data/collected": _dir_object(project, collected.encode()), **split}


def _params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def _dir_object(project: Path, listing: bytes) -> str:
    import hashlib

    md5 = hashlib.md5(listing, usedforsecurity=False).hexdigest() + ".dir"
    path = project / ".dvc/cache/files/md5" / md5[:2] / md5[2:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(listing)
    return md5


def test_trace_names_the_model_whose_cached_data_is_damaged_and_traces_the_rest(tmp_path):
    from rmpipe.audit import history
    from rmpipe.audit.trace import trace

    project = tmp_path
    (project / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    inputs = [_model_inputs(project, tag, parts) for tag, parts in (("old", False), ("new", True))]
    for seq, lock in enumerate(inputs, 1):
        history.append(project, {"time": f"2026-12-0{seq}", "trigger": "test", "upstream_lock_md5": lock,
                                 "model": {"md5": f"m{seq}", "manifest_sha256": f"{seq:064d}"},
                                 "batches": {"b1.jsonl": {"sha256": "0" * 64}}, "n_train_pairs": 20,
                                 "aggregate_params": _params()["aggregate"]})
    # a bit flipped in the middle of the PAST model's votes (a parquet page: zstd fails to decompress it)
    damaged = project / ".dvc/cache/files/md5" / inputs[0]["data/collected/votes.parquet"][:2] / \
        inputs[0]["data/collected/votes.parquet"][2:]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 3] ^= 0xFF
    damaged.write_bytes(bytes(data))

    result = trace(project, batch="b1.jsonl")
    old, new = result["models"]
    assert old["damaged"] and str(damaged) in old["damaged"] and old["decided"] is None
    assert new.get("damaged") is None and new["contributed"] == 20 and new["votes"] == 40
    assert result["damaged"] == [f"#{old['seq']} {old['model']}"]

    done = subprocess.run([PY, "-m", "pipeline.cli", "trace", "--batch", "b1.jsonl"], cwd=project, env=_env(),
                          capture_output=True, text=True, timeout=120, check=False)
    line = _one_error_line(done)
    assert done.returncode == 2
    assert f"#{old['seq']} {old['model']}" in line and "dvc fetch" in line
    assert "20 contributed" in done.stdout and "DAMAGED in the DVC cache" in done.stdout  # the rest is traced


# ------------------------------------------------------------------------------- a full disk in training


@pytest.mark.slow
def test_a_checkpoint_save_on_a_full_disk_says_why_and_removes_the_partial_step(tmp_path, small_disk):
    import pandas as pd
    from test_train import TINY, make_pairs, make_project

    from rmpipe.core.settings import ModelSettings
    from rmpipe.model.backbones import build_tiny_backbone

    texts = pd.concat([make_pairs(16, 0).chosen, make_pairs(16, 0).rejected]).tolist()
    backbone = build_tiny_backbone(texts, ModelSettings.from_section({"max_length": 64, "tiny": TINY}),
                                   tmp_path / "backbone")
    project = make_project(tmp_path / "proj", backbone, n_train=16, n_val=8, epochs=1, checkpoint_every=1)
    small_disk(project / "checkpoints/train", 96)  # a DeepSpeed checkpoint of the tiny model does not fit

    done = subprocess.run([PY, "-m", "stages.train"], cwd=project, env=_env(), capture_output=True, text=True,
                          timeout=300, check=False)
    line = _one_error_line(done)
    assert done.returncode == 2
    assert "checkpoint save to" in line and "checkpoints/train/step1 failed" in line
    assert "no space left on the disk" in line and "MB free of" in line and "partial step1 folder was removed" in line
    assert not (project / "checkpoints/train/step1").exists() and not (project / "checkpoints/train/latest").exists()
    assert not (project / "models/reward_model").exists()


# ------------------------------------------------------------------------------- a full disk under Prefect


@pytest.mark.parametrize("full", [".prefect", "."])
def test_on_new_batch_with_prefects_database_on_a_full_disk_ends_in_one_line(tmp_path, small_disk, full):
    project = tmp_path / "proj"
    project.mkdir()
    if full == ".":
        small_disk(project, 2048)
    for name in ("dvc.yaml", "params.yaml"):
        (project / name).write_text((ROOT / name).read_text())
    batch = tmp_path / "nb.jsonl"
    batch.write_bytes(orjson.dumps(GOOD) + b"\n")
    env = {k: v for k, v in _env().items() if k not in ("PREFECT_HOME", "PREFECT_API_URL")}
    if full == ".prefect":  # the project's own database folder (the default) on a full disk
        home = small_disk(project / ".prefect", 2048)
    else:  # the database elsewhere, the project's disk full
        home = tmp_path / "prefect-home"
        home.mkdir()
        env["PREFECT_HOME"] = str(home)

    done = subprocess.run([PY, "-m", "pipeline.cli", "on-new-batch", str(batch)], cwd=project, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    line = _one_error_line(done)
    assert done.returncode == 3 and "sqlite3" not in done.stderr
    what = "Prefect's database folder" if full == ".prefect" else "the project folder"
    assert f"no space left on the disk for {what}" in line and "MB free" in line and "PREFECT_HOME" in line
    assert not any(home.iterdir())  # nothing started: no half-migrated database left behind
