"""Commit what rmpipe itself wrote into the work tree (the retraction register, the params a retraction
edited) before it rebuilds, so the model built next names a commit that holds them: no model is "dirty"
by rmpipe's own hand, and a `git checkout -- .` cannot undo a retraction.

Only rmpipe's own changes are committed (`git commit --only -- <paths>`: whatever else the user has staged
stays staged and out of it); a file the user had already changed is left alone. Without git, or when git
refuses (a merge in progress, a hook), nothing is committed and the reason is logged: the lineage still
pins the register by its md5 (collect's dep in dvc.lock).
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

log = logging.getLogger("rmpipe.retract")

IDENT = {"GIT_AUTHOR_NAME": "rmpipe", "GIT_AUTHOR_EMAIL": "rmpipe@localhost",
         "GIT_COMMITTER_NAME": "rmpipe", "GIT_COMMITTER_EMAIL": "rmpipe@localhost"}


def _git(root: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def in_git(root: Path) -> bool:
    try:
        return _git(root, "rev-parse", "--is-inside-work-tree").stdout.strip() == "true"
    except (OSError, subprocess.SubprocessError):
        return False


def unchanged(root: Path, path: str | Path) -> bool:
    """Is `path` as committed (or absent from both)? False without git."""
    return in_git(root) and _git(root, "status", "--porcelain", "--", str(path)).stdout.strip() == ""


def commit_own(root: Path, paths: list[str | Path], message: str) -> str | None:
    """Commit exactly `paths` (the ones that changed) with `message`; the new commit, or None (logged why)."""
    root = Path(root)
    if not in_git(root):
        return None
    changed = [str(p) for p in paths if not unchanged(root, p)]
    if not changed:
        return None
    env = {} if _git(root, "var", "GIT_COMMITTER_IDENT").returncode == 0 else IDENT
    steps = [("add", "--", *changed),
             ("commit", "--quiet", "--no-verify", "--no-gpg-sign", "-m", message, "--only", "--", *changed)]
    for args in steps:
        proc = _git(root, *args, env=env)
        if proc.returncode != 0:
            why = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["no reason given"]
            log.warning("could not commit %s (git %s: %s); commit it yourself, with the run's record",
                        ", ".join(changed), args[0], why[0])
            return None
    commit = _git(root, "rev-parse", "HEAD").stdout.strip()
    log.info("committed %s as %s: %s", ", ".join(changed), commit[:12], message)
    return commit
