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
    assert not (project / "data/collected/votes.parquet").exists()
