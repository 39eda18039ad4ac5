"""rmpipe.core.io's folder hashing: the one helper the trainer's fingerprint, the backbone manifest, the export's
lineage and dataset-folder batches all record folders with."""

from __future__ import annotations

import shutil

from rmpipe.core.io import folder_hashes, folder_sha256


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
