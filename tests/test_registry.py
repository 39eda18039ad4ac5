"""The model registry on real git and real GTO: versions on their own branch, prod, deprecation, no git.

The exports here are minimal folders (a config and a lineage.json that says what the gate decided):
what is under test is how they become tags, not how they were trained (test_audit builds real ones).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rmpipe.audit import registry

ROOT = Path(__file__).resolve().parents[1]
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]


def git(repo: Path, *args: str) -> str:
    return subprocess.run([*GIT, *args], cwd=repo, capture_output=True, text=True, check=True).stdout


def fake_export(repo: Path, n: int, passed: bool = True, promoted: bool = True, batches=("b1.jsonl",)) -> None:
    folder = repo / "models/export"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"n": n}))
    (folder / "lineage.json").write_text(json.dumps({
        "created_at": f"2026-01-0{n}T00:00:00+00:00", "batch_ids": {"train": list(batches)},
        "evaluation": {"passed": passed, "accuracy": 0.9 + n / 100},
        "promotion": {"promoted": promoted, "reason": f"gate {n}", "paired_test": {"b": n, "c": 0}}}))


@pytest.fixture
def repo(tmp_path) -> Path:
    repo = tmp_path / "proj"
    repo.mkdir()
    (repo / ".gitignore").write_text("/models/\n")
    (repo / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    (repo / "params.yaml").write_text("export:\n  out_dir: models/export\n")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "init")
    return repo


def test_versions_are_made_on_their_own_branch_and_the_users_checkout_is_untouched(repo):
    (repo / "params.yaml").write_text("export:\n  out_dir: models/export\n# edited, not committed\n")
    (repo / "notes.txt").write_text("work in progress\n")
    git(repo, "add", "notes.txt")  # the user's staged change
    head, status = git(repo, "rev-parse", "HEAD"), git(repo, "status", "--porcelain")
    fake_export(repo, 1)
    first = registry.register_export(repo, Path("models/export"), "on-new-batch b1.jsonl")
    assert first["new"] and first["tag"] == "reward-model@v0.0.1" and first["stage"] == "prod"
    assert git(repo, "rev-parse", "HEAD") == head and git(repo, "status", "--porcelain") == status
    assert git(repo, "symbolic-ref", "HEAD").strip() == "refs/heads/main"
    assert git(repo, "rev-parse", "rmpipe/models").strip() == first["commit"]
    # the version's commit holds the work tree as it was: the uncommitted edit too, never the ignored export
    assert "# edited, not committed" in git(repo, "show", f"{first['commit']}:params.yaml")
    assert "models/export/config.json" not in git(repo, "ls-tree", "-r", "--name-only", first["commit"])
    assert git(repo, "rev-parse", f"{first['commit']}^1").strip() == head.strip()

    again = registry.register_export(repo, Path("models/export"), "dvc repro")
    assert not again["new"] and again["version"] == "v0.0.1"  # once per model

    fake_export(repo, 2, promoted=False)
    second = registry.register_export(repo, Path("models/export"), "make repro")
    assert second["version"] == "v0.0.2" and second["stage"] is None
    assert git(repo, "rev-parse", f"{second['commit']}^2").strip() == first["commit"]  # the branch keeps history
    fake_export(repo, 3, passed=False)
    assert registry.register_export(repo, Path("models/export"), "x")["note"].startswith("not registered: the model "
                                                                                        "failed its evaluation")
    versions = registry.versions(repo)
    assert [(v["version"], v["stages"], v["deprecated"]) for v in versions] == [("v0.0.1", ["prod"], False),
                                                                               ("v0.0.2", [], False)]
    body = versions[0]["body"]
    assert body["trigger"] == "on-new-batch b1.jsonl" and body["gate"]["paired_test"] == {"b": 1, "c": 0}
    assert body["metrics"]["accuracy"] == pytest.approx(0.91) and body["batches"] == ["b1.jsonl"]
    assert body["manifest_sha256"] and body["export_md5"].endswith(".dir")


def test_gto_itself_shows_prod_and_a_deprecated_version_leaves_it(repo):
    fake_export(repo, 1)
    registry.register_export(repo, Path("models/export"), "t1")
    fake_export(repo, 2)
    registry.register_export(repo, Path("models/export"), "t2")
    gto = [str(Path(sys.executable).parent / "gto")]  # the CLI a person types
    shown = json.loads(subprocess.run([*gto, "show", "reward-model", "--json"], cwd=repo, capture_output=True,
                                      text=True, check=True).stdout)
    # one version per stage: the latest assignment is the one in prod
    assert {v["version"]: [s["stage"] for s in v["stages"]] for v in shown} == {"v0.0.2": ["prod"], "v0.0.1": []}
    assert registry.in_stage(repo)["version"] == "v0.0.2"

    assert registry.deprecate(repo, "v0.0.2", "retraction R1") == "reward-model@v0.0.2!"
    assert registry.in_stage(repo)["version"] == "v0.0.1"  # GTO: prod falls back to the earlier assignment
    assert [(v["stages"], v["deprecated"]) for v in registry.versions(repo)] == [(["prod"], False), ([], True)]
    history = subprocess.run([*gto, "history", "reward-model"], cwd=repo, capture_output=True, text=True,
                             check=True).stdout
    assert "deregistration" in history and "assignment" in history
    # every version deprecated (a retraction of the first batch): nothing in prod, and the next model is a new
    # number, never a re-used one (GTO's own bump skips deregistered versions and would hit the existing tag)
    registry.deprecate(repo, "v0.0.1", "retraction R2")
    assert registry.in_stage(repo) is None
    fake_export(repo, 3)
    assert registry.register_export(repo, Path("models/export"), "t3")["version"] == "v0.0.3"
    assert [(v["version"], v["stages"]) for v in registry.versions(repo)] == [("v0.0.1", []), ("v0.0.2", []),
                                                                             ("v0.0.3", ["prod"])]


def test_without_git_the_registry_is_unavailable_in_one_line(tmp_path):
    fake_export(tmp_path, 1)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    reason = registry.unavailable_reason(tmp_path)
    assert reason.startswith("registry unavailable: not a git repository") and "\n" not in reason
    assert registry.register_export(tmp_path, Path("models/export"), "x") == {"note": reason}
    with pytest.raises(registry.RegistryUnavailable, match="not a git repository"):
        registry.versions(tmp_path)
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "register"], cwd=tmp_path, capture_output=True,
                         text=True, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and out.stdout.strip() == reason and "Traceback" not in out.stderr
