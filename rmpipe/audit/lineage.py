"""The lineage manifest of an export: which inputs, params, data batches, code and packages made it.

`lineage.json` sits inside the export folder. It records the DVC hash of every upstream
input (from dvc.lock), every param, the batch ids that fed the splits, the git commit and
dirty flag (None when DVC runs without git), package versions, timestamps, and a sha256
of every other file in the export, so `verify` can re-hash both sides later.

Environment variables are never read into the manifest: they are where secrets live.
"""

from __future__ import annotations

import json
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from rmpipe.core.errors import DataError
from rmpipe.core.io import folder_hashes, sha256_file
from rmpipe.data.retractions import REGISTER

# What rmpipe itself writes into the work tree during a run: never what makes a model "dirty".
OWN_RECORDS = (REGISTER.as_posix(),)

MANIFEST_FILE = "lineage.json"
PROMOTION_FILE = "promotion.json"  # added beside a promoted copy after the export was sealed
UNHASHED = (MANIFEST_FILE, PROMOTION_FILE)
PACKAGES = ("rmpipe", "torch", "transformers", "tokenizers", "safetensors", "deepspeed", "dvc", "prefect",
            "pandas", "pyarrow", "numpy", "great-expectations", "crowd-kit")


# --- what went in -----------------------------------------------------------------------------
def uncached_outs(project_root: Path) -> set[str]:
    """Outputs dvc.yaml declares with `cache: false`: `dvc checkout` cannot restore them."""
    spec_file = Path(project_root) / "dvc.yaml"
    spec = yaml.safe_load(spec_file.read_text(encoding="utf-8")) if spec_file.exists() else None
    found = set()
    for stage in ((spec or {}).get("stages") or {}).values():
        for key in ("outs", "metrics", "plots"):
            for out in stage.get(key) or []:
                if isinstance(out, dict) and any((opts or {}).get("cache") is False for opts in out.values()):
                    found.add(str(next(iter(out))))
    return found


def dvc_lock_inputs(project_root: Path, exclude: tuple[str, ...] = (), evidence: bool = False
                    ) -> dict[str, dict[str, Any]]:
    """{path: {md5, size, stage}} for every dep and out recorded in dvc.lock, except stages in `exclude`.

    Inputs are what `dvc checkout` (cached outputs) or git (source deps) restores. An output with
    `cache: false` (checkpoints, metrics, data docs) is not an input: nothing restores it after an
    experiment, so `verify` would fail for no fault of the model. With `evidence=True` those are
    returned instead: recorded in the manifest as what the run saw, never checked as inputs.
    """
    lock_file = Path(project_root) / "dvc.lock"
    if not lock_file.exists():
        return {}
    lock = yaml.safe_load(lock_file.read_text(encoding="utf-8")) or {}
    uncached = uncached_outs(project_root)
    inputs: dict[str, dict[str, Any]] = {}
    for stage, entry in (lock.get("stages") or {}).items():
        if stage in exclude:
            continue
        for item in (entry.get("deps") or []) + (entry.get("outs") or []):
            if "md5" in item and (item["path"] in uncached) == evidence:
                inputs.setdefault(item["path"], {"md5": item["md5"], "size": item.get("size"), "stage": stage})
    return dict(sorted(inputs.items()))


def pipeline_files(project_root: Path) -> tuple[list[str], list[str]]:
    """(inputs, products) named by dvc.yaml: every stage dep, and every out/metric/plot plus dvc.lock."""
    spec_file = Path(project_root) / "dvc.yaml"
    spec = yaml.safe_load(spec_file.read_text(encoding="utf-8")) if spec_file.exists() else None
    inputs, products = ["dvc.yaml", "params.yaml"], ["dvc.lock"]
    for stage in ((spec or {}).get("stages") or {}).values():
        inputs += [str(d) for d in stage.get("deps") or []]
        for key in ("outs", "metrics", "plots"):
            products += [str(next(iter(o))) if isinstance(o, dict) else str(o) for o in stage.get(key) or []]
    return inputs, products


def _under(path: str, folders: list[str]) -> bool:
    return any(path == f.rstrip("/") or path.startswith(f.rstrip("/") + "/") for f in folders)

def dvc_lock_stages(project_root: Path, exclude: tuple[str, ...] = ()) -> dict[str, dict[str, dict[str, str]]]:
    """{stage: {"deps": {path: md5}, "outs": {path: md5}}} from dvc.lock, except stages in `exclude`."""
    lock_file = Path(project_root) / "dvc.lock"
    if not lock_file.exists():
        return {}
    lock = yaml.safe_load(lock_file.read_text(encoding="utf-8")) or {}
    return {stage: {kind: {item["path"]: item["md5"] for item in entry.get(kind) or [] if "md5" in item}
                    for kind in ("deps", "outs")}
            for stage, entry in sorted((lock.get("stages") or {}).items()) if stage not in exclude}


def chain_conflicts(stages: dict[str, dict[str, dict[str, str]]]) -> list[str]:
    """Paths recorded with different hashes by different stages (one stage's output is another's input).

    In one honest run every stage read what the stage before it wrote. A disagreement means
    stages of two runs interleaved (e.g. a manual `dvc repro` beside the service): the
    lineage would name inputs the model was not made from.
    """
    seen: dict[str, dict[str, list[str]]] = {}
    for stage, kinds in stages.items():
        for kind, paths in kinds.items():
            for path, md5 in paths.items():
                seen.setdefault(path, {}).setdefault(md5, []).append(f"{stage} {kind}")
    return [f"lineage inconsistent: {path} is recorded as "
            + " but ".join(f"{md5} ({', '.join(where)})" for md5, where in by_md5.items())
            + ": stages of two different runs were recorded together; run `dvc repro` again"
            for path, by_md5 in sorted(seen.items()) if len(by_md5) > 1]


def git_state(project_root: Path) -> dict[str, Any] | None:
    """{commit, dirty, changed, dvc_lock} when the project is a git work tree, else None (DVC may run with core.no_scm).

    `dirty`: the work tree holds what made this model beyond `commit`: a change to a tracked file, or an
    untracked input (a stage dep such as new code, params.yaml, dvc.yaml, any .py file). The pipeline's
    own products (dvc.lock and the outputs dvc.yaml declares) are being rewritten by this very run, so
    they do not count, nor do rmpipe's own records (`OWN_RECORDS`: the retraction register, which `rmpipe
    retract` writes and commits before it rebuilds; its digest is in dvc.lock as collect's dep, so the
    lineage pins it either way; listed in `own_changed` when not committed). `dvc_lock` says separately whether dvc.lock is in git yet ("committed" unchanged,
    "modified", "untracked": commit it after the run, it is the lineage; or "missing").
    """
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=project_root, capture_output=True, text=True, check=True, timeout=30).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        status = git("status", "--porcelain=v1", "-z", "--untracked-files=all").split("\0")
    except (OSError, subprocess.SubprocessError):
        return None
    inputs, products = pipeline_files(project_root)
    changed, own, dvc_lock = [], [], "committed" if (Path(project_root) / "dvc.lock").exists() else "missing"
    entries = iter(status)
    for entry in entries:
        if len(entry) < 4:
            continue
        code, path = entry[:2], entry[3:]
        if code[0] in "RC":
            next(entries, None)  # a rename's second field is the old path
        if path == "dvc.lock":
            dvc_lock = "untracked" if code == "??" else "modified"
        if _under(path, products):
            continue
        if path in OWN_RECORDS:
            own.append(path)
            continue
        if code != "??" or path.endswith(".py") or _under(path, inputs):
            changed.append(path)
    return {"commit": commit, "dirty": bool(changed), "changed": sorted(changed)[:20], "dvc_lock": dvc_lock,
            **({"own_changed": own} if own else {})}


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def build_manifest(
    export_dir: Path,
    project_root: Path,
    params: dict[str, Any],
    batch_ids: dict[str, list[str]],
    exclude_stages: tuple[str, ...],
    extra: dict[str, Any],
    read_paths: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The manifest for a fully written export folder (its files are hashed here, so call it last).

    Refuses (DataError) a lineage that disagrees with itself (`chain_conflicts`) or with what the
    export read: each of `read_paths` (e.g. data/split, where the batch ids come from) must hash
    to what dvc.lock records for it.
    """
    stages = dvc_lock_stages(project_root, exclude_stages)
    inputs = dvc_lock_inputs(project_root, exclude_stages)
    evidence = dvc_lock_inputs(project_root, exclude_stages, evidence=True)
    problems = chain_conflicts(stages)
    for rel in read_paths:
        if rel in inputs and (current := dvc_md5(Path(project_root) / rel)) != inputs[rel]["md5"]:
            problems.append(f"lineage inconsistent: this export read {rel} with md5 {current}, but dvc.lock records "
                            f"{inputs[rel]['md5']}: another run changed it; run `dvc repro` again")
    if problems:
        raise DataError("; ".join(problems))
    return {
        "format": "rmpipe-lineage/2",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": inputs,
        "evidence": evidence,  # `cache: false` outputs as this run saw them: not restorable, so not inputs
        "stages": stages,
        "params": params,
        "batch_ids": batch_ids,
        "git": git_state(project_root),
        "packages": package_versions(),
        **extra,
        "files": folder_hashes(export_dir, UNHASHED),
    }


def read_manifest(export_dir: Path) -> dict[str, Any]:
    path = Path(export_dir) / MANIFEST_FILE
    if not path.exists():
        raise DataError(f"{path} not found: {export_dir} is not an rmpipe export (or it is incomplete)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc.msg}): the manifest is damaged") from None


def manifest_sha256(export_dir: Path) -> str:
    return sha256_file(Path(export_dir) / MANIFEST_FILE)


# --- checking it later ------------------------------------------------------------------------
def verify_export(export_dir: Path, project_root: Path | None = None) -> list[str]:
    """Every mismatch, one line each: export files vs their recorded sha256, recorded stages that disagree
    with each other (`chain_conflicts`), then inputs vs dvc.lock md5s."""
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    problems = []
    recorded, present = manifest.get("files", {}), folder_hashes(export_dir, UNHASHED)
    for name in sorted(set(recorded) | set(present)):
        if name not in present:
            problems.append(f"export file missing: {name}")
        elif name not in recorded:
            problems.append(f"export file not in manifest: {name}")
        elif present[name] != recorded[name]:
            problems.append(f"export file changed: {name} (sha256 {present[name][:12]}..., recorded {recorded[name][:12]}...)")
    problems += chain_conflicts(manifest.get("stages") or {})
    if project_root is not None:
        uncached = uncached_outs(Path(project_root))  # a lineage/1 manifest still lists some as inputs
        problems += _verify_inputs(Path(project_root), {path: info for path, info in manifest.get("inputs", {}).items()
                                                        if path not in uncached})
    return problems


def dvc_md5(path: Path) -> str:
    """The hash DVC records in dvc.lock for a file or a folder (`<md5>.dir`), computed by DVC's own library."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem
    from dvc_objects.fs.memory import MemoryFileSystem

    scratch = HashFileDB(MemoryFileSystem(), "/rmpipe-verify")  # dry run: nothing is written anywhere
    *_, obj = build(scratch, str(Path(path).resolve()), LocalFileSystem(), "md5", dry_run=True)
    return obj.hash_info.value


def _verify_inputs(root: Path, inputs: dict[str, dict[str, Any]]) -> list[str]:
    """Re-hash every recorded input present under `root` the way DVC does and compare with dvc.lock's md5."""
    problems = []
    for rel, info in inputs.items():
        path = root / rel
        if not path.exists():
            continue  # not checked out here (e.g. verifying on another machine): nothing to compare
        current = dvc_md5(path)
        if current != info["md5"]:
            problems.append(f"input changed since export: {rel} (md5 {current}, recorded {info['md5']})")
    return problems


# --- reading it -------------------------------------------------------------------------------
def _num(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _data_lines(data: dict[str, Any]) -> list[str]:
    """Pre-judged vs vote-built pairs per split, and each imported batch's source."""
    lines = []
    if data.get("splits"):
        lines.append("pairs        " + ", ".join(f"{name} {s['pairs']} ({s['prejudged']} pre-judged)"
                                                 for name, s in data["splits"].items()))
    for batch, info in (data.get("batches") or {}).items():
        source = info.get("source") or {}
        where = (f" <- {source.get('dataset_id')} split {source.get('split')} revision "
                 f"{source.get('resolved_revision') or source.get('revision') or 'default'}") if source else ""
        if source.get("tool") == "label-studio":  # `rmpipe annotate pull`: which tool, project and export
            where = (f" <- Label Studio {source.get('label_studio_version')} at {source.get('url')} project "
                     f"{source.get('project_title')!r} (id {source.get('project_id')}) export {source.get('export_id')}")
        lines.append(f"  batch      {batch} [{info.get('format')}] sha256 {str(info.get('sha256'))[:16]}{where}")
    return lines


def describe(manifest: dict[str, Any]) -> str:
    """The manifest as a person reads it: what model, from which data, code and params, and the verdict."""
    git = manifest.get("git")
    if git is None:
        git_line = "not in git"
    else:
        changed = git.get("changed") or []
        git_line = git["commit"] + (f" + uncommitted changes ({', '.join(changed) or 'work tree dirty'})" if git["dirty"] else "")
        if git.get("dvc_lock") == "untracked":
            git_line += "; dvc.lock not in git yet (commit it: it records this lineage)"
    ev, promo = manifest.get("evaluation", {}), manifest.get("promotion", {})
    parity = manifest.get("parity", {})
    lines = [
        f"created      {manifest.get('created_at')}",
        f"git          {git_line}",
        f"backbone     {manifest.get('model', {}).get('backbone')}",
        f"evaluation   {'passed' if ev.get('passed') else 'FAILED'}: accuracy {_num(ev.get('accuracy'), '.4f')} "
        f"on {ev.get('n_pairs')} test pairs",
        f"promotion    {'promoted' if promo.get('promoted') else 'not promoted'}: {promo.get('reason')}",
        f"parity       max |diff| {_num(parity.get('max_abs_diff'), '.1e')} on {parity.get('n_rows')} golden rows",
        "batches      " + ", ".join(sorted({b for ids in manifest.get("batch_ids", {}).values() for b in ids})),
        *_data_lines(manifest.get("data") or {}),
        "",
        "inputs (dvc.lock md5):",
        *[f"  {info['md5']}  {path}  [{info['stage']}]" for path, info in manifest.get("inputs", {}).items()],
        "",
        "export files (sha256):",
        *[f"  {digest[:16]}  {name}" for name, digest in manifest.get("files", {}).items()],
        "",
        "packages:     " + ", ".join(f"{k} {v}" for k, v in manifest.get("packages", {}).items() if v),
        "",
        "params:",
        *["  " + line for line in yaml.safe_dump(manifest.get("params", {}), sort_keys=False).splitlines()],
    ]
    return "\n".join(lines)
