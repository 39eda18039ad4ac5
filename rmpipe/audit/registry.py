"""The model registry: versions and stages of `reward-model` as GTO annotated git tags.

    reward-model@v0.0.3        a version: the commit holding that run's dvc.lock, params and metrics
    reward-model#prod#4        the 4th assignment of the prod stage (to the version the tag points at)
    reward-model@v0.0.2!       a deregistered (deprecated) version: never in a stage again

The artifact is declared in dvc.yaml (`artifacts: reward-model: {type: model, path: models/export}`),
so `gto show`, `gto history`, `dvc artifacts get . reward-model --stage prod` and DVC Studio read it.

Where a version's commit comes from: `snapshot` commits the work tree as it is after the rebuild
(what `git add -A` would stage, .gitignore honoured) onto the branch `rmpipe/models` with
`git commit-tree` through a temporary index. HEAD, the user's branch, index and files are never
touched, so the service (no person at the keyboard) can make versions while someone works in
the same checkout. Its parents: the commit checked out (HEAD) and the branch's previous tip.

Every tag message is one summary line, a blank line and a JSON object (`MESSAGE_FORMAT`): the
metrics, the gate's decision with its statistics, the manifest digest, the batches and the trigger.
Without git, every function that needs it raises `RegistryUnavailable` with a one-line reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

from rmpipe.core.errors import UserError

ARTIFACT = "reward-model"
PROD = "prod"
BRANCH = "rmpipe/models"
MESSAGE_FORMAT = "rmpipe-version/1"
FALLBACK_AUTHOR = ("rmpipe", "rmpipe@localhost")  # when git has no user.name / user.email (the service)


class RegistryUnavailable(UserError):
    """No git repository (or no commit yet): GTO keeps versions and stages as git tags."""


def _git(root: Path, *args: str, env: dict | None = None, check: bool = True) -> str:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise RegistryUnavailable(f"git {args[0]} failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
    return proc.stdout


def unavailable_reason(root: Path) -> str | None:
    """None when the registry can be used at `root`, else why not (one line)."""
    root = Path(root)
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"registry unavailable: git cannot run here ({exc})"
    if top.returncode != 0:
        return "registry unavailable: not a git repository (GTO keeps model versions as git tags); run `git init`"
    if Path(top.stdout.strip()).resolve() != root.resolve():
        return f"registry unavailable: the project is not the top of its git repository ({top.stdout.strip()})"
    if subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=root, capture_output=True).returncode:
        return "registry unavailable: the git repository has no commit yet; commit the project first"
    return None


def require(root: Path) -> None:
    reason = unavailable_reason(root)
    if reason is not None:
        raise RegistryUnavailable(reason)


@contextlib.contextmanager
def _identity(root: Path) -> Iterator[None]:
    """Git needs an author for commits and annotated tags; the service may run where none is configured."""
    missing = {}
    for key, env_name, env_mail in (("user.name", "GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"),
                                    ("user.email", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL")):
        if not _git(root, "config", key, check=False).strip():
            value = FALLBACK_AUTHOR[0 if key == "user.name" else 1]
            missing.update({env_name: value, env_mail: value})
    saved = {k: os.environ.get(k) for k in missing}
    os.environ.update({k: v for k, v in missing.items() if k not in os.environ})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)


# --- the commit a version points at ---------------------------------------------------------------
def snapshot(root: Path, message: str) -> str:
    """Commit the work tree onto `rmpipe/models` without touching HEAD, the index or any file; its sha."""
    require(root)
    head = _git(root, "rev-parse", "HEAD").strip()
    tip = _git(root, "rev-parse", "--verify", "-q", f"refs/heads/{BRANCH}", check=False).strip()
    with tempfile.TemporaryDirectory(prefix="rmpipe-index-") as tmp, _identity(root):
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        _git(root, "read-tree", "HEAD", env=env)
        _git(root, "add", "-A", "--", ".", env=env)
        tree = _git(root, "write-tree", env=env).strip()
        parents = ["-p", head] + (["-p", tip] if tip and tip != head else [])
        commit = _git(root, "commit-tree", tree, *parents, "-m", message).strip()
    _git(root, "update-ref", "-m", "rmpipe: model version", f"refs/heads/{BRANCH}", commit, *([tip] if tip else []))
    return commit


# --- versions ---------------------------------------------------------------------------------------
def tag_message(summary: str, body: dict[str, Any]) -> str:
    return f"{summary}\n\n{json.dumps({'format': MESSAGE_FORMAT, **body}, sort_keys=True, default=str)}"


def parse_message(message: str | None) -> dict[str, Any]:
    """The JSON body of a tag message written by `tag_message` ({} for any other message)."""
    _, _, body = (message or "").partition("\n\n")
    try:
        data = json.loads(body.strip())
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) and data.get("format") == MESSAGE_FORMAT else {}


def versions(root: Path) -> list[dict[str, Any]]:
    """Every version of the artifact, registered or deregistered, oldest first:
    {version, tag, commit, created_at, body (the message's JSON), stages (active now), deprecated}."""
    require(root)
    from gto.api import show

    active = {v["version"]: v for v in show(str(root), ARTIFACT, deprecated=False)} if _has_tags(root) else {}
    every = show(str(root), ARTIFACT, deprecated=True) if active or _has_tags(root) else []
    out = []
    for v in every:
        registration = (v.get("registrations") or [{}])[0]
        live = active.get(v["version"])
        out.append({"version": v["version"], "tag": registration.get("tag") or v.get("ref"),
                    "commit": v.get("commit_hexsha"), "created_at": str(registration.get("created_at") or ""),
                    "body": parse_message(registration.get("message")),
                    "stages": sorted(s["stage"] for s in (live or {}).get("stages") or []),
                    "deprecated": live is None})
    return sorted(out, key=lambda v: _semver(v["version"]))


def _semver(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in version.lstrip("v").split("."))
    except ValueError:
        return (0,)


def _has_tags(root: Path) -> bool:
    return bool(_git(root, "tag", "-l", f"{ARTIFACT}@*", check=False).strip())


def in_stage(root: Path, stage: str = PROD) -> dict[str, Any] | None:
    """The version now in `stage` (GTO: the latest assignment of a version still registered), or None."""
    found = [v for v in versions(root) if stage in v["stages"]]
    return found[-1] if found else None


def by_digest(root: Path, manifest_sha256: str) -> dict[str, Any] | None:
    """The version whose tag records this export's manifest digest."""
    return next((v for v in versions(root) if v["body"].get("manifest_sha256") == manifest_sha256), None)


def register(root: Path, body: dict[str, Any], promote: bool) -> dict[str, Any]:
    """Snapshot the work tree, tag the next version with `body`, and assign prod when `promote`."""
    from gto.api import assign, register as gto_register

    require(root)
    decision = "promoted to prod" if promote else "not promoted"
    summary = f"{ARTIFACT}: model {str(body.get('manifest_sha256'))[:12]} ({decision}; {body.get('trigger')})"
    commit = snapshot(root, summary)
    with _identity(root):
        version = _next_version(root)
        _after_last_tag(root)
        gto_register(str(root), ARTIFACT, commit, version=version, message=tag_message(summary, body))
        if promote:
            _after_last_tag(root)
            reason = (body.get("gate") or {}).get("reason")
            assign(str(root), ARTIFACT, PROD, version=version,
                   message=tag_message(f"{ARTIFACT} {version} -> {PROD}: {reason}", {"gate": body.get("gate")}))
    return {"version": version, "tag": f"{ARTIFACT}@{version}", "commit": commit,
            "stage": PROD if promote else None}


def _after_last_tag(root: Path) -> None:
    """Wait, if needed, until the clock is past the second of the newest registry tag: GTO orders events by their
    tags' timestamps (whole seconds), so two assignments in one second would leave prod ambiguous."""
    import time

    newest = _git(root, "for-each-ref", "--sort=-creatordate", "--count=1", "--format=%(creatordate:unix)",
                  f"refs/tags/{ARTIFACT}*", check=False).strip()
    if newest.isdigit() and time.time() < int(newest) + 1:
        time.sleep(int(newest) + 1 - time.time() + 0.01)


def _next_version(root: Path) -> str:
    """The patch after the highest version ever tagged, deprecated ones included (GTO's own bump skips
    deregistered versions, and would then try to re-create an existing tag)."""
    tags = _git(root, "tag", "-l", f"{ARTIFACT}@v*", check=False).split()
    known = [_semver(t.split("@", 1)[1].rstrip("!")) for t in tags]
    major, minor, patch = max([k for k in known if len(k) == 3], default=(0, 0, 0))
    return f"v{major}.{minor}.{patch + 1}"


def deprecate(root: Path, version: str, reason: str) -> str:
    """Deregister `version` (`gto deprecate reward-model vX`): it leaves every stage; returns the tag."""
    from gto.api import deregister

    require(root)
    with _identity(root):
        _after_last_tag(root)
        deregister(str(root), ARTIFACT, version=version, message=f"{ARTIFACT} {version} deprecated: {reason}")
    return tag_of_deprecated(version)


def tag_of_deprecated(version: str) -> str:
    return f"{ARTIFACT}@{version}!"


def restore_export(root: Path, version: dict[str, Any], export_dir: Path) -> "contextlib.AbstractContextManager[Path] | None":
    """A temporary folder holding `version`'s export, rebuilt from the DVC cache by the md5 its commit's dvc.lock
    records for `export_dir`; None when that commit or those cache objects are gone."""
    import shutil

    import yaml

    from rmpipe.audit import dvc_cache

    lock_text = _git(root, "show", f"{version['commit']}:dvc.lock", check=False)
    lock = yaml.safe_load(lock_text) if lock_text else None
    outs = [o for st in ((lock or {}).get("stages") or {}).values() for o in st.get("outs") or []]
    md5 = next((o.get("md5") for o in outs if Path(o.get("path", "")) == Path(export_dir)), None)
    listing = dvc_cache.dir_listing(root, md5) if md5 else {}
    if not listing or any(dvc_cache.file_in_output(root, m) is None for m in listing.values()):
        return None

    @contextlib.contextmanager
    def folder() -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="rmpipe-prod-") as tmp:
            for rel, file_md5 in listing.items():
                (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(dvc_cache.object_path(root, file_md5), Path(tmp) / rel)
            yield Path(tmp)

    return folder()


def register_export(root: Path, export_dir: Path, trigger: str) -> dict[str, Any]:
    """Register the export in `export_dir` as a version (prod when its gate promoted it), once.

    Returns {"version", "tag", "commit", "stage", "new"} or {"note": why nothing was registered}.
    """
    from rmpipe.audit.lineage import MANIFEST_FILE, dvc_md5, manifest_sha256, read_manifest

    root = Path(root)
    reason = unavailable_reason(root)
    if reason is not None:
        return {"note": reason}
    if not (root / export_dir / MANIFEST_FILE).exists():
        return {"note": f"no export in {export_dir}: nothing to register"}
    manifest = read_manifest(root / export_dir)
    evaluation, gate = manifest.get("evaluation") or {}, manifest.get("promotion") or {}
    if not evaluation.get("passed"):
        return {"note": f"not registered: the model failed its evaluation ({gate.get('reason')})"}
    digest = manifest_sha256(root / export_dir)
    known = by_digest(root, digest)
    if known is not None:
        return {**{k: known[k] for k in ("version", "tag", "commit")}, "stage": ",".join(known["stages"]) or None,
                "new": False}
    body = {"manifest_sha256": digest, "export_md5": dvc_md5(root / export_dir), "trigger": trigger,
            "created_at": manifest.get("created_at"), "metrics": evaluation, "gate": gate,
            "batches": sorted({b for ids in (manifest.get("batch_ids") or {}).values() for b in ids})}
    return {**register(root, body, bool(gate.get("promoted"))), "new": True}
