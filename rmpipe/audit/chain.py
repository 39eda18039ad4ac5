"""Where the audit history lives: an append-only hash chain that no checkout, stash or experiment rewrites.

Every record is a JSON object sealed when it is appended:

    seq     1, 2, 3, ... (unique: the position in the chain)
    prev    sha256 of the previous record's canonical JSON (None for the first)
    sha256  sha256 of this record's canonical JSON without this field

so an edited, removed or reordered record breaks the chain at that record (`verify`).

In a git repository the chain is the ref `refs/rmpipe/audit`: each record is one commit whose tree
holds `record.json` and whose parent is the previous record's commit, written with plumbing
(`hash-object`, `mktree`, `commit-tree`) and published with `git update-ref REF NEW OLD`, a
compare-and-swap: a writer that lost the race to another reads the new tip and tries again, so
records are never lost or interleaved. Branch switches, `git checkout -- .`, `git stash`,
`dvc checkout` and `dvc exp run/apply` touch the work tree, HEAD and refs/exps, never this ref;
the team shares it with `git push origin refs/rmpipe/audit` (see `share`).

Without git (a plain copy) the chain is `.rmpipe/history.jsonl` (rmpipe's own state, no tracked
file), appended under a file lock with a timeout; the records and `verify` are the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from rmpipe.core.errors import DataError

REF = "refs/rmpipe/audit"
FILE = Path(".rmpipe/history.jsonl")
RECORD_FILE = "record.json"
ATTEMPTS = 200  # compare-and-swap retries: each lost race means another record went in first
LOCK_TIMEOUT_S = 120.0
IDENT = {"GIT_AUTHOR_NAME": "rmpipe", "GIT_AUTHOR_EMAIL": "rmpipe@localhost",
         "GIT_COMMITTER_NAME": "rmpipe", "GIT_COMMITTER_EMAIL": "rmpipe@localhost"}


def canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8")


def digest(record: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(record)).hexdigest()


def seal(payload: dict[str, Any], last: dict[str, Any] | None) -> dict[str, Any]:
    """The record that follows `last`: numbered, chained to it, and carrying its own digest."""
    record = {**payload, "seq": (last["seq"] + 1) if last else 1, "prev": digest(last) if last else None}
    record.pop("sha256", None)
    record["sha256"] = digest(record)
    return record


def first_break(records: list[Any]) -> str | None:
    """The first record that was altered, removed or reordered, in one line; None when the chain is intact."""
    seqs = [r.get("seq") if isinstance(r, dict) else None for r in records]
    for i, record in enumerate(records, 1):
        if not isinstance(record, dict):
            return f"record #{i} was altered: it is not a JSON object"
        seq = record.get("seq")
        if seq != i:
            if isinstance(seq, int) and seq > i and i not in seqs:
                return f"record #{i} was removed: #{seq} follows #{i - 1}" if i > 1 else "record #1 was removed"
            return f"record #{seq} is out of order: found where #{i} belongs (records reordered)"
        body = {k: v for k, v in record.items() if k != "sha256"}
        if record.get("sha256") != digest(body):
            return f"record #{i} was altered: its content no longer matches its sha256"
        if record.get("prev") != (digest(records[i - 2]) if i > 1 else None):
            return f"record #{i - 1} was altered: it is not the record #{i} was chained to"
    return None


def history_root(root: Path) -> Path:
    """The project whose history this is: a `dvc exp run --temp/--queue` workspace (`.dvc/tmp/exps/<x>`)
    records into the project it was started from."""
    parts = Path(root).resolve().parts
    for i in range(len(parts) - 3):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return Path(root).resolve()


# --- in git: refs/rmpipe/audit ------------------------------------------------------------------
class GitChain:
    """The chain as commits under `REF` (see the module doc)."""

    def __init__(self, root: Path):
        self.root = root
        self.where = f"git ref {REF}"

    def _git(self, *args: str, stdin: str | None = None, check: bool = True,
             env: dict | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(["git", *args], cwd=self.root, input=stdin, capture_output=True, text=True,
                              timeout=60, env={**os.environ, **(env or {})})
        if check and proc.returncode != 0:
            raise DataError(f"git {args[0]} failed in {self.root}: {proc.stderr.strip().splitlines()[-1:]}")
        return proc

    def tip(self) -> str | None:
        proc = self._git("rev-parse", "-q", "--verify", f"{REF}^{{commit}}", check=False)
        return proc.stdout.strip() or None

    def adopt_fetched(self) -> None:
        """Fast-forward our chain to a fetched copy (`share`) that extends it: a fresh clone continues the
        team's chain instead of starting its own. A copy that diverged is left for `verify` to name."""
        fetched = self._git("for-each-ref", "--format=%(objectname)", "refs/rmpipe/remotes/", check=False).stdout.split()
        for theirs in fetched:
            ours = self.tip()
            if theirs == ours:
                continue
            if ours is None or self._git("merge-base", "--is-ancestor", ours, theirs, check=False).returncode == 0:
                self._git("update-ref", "--create-reflog", "-m", "rmpipe history: fast-forward to the fetched chain",
                          REF, theirs, ours or "", check=False)

    def commits(self) -> list[tuple[str, list[str]]]:
        """(commit, parents), oldest first."""
        if self.tip() is None:
            return []
        out = self._git("rev-list", "--reverse", "--topo-order", "--parents", REF).stdout.split("\n")
        return [(line.split()[0], line.split()[1:]) for line in out if line.strip()]

    def records(self) -> list[Any]:
        """Every record, oldest first; a record that is not JSON comes back as its text."""
        commits = self.commits()
        if not commits:
            return []
        proc = subprocess.run(["git", "cat-file", "--batch"], cwd=self.root, capture_output=True, timeout=60, check=True,
                              input="".join(f"{c}:{RECORD_FILE}\n" for c, _ in commits).encode())
        return _parse_batch(proc.stdout)

    def last(self, tip: str) -> dict[str, Any]:
        return json.loads(self._git("cat-file", "blob", f"{tip}:{RECORD_FILE}").stdout)

    def structure_break(self) -> str | None:
        ours = self.tip()
        for line in self._git("for-each-ref", "--format=%(objectname) %(refname)", "refs/rmpipe/remotes/",
                              check=False).stdout.splitlines():
            theirs, name = line.split(" ", 1)
            if ours is None or self._git("merge-base", "--is-ancestor", theirs, ours, check=False).returncode != 0:
                if self._git("merge-base", "--is-ancestor", ours or theirs, theirs, check=False).returncode != 0:
                    return (f"the chain and the team's copy {name} disagree (neither extends the other): records "
                            "were rewritten on one side, or appended in two clones")
        for i, (commit, parents) in enumerate(self.commits(), 1):
            if len(parents) > 1:
                return f"record #{i} (commit {commit[:12]}) has {len(parents)} parents: the chain was merged, not appended"
        return None

    def append(self, make: Callable[[dict | None], dict]) -> dict[str, Any]:
        env = {} if self._git("var", "GIT_COMMITTER_IDENT", check=False).returncode == 0 else IDENT
        self.adopt_fetched()
        for attempt in range(ATTEMPTS):
            old = self.tip()
            record = make(self.last(old) if old else None)
            blob = self._git("hash-object", "-w", "--stdin", stdin=canonical(record).decode("utf-8") + "\n").stdout.strip()
            tree = self._git("mktree", stdin=f"100644 blob {blob}\t{RECORD_FILE}\n").stdout.strip()
            message = f"rmpipe history #{record['seq']}: {record.get('kind')}\n"
            new = self._git("commit-tree", "--no-gpg-sign", tree, *(("-p", old) if old else ()), "-m", message,
                            env=env).stdout.strip()
            swapped = self._git("update-ref", "--create-reflog", "-m", message.strip(), REF, new, old or "",
                                check=False)
            if swapped.returncode == 0:
                return record
            time.sleep(random.uniform(0.005, 0.02) * min(attempt + 1, 10))  # another writer went first
        raise DataError(f"could not append to {REF} after {ATTEMPTS} tries: other writers kept going first")


def _parse_batch(data: bytes) -> list[Any]:
    """`git cat-file --batch` output -> one parsed record per object (text where it is not JSON)."""
    records: list[Any] = []
    pos = 0
    while pos < len(data):
        end = data.index(b"\n", pos)
        header = data[pos:end].decode().split()
        pos = end + 1
        if len(header) < 3 or header[-1] == "missing":
            records.append(f"missing {RECORD_FILE}")
            continue
        size = int(header[2])
        text = data[pos:pos + size].decode("utf-8", "replace")
        pos += size + 1
        try:
            records.append(json.loads(text))
        except json.JSONDecodeError:
            records.append(text)
    return records


# --- without git: .rmpipe/history.jsonl ---------------------------------------------------------
class FileChain:
    """The chain as JSON lines in rmpipe's state folder, appended under a lock with a timeout."""

    def __init__(self, root: Path):
        self.root = root
        self.path = root / FILE
        self.where = str(FILE)

    def records(self) -> list[Any]:
        if not self.path.exists():
            return []
        out: list[Any] = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    out.append(line)
        return out

    def structure_break(self) -> str | None:
        return None

    def append(self, make: Callable[[dict | None], dict]) -> dict[str, Any]:
        import filelock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(self.path) + ".lock", timeout=LOCK_TIMEOUT_S)
        try:
            with lock:
                rows = [r for r in self.records() if isinstance(r, dict)]
                record = make(rows[-1] if rows else None)
                with self.path.open("ab") as fh:
                    fh.write(canonical(record) + b"\n")
                    fh.flush()
                    os.fsync(fh.fileno())
        except filelock.Timeout:
            raise DataError(f"{self.path} stayed locked for {LOCK_TIMEOUT_S:.0f} s (another rmpipe is writing "
                            f"history); if none runs, delete {self.path}.lock") from None
        return record


def open_chain(root: Path) -> GitChain | FileChain:
    """The project's chain: in git when the project is in a git work tree, else the file."""
    root = history_root(root)
    try:
        inside = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=root, capture_output=True,
                                text=True, timeout=30).stdout.strip() == "true"
    except (OSError, subprocess.SubprocessError):
        inside = False
    return GitChain(root) if inside else FileChain(root)


def verify(chain: GitChain | FileChain) -> tuple[int, str | None]:
    """(number of records, the first break in one line or None)."""
    records = chain.records()
    return len(records), chain.structure_break() or first_break(records)


def share(root: Path, remote: str = "origin") -> list[str]:
    """Have `git fetch REMOTE` bring the team's chain to refs/rmpipe/remotes/REMOTE/audit; returns the
    command that publishes ours (a push of the ref; a non-fast-forward push, i.e. a rewrite, is refused)."""
    chain = open_chain(root)
    if not isinstance(chain, GitChain):
        raise DataError("no git here: the history is the file .rmpipe/history.jsonl; copy it with the project")
    spec = f"{REF}:refs/rmpipe/remotes/{remote}/audit"
    known = chain._git("config", "--get-all", f"remote.{remote}.fetch", check=False).stdout.split()
    if chain._git("remote", check=False).stdout.split().count(remote) == 0:
        raise DataError(f"no git remote {remote!r} here: add one (git remote add {remote} URL) first")
    if spec not in known:
        chain._git("config", "--add", f"remote.{remote}.fetch", spec)
    return [f"git push {remote} {REF}", f"git fetch {remote}"]
