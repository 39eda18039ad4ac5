"""The Makefile's own logic, run as make runs it: the recipe lines that decide what a user sees."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HINT = "Use `dvc push`"


def repro_line() -> str:
    """The `make repro` line that runs `dvc repro`, with make's escaping undone and $(BIN) filled in."""
    lines = (ROOT / "Makefile").read_text().split("\nrepro:", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if "dvc repro" in line and not line.lstrip().startswith("@#"))
    recipe = lines[start].strip().lstrip("@")
    while recipe.endswith("\\"):
        start += 1
        recipe = recipe[:-1] + " " + lines[start].strip()
    return recipe.replace("$(BIN)", str(BIN)).replace("$$", "$")


def make_repro(project: Path) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(["bash", "-c", repro_line()], check=False, cwd=project, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def dvc(project: Path, *args: str) -> None:
    subprocess.run([str(BIN / "dvc"), *args], cwd=project, check=True, capture_output=True, timeout=120)


def test_the_push_hint_shows_only_where_a_dvc_remote_is_set(tmp_path):
    """Mutation seen: testing `dvc remote default`'s text instead of its status showed the hint with no remote
    (it prints "No default remote set" on stdout)."""
    project = tmp_path / "p"
    project.mkdir()
    dvc(project, "init", "-q", "--no-scm")
    dvc(project, "stage", "add", "-q", "-n", "s", "-o", "out.txt", "echo one > out.txt")
    without_remote = make_repro(project)
    assert "Running stage 's'" in without_remote and HINT not in without_remote

    dvc(project, "remote", "add", "-q", "-d", "store", str(tmp_path / "store"))
    (project / "dvc.yaml").write_text((project / "dvc.yaml").read_text().replace("echo one", "echo two"))
    with_remote = make_repro(project)
    assert "Running stage 's'" in with_remote and HINT in with_remote
