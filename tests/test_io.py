"""rmpipe.core.io: folder hashing (the one helper the trainer's fingerprint, the backbone manifest, the export's
lineage and dataset-folder batches all record folders with) and what a killed atomic write leaves behind."""

from __future__ import annotations

import shutil
import subprocess
import sys

from rmpipe.core.io import atomic_dir, folder_hashes, folder_sha256


def test_folder_hashes_cover_every_file_by_relative_path_and_a_rename_or_edit_changes_the_digest(tmp_path):
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "weights.bin").write_bytes(b"\x00\x01")
    (folder / ".hidden").write_text("x")
    (folder / "lineage.json").write_text("manifest")

    hashes = folder_hashes(folder, exclude=("lineage.json",))
    assert list(hashes) == [".hidden", "config.json", "sub/weights.bin"]
    digest = folder_sha256(folder)
    assert folder_sha256(shutil.copytree(folder, tmp_path / "copy")) == digest  # where it lies does not count

    (folder / "sub" / "weights.bin").rename(folder / "sub" / "weights2.bin")
    renamed = folder_sha256(folder)
    assert renamed != digest
    (folder / "config.json").write_text('{"a": 1}')
    assert folder_sha256(folder) != renamed
    assert folder_sha256(folder, exclude=("lineage.json",)) != folder_sha256(folder)


def test_atomic_dir_deletes_what_a_killed_run_left_and_nothing_of_a_live_one(tmp_path):
    """A stage killed inside `atomic_dir` (SIGKILL, or SIGTERM: no `finally` runs) leaves its temp folder, a
    whole votes folder at scale; the next run of that output deletes it. A live run's, another output's and
    an unnamed temp folder stay."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        left = {name: tmp_path / name for name in (f".votes.{dead}.ab12cd.tmp", f".votes.{dead}.old",
                                                    f".votes.{alive.pid}.ef34gh.tmp", f".pairs.{dead}.ij56kl.tmp",
                                                    ".votes.y75h802g.tmp")}
        for folder in left.values():
            (folder / "part.parquet").parent.mkdir()
            (folder / "part.parquet").write_bytes(b"x" * 1000)
        with atomic_dir(tmp_path / "votes") as out:
            (out / "part.parquet").write_bytes(b"new")
        assert (tmp_path / "votes" / "part.parquet").read_bytes() == b"new"
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == sorted(
            [f".votes.{alive.pid}.ef34gh.tmp", f".pairs.{dead}.ij56kl.tmp", ".votes.y75h802g.tmp"])
    finally:
        alive.kill()
        alive.wait()
