"""pipeline/registry.py delivery: the bytes checked are the bytes queued; admission across filesystems.

Real files, a real `dvc init` project (admission holds DVC's real rwlock guard) and, as root, a real tmpfs
mounted on the project's data/ folder: the queue (.rmpipe/queue) and data/incoming then live on two
filesystems, where a rename fails with EXDEV.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import registry

PY = sys.executable


def _project(path: Path) -> Path:
    path.mkdir(parents=True)
    subprocess.run([PY, "-m", "dvc", "init", "--no-scm", "-q"], cwd=path, check=True)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_queued_file_is_the_checked_copy_not_the_delivered_file(tmp_path):
    root = _project(tmp_path / "p")
    delivered = tmp_path / "drop" / "b1.jsonl"
    delivered.parent.mkdir()
    delivered.write_text('{"a": 1}\n')
    with registry.staged_copy(delivered, root) as staged:
        assert staged.name == "b1.jsonl" and staged.parent.parent == root / registry.STAGING_DIR
        checked = _sha(staged)
        delivered.write_text('{"a": "changed after the copy"}\n')  # the source changes after the copy
        own, why_not = registry.queue_batch(staged, root, root / "data" / "incoming", checked,
                                            {"batch_id": "b1.jsonl", "outcome": "queued", "batch_sha256": checked})
        assert why_not is None and own is not None
    queued = root / registry.QUEUE_DIR / "b1.jsonl"
    assert _sha(queued) == checked == own["batch_sha256"]  # what was checked is what waits in the queue
    assert list((root / registry.STAGING_DIR).iterdir()) == []  # no copy left behind


def test_a_staged_copy_is_removed_when_the_delivery_stops(tmp_path):
    root = _project(tmp_path / "p")
    delivered = tmp_path / "b2.jsonl"
    delivered.write_text("x\n")
    with pytest.raises(RuntimeError), registry.staged_copy(delivered, root):
        raise RuntimeError("rejected")
    assert list((root / registry.STAGING_DIR).iterdir()) == []
    assert delivered.read_text() == "x\n"


@pytest.fixture
def data_on_its_own_filesystem(tmp_path):
    """data/ as a real 8 MiB tmpfs (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    root = _project(tmp_path / "p")
    data = root / "data"
    data.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(data)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)


def test_admission_across_filesystems_copies_then_renames_inside_data_incoming(data_on_its_own_filesystem):
    root = data_on_its_own_filesystem
    incoming = root / "data" / "incoming"
    incoming.mkdir()
    assert os.stat(incoming).st_dev != os.stat(root / ".dvc").st_dev  # really two filesystems
    queue = root / registry.QUEUE_DIR
    queue.mkdir(parents=True)
    bodies = {"q1.jsonl": b'{"n": 1}\n' * 1000, "q2.jsonl": b'{"n": 2}\n'}
    for name, body in bodies.items():
        (queue / name).write_bytes(body)
    with pytest.raises(OSError) as plain:  # what the old rename-only admission ran into
        os.rename(queue / "q2.jsonl", incoming / "q2.jsonl")
    assert plain.value.errno == 18  # EXDEV
    assert registry.admit_queued(root, incoming) == ["q1.jsonl", "q2.jsonl"]
    assert {p.name: p.read_bytes() for p in incoming.iterdir()} == bodies  # no temp name left, bytes intact
    assert list(queue.iterdir()) == []
    records = [json.loads(p.read_text()) for p in (root / "reports" / "runs").glob("*.json")]
    assert sorted(r["batch_id"] for r in records if r["outcome"] == "admitted") == ["q1.jsonl", "q2.jsonl"]


def test_a_full_target_filesystem_keeps_the_batch_queued_with_one_line(data_on_its_own_filesystem):
    root = data_on_its_own_filesystem
    incoming = root / "data" / "incoming"
    incoming.mkdir()
    (root / "data" / "filler").write_bytes(b"\0" * (8 * 1024 * 1024 - 64 * 1024))  # leave ~64 KiB
    queue = root / registry.QUEUE_DIR
    queue.mkdir(parents=True)
    (queue / "big.jsonl").write_bytes(b'{"n": 1}\n' * 100_000)  # ~900 KB: does not fit
    with pytest.raises(registry.AdmissionFailed) as caught:
        registry.admit_queued(root, incoming)
    message = str(caught.value)
    assert "\n" not in message and "big.jsonl" in message and "No space left on device" in message
    assert "free space" in message and "permissions" not in message
    assert (queue / "big.jsonl").exists() and [p.name for p in incoming.iterdir()] == []  # nothing half-written
    shutil.rmtree(queue)
