"""The file-hash ledger and the remembered code hash the memos share (rmpipe.data.part_memo): a hash is read
from the ledger only while its file shows the signature it was recorded with, never from a record taken
within the racy window, and follows a published (renamed) output folder; a stage's code hash is walked
again whenever a file of its walk or a package folder changes."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from rmpipe.core import codedeps
from rmpipe.data import part_memo
from rmpipe.data.part_memo import FileHashes, place, stage_code


def age(path: Path, seconds: float = 60) -> None:
    """Set the file's (or folder's) mtime `seconds` back: outside the racy window."""
    then = time.time_ns() - int(seconds * 1e9)
    os.utime(path, ns=(then, then))


@pytest.fixture
def reads(monkeypatch) -> list[Path]:
    """Every file the ledger reads to hash it."""
    seen: list[Path] = []
    real = part_memo.sha256_file

    def counted(path):
        seen.append(Path(path))
        return real(path)

    monkeypatch.setattr(part_memo, "sha256_file", counted)
    return seen


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_hash_is_read_once_and_again_only_when_the_signature_changes(tmp_path, reads):
    part = tmp_path / "part.parquet"
    part.write_bytes(b"first bytes")
    age(part)
    ledger = tmp_path / "memo" / part_memo.LEDGER
    hashes = FileHashes(ledger)
    assert hashes.sha_of(part) == sha(b"first bytes") and reads == [part]
    hashes.save()
    assert FileHashes(ledger).sha_of(part) == sha(b"first bytes") and reads == [part]  # the next stage: unread
    part.write_bytes(b"other bytes")  # same size, new mtime
    assert FileHashes(ledger).sha_of(part) == sha(b"other bytes") and len(reads) == 2


def test_a_record_taken_within_the_racy_window_is_not_trusted(tmp_path, reads):
    """A write in the clock tick of the one hashed leaves (size, mtime, inode) as they were: such a record is
    re-read, so even a same-size rewrite with the mtime put back is seen."""
    part = tmp_path / "part.parquet"
    part.write_bytes(b"AAAA")
    ledger = tmp_path / part_memo.LEDGER
    hashes = FileHashes(ledger)
    hashes.sha_of(part)
    hashes.save()
    st = part.stat()
    part.write_bytes(b"BBBB")
    os.utime(part, ns=(st.st_atime_ns, st.st_mtime_ns))  # the signature the record holds
    assert FileHashes(ledger).sha_of(part) == sha(b"BBBB") and len(reads) == 2


def test_placed_files_are_recorded_where_their_folder_was_published(tmp_path, reads):
    """Split copies a memo file into a temp folder, renamed into place as the output: the next stage finds the
    copy's hash under its published path, unread. The copy keeps the memo file's mtime (outside the racy
    window) and a later edit of the output is seen."""
    source = tmp_path / "memo" / "entry" / "train.parquet"
    source.parent.mkdir(parents=True)
    source.write_bytes(b"split part")
    age(source)
    tmp, final = tmp_path / "out.tmp", tmp_path / "out"
    place(source, tmp / "train" / "p.parquet")
    ledger = tmp_path / "memo" / part_memo.LEDGER
    hashes = FileHashes(ledger)
    hashes.record(tmp / "train" / "p.parquet", sha(b"split part"))
    tmp.rename(final)
    hashes.moved(tmp, final)
    hashes.save()
    target = final / "train" / "p.parquet"
    assert target.stat().st_mtime_ns == source.stat().st_mtime_ns
    assert FileHashes(ledger).sha_of(target) == sha(b"split part") and reads == []
    target.write_bytes(b"edited!!!!")
    assert FileHashes(ledger).sha_of(target) == sha(b"edited!!!!") and reads == [target]


def test_the_ledger_keeps_other_stages_records_and_drops_gone_or_changed_files(tmp_path):
    ledger = tmp_path / part_memo.LEDGER
    files = {name: tmp_path / name for name in ("a", "b", "c")}
    for path in files.values():
        path.write_bytes(path.name.encode())
        age(path)
    first, second = FileHashes(ledger), FileHashes(ledger)  # two stages, one after the other
    first.sha_of(files["a"])
    first.sha_of(files["b"])
    first.save()
    second.sha_of(files["c"])
    files["b"].unlink()
    second.save()
    kept = json.loads(ledger.read_text())
    assert sorted(Path(name).name for name in kept) == ["a", "c"]
    files["a"].write_bytes(b"changed")
    FileHashes(ledger).save()
    assert sorted(Path(name).name for name in json.loads(ledger.read_text())) == ["c"]


def code_tree(root: Path) -> None:
    (root / "stages").mkdir(parents=True)
    (root / "rmpipe").mkdir()
    (root / "rmpipe" / "__init__.py").write_text('"""marker"""\n')
    (root / "stages" / "__init__.py").write_text('"""marker"""\n')
    (root / "stages" / "s.py").write_text("from rmpipe import helper\n")  # helper: no module yet
    (root / "rmpipe" / "tool.py").write_text("X = 1\n")
    for path in [*root.rglob("*"), root]:
        age(path)


def test_the_code_hash_is_remembered_and_walked_again_when_any_file_or_package_folder_changes(tmp_path, monkeypatch):
    code = tmp_path / "code"
    code_tree(code)
    memo = tmp_path / "memo" / "split"
    walks = []
    real_hash = codedeps.code_hash
    monkeypatch.setattr(codedeps, "code_hash", lambda *a: walks.append(a) or real_hash(*a))

    first = stage_code("stages/s.py", memo, code)
    assert first == real_hash("stages/s.py", code) and len(walks) == 1
    assert stage_code("stages/s.py", memo, code) == first and len(walks) == 1  # remembered: not walked again

    # a module added to a package folder joins the closure with no walked file edited
    (code / "rmpipe" / "helper.py").write_text("Y = 2\n")
    added = stage_code("stages/s.py", memo, code)
    assert added == real_hash("stages/s.py", code) != first and len(walks) == 2

    # an edit of a closure file (the racy window: a record taken now is not trusted, so it is walked again)
    (code / "rmpipe" / "helper.py").write_text("Y = 3\n")
    edited = stage_code("stages/s.py", memo, code)
    assert edited == real_hash("stages/s.py", code) not in (first, added)
    assert stage_code("stages/s.py", memo, code) == edited and len(walks) == 4



def test_a_stage_hashes_its_racy_records_again_when_they_are_old_enough_and_only_then(tmp_path, reads, monkeypatch):
    """What a stage wrote was hashed right after the write (racy). At its end, `save` hashes again what is old
    enough by then, once per inode (a memo file and its hard link in the output), so the next run trusts it;
    what is still too young is left for the next run to read."""
    ledger = tmp_path / part_memo.LEDGER
    memo_file, young = tmp_path / "memo.parquet", tmp_path / "young.parquet"
    memo_file.write_bytes(b"part bytes")
    linked = tmp_path / "out" / "part.parquet"
    linked.parent.mkdir()
    os.link(memo_file, linked)
    hashes = FileHashes(ledger)
    hashes.record(memo_file, sha(b"part bytes"))  # just written: racy
    hashes.record(linked, sha(b"part bytes"))
    later = time.time_ns() + 60 * 10**9  # the stage ran on for a minute
    monkeypatch.setattr(part_memo, "time", SimpleNamespace(time_ns=lambda: later))
    young.write_bytes(b"just written")
    os.utime(young, ns=(later, later))
    hashes.record(young, sha(b"just written"))
    hashes.save()
    assert reads in ([memo_file], [linked])  # one inode, hashed once
    again = FileHashes(ledger)
    assert again.sha_of(linked) == again.sha_of(memo_file) == sha(b"part bytes") and len(reads) == 1
    assert again.sha_of(young) == sha(b"just written") and reads[-1] == young


def test_a_damaged_code_hash_record_is_walked_again_not_a_traceback(tmp_path):
    code = tmp_path / "code"
    code_tree(code)
    memo = tmp_path / "memo" / "split"
    real = stage_code("stages/s.py", memo, code)
    store = tmp_path / "memo" / part_memo.CODE_HASHES
    records = json.loads(store.read_text())
    for record in records.values():
        del record["hash"]  # a hand-edited or cut record: still "trusted", its signature still matching
    store.write_text(json.dumps(records))
    assert stage_code("stages/s.py", memo, code) == real
    store.write_text("{not json")
    assert stage_code("stages/s.py", memo, code) == real
