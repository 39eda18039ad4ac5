"""The lineage manifest's git record and how `rmpipe lineage` prints it (real git repos in temp dirs)."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

from rmpipe.audit.lineage import describe, git_state

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-c", "commit.gpgsign=false"]


def git(root: Path, *args: str) -> None:
    subprocess.run([*GIT, *args], cwd=root, check=True, capture_output=True)


def project(root: Path, commit: tuple[str, ...] = ("dvc.yaml", "params.yaml", "code.py", "README.md")) -> Path:
    """A git project whose dvc.yaml names one code dep, a cached out, a metric and a plot."""
    root.mkdir()
    (root / "dvc.yaml").write_text(textwrap.dedent("""\
        stages:
          train:
            cmd: python code.py
            deps: [code.py, data/battery.jsonl]
            outs: [models/out]
            metrics:
              - metrics/train.json:
                  cache: false
            plots:
              - plots/curve.csv:
                  cache: false
        """))
    for name, text in {"params.yaml": "train: {lr: 0.1}\n", "code.py": "print(1)\n", "README.md": "hi\n"}.items():
        (root / name).write_text(text)
    git(root, "init", "-q")
    git(root, "add", *commit)
    git(root, "commit", "-qm", "init")
    return root


def test_the_runs_own_products_do_not_make_the_tree_dirty_but_an_uncommitted_dvc_lock_is_named(tmp_path):
    root = project(tmp_path / "p")
    assert git_state(root) == {"commit": git_state(root)["commit"], "dirty": False, "changed": [], "dvc_lock": "missing"}
    # What `dvc repro` writes on the way to the export stage: dvc.lock, metrics, plots.
    (root / "dvc.lock").write_text("schema: '2.0'\n")
    for rel in ("metrics/train.json", "plots/curve.csv"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("{}\n")
    (root / "notes.txt").write_text("scratch, not an input\n")
    state = git_state(root)
    assert state["dirty"] is False and state["dvc_lock"] == "untracked"
    assert "dvc.lock not in git yet" in describe({"git": state})

    git(root, "add", "dvc.lock", "metrics", "plots")
    git(root, "commit", "-qm", "run")
    (root / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")  # rewritten by the next run
    state = git_state(root)
    assert state["dirty"] is False and state["dvc_lock"] == "modified"


def test_untracked_inputs_and_tracked_changes_make_the_tree_dirty(tmp_path):
    root = project(tmp_path / "p", commit=("dvc.yaml", "code.py"))  # params.yaml never committed
    state = git_state(root)
    assert state["dirty"] is True and state["changed"] == ["params.yaml"]

    git(root, "add", "params.yaml", "README.md")
    git(root, "commit", "-qm", "params")
    assert git_state(root)["dirty"] is False
    (root / "helper.py").write_text("X = 1\n")  # new code, not yet committed
    (root / "data").mkdir()
    (root / "data/battery.jsonl").write_text("{}\n")  # an untracked stage dep
    assert git_state(root)["changed"] == ["data/battery.jsonl", "helper.py"]
    (root / "helper.py").unlink()
    (root / "data/battery.jsonl").unlink()
    (root / "README.md").write_text("edited\n")  # any tracked change counts
    state = git_state(root)
    assert state["dirty"] is True and state["changed"] == ["README.md"]
    assert "uncommitted changes (README.md)" in describe({"git": state})


def test_lineage_prints_rounded_figures():
    text = describe({"evaluation": {"passed": True, "accuracy": 0.9848942598187311, "n_pairs": 331},
                     "parity": {"max_abs_diff": 1.9073486328125e-06, "n_rows": 57}})
    assert "accuracy 0.9849 on 331 test pairs" in text and "max |diff| 1.9e-06 on 57 golden rows" in text
    assert "0.98489" not in text and "1.907" not in text


def test_rmpipes_own_register_is_no_dirt_and_is_named(tmp_path):
    root = project(tmp_path / "p")
    (root / "audit").mkdir()
    (root / "audit/retractions.jsonl").write_text('{"format": "rmpipe-retractions/1"}\n')
    state = git_state(root)  # untracked register: rmpipe's own record, its md5 is in dvc.lock as collect's dep
    assert state["dirty"] is False and state["own_changed"] == ["audit/retractions.jsonl"]
    git(root, "add", "audit")
    git(root, "commit", "-qm", "register")
    (root / "audit/retractions.jsonl").write_text('{"format": "rmpipe-retractions/1"}\n{"id": "R1"}\n')
    assert git_state(root)["dirty"] is False


def test_retract_commits_only_what_rmpipe_wrote(tmp_path):
    from pipeline.own_commit import commit_own, unchanged

    root = project(tmp_path / "p")
    (root / "README.md").write_text("the user's staged edit\n")
    git(root, "add", "README.md")
    (root / "code.py").write_text("print(2)\n")  # and an unstaged one
    (root / "audit").mkdir()
    (root / "audit/retractions.jsonl").write_text('{"id": "R1"}\n')
    commit = commit_own(root, ["audit/retractions.jsonl"], "rmpipe retract R1: batch b")
    assert commit and unchanged(root, "audit/retractions.jsonl")
    shown = subprocess.run(["git", "show", "--name-only", "--format=%s", commit], cwd=root, capture_output=True,
                           text=True, check=True).stdout.split()
    assert shown[-1] == "audit/retractions.jsonl" and "README.md" not in shown
    status = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
    assert "M  README.md" in status and " M code.py" in status  # the user's changes untouched, still staged/unstaged


# --- lineage that `dvc checkout` restores (a real DVC repo and a real experiment) ------------------------
TRAIN = """\
import json, pathlib, yaml
lr = yaml.safe_load(open("params.yaml"))["train"]["lr"]
for folder in ("models/m", "checkpoints/c", "metrics"):
    pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
pathlib.Path("models/m/w.txt").write_text(f"weights for lr={lr}\\n")
with open("checkpoints/c/state.txt", "a") as fh:  # persist: resume state accumulates
    fh.write(f"state lr={lr}\\n")
pathlib.Path("metrics/train.json").write_text(json.dumps({"loss": 1 / (1 + lr)}))
"""
EXPORT = """\
import json, pathlib
from rmpipe.audit.lineage import MANIFEST_FILE, build_manifest
out = pathlib.Path("models/export")
out.mkdir(parents=True, exist_ok=True)
(out / "model.txt").write_text(pathlib.Path("models/m/w.txt").read_text())
manifest = build_manifest(out, pathlib.Path("."), {}, {}, ("export",), {})
(out / MANIFEST_FILE).write_text(json.dumps(manifest))
"""
PIPELINE = """\
stages:
  train:
    cmd: python train.py
    deps: [train.py]
    params: [train.lr]
    outs:
      - models/m
      - checkpoints/c:
          cache: false
          persist: true
    metrics:
      - metrics/train.json:
          cache: false
  export:
    cmd: python export.py
    deps: [export.py, models/m, metrics/train.json]
    outs: [models/export]
"""


def test_after_an_experiment_checkout_back_restores_everything_verify_checks(tmp_path):
    import json
    import os
    import sys

    from rmpipe.audit.lineage import read_manifest, verify_export

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def sh(*args: str) -> str:
        proc = subprocess.run(list(args), cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    root = tmp_path / "p"
    root.mkdir()
    for name, text in {"dvc.yaml": PIPELINE, "params.yaml": "train:\n  lr: 0.1\n", "train.py": TRAIN,
                       "export.py": EXPORT, ".gitignore": "/checkpoints/\n"}.items():  # as the project ignores it
        (root / name).write_text(text)
    git(root, "init", "-q")
    sh("dvc", "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "pipeline")
    sh("dvc", "repro")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "run")  # the run's record: dvc.lock and metrics
    manifest = read_manifest(root / "models/export")
    assert set(manifest["inputs"]) == {"models/m", "train.py"}  # what a checkout restores
    assert set(manifest["evidence"]) == {"checkpoints/c", "metrics/train.json"}  # cache: false: what it cannot
    assert verify_export(root / "models/export", root) == []

    git(root, "config", "user.name", "t")  # dvc exp run commits the experiment
    git(root, "config", "user.email", "t@example.invalid")
    sh("dvc", "exp", "run", "-S", "train.lr=0.5")
    assert "lr=0.5" in (root / "models/export/model.txt").read_text()  # the experiment really rebuilt
    sh("git", "checkout", "--", ".")
    sh("dvc", "checkout")
    assert "lr=0.1" in (root / "models/export/model.txt").read_text()
    assert "lr=0.5" in (root / "checkpoints/c/state.txt").read_text()  # not restorable: why it is no input
    assert verify_export(root / "models/export", root) == []
    # DVC itself sees only the uncached resume state as changed: the one thing no checkout brings back
    assert json.loads(sh("dvc", "status", "--json")) == {"train": [{"changed outs": {"checkpoints/c": "modified"}}]}
