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
