"""The whole pipeline under real DVC, in a plain copy of the project and in a git checkout.

These are the slow, meaningful ones: they run `dvc repro` exactly as a user does, on a small
sample, with real GX, real transformers and real DeepSpeed (one CPU process).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rmpipe.core import codedeps

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow

# Small and fast, same code paths: fewer pairs, a smaller tiny model, one epoch.
FAST_PARAMS = {
    ("sample_data", "n_pairs"): 600,
    ("sample_data", "pair_rows"): 40,
    ("train", "epochs"): 1,
    ("model", "max_length"): 128,
}


def run_record() -> tuple[str, ...]:
    """What `make repro` stages (and the README says to commit) as a run's record: the Makefile's RUN_RECORD."""
    for line in (ROOT / "Makefile").read_text().splitlines():
        if line.startswith("RUN_RECORD :="):
            return tuple(line.split(":=", 1)[1].split())
    raise AssertionError("the Makefile defines no RUN_RECORD")


def project_files() -> list[str]:
    """What a clone holds: tracked files plus new, not-ignored ones (work in progress counts), less the record
    of any run made in this checkout (`make repro` before `make test`): a test project starts unbuilt."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout.split("\0")
    record = run_record()
    return [f for f in filter(None, out)
            if (ROOT / f).is_file() and not any(f == path or f.startswith(path + "/") for path in record)]


def copy_project(dest: Path, overrides: dict = FAST_PARAMS) -> Path:
    for rel in project_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    for (sect, key), value in overrides.items():
        params[sect][key] = value
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(cwd)}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def ran_stages(proc: subprocess.CompletedProcess) -> list[str]:
    text = proc.stdout + proc.stderr
    return [line.split("'")[1] for line in text.splitlines() if line.startswith("Running stage '")]


def test_full_repro_in_a_plain_copy_then_nothing_then_only_downstream(tmp_path):
    proj = copy_project(tmp_path / "proj")
    assert not (proj / ".git").exists()
    run([str(BIN / "dvc"), "config", "--local", "core.no_scm", "true"], proj)
    run([str(BIN / "rmpipe"), "sample-data"], proj)

    first = run([str(BIN / "dvc"), "repro"], proj)
    stages = list(yaml.safe_load((proj / "dvc.yaml").read_text())["stages"])
    assert ran_stages(first) == stages  # every stage, in pipeline order
    for noise in ("is empty", "Traceback", "Logging error"):  # a clean run prints nothing that reads as an error
        assert noise not in first.stdout + first.stderr, noise

    for split in ("train", "val", "test"):
        assert (proj / "data" / "split" / f"{split}.parquet").stat().st_size > 0
    assert (proj / "data" / "collected" / "quarantine.jsonl").exists()
    assert (proj / "reports" / "annotators.md").exists()
    assert (proj / "reports" / "data_docs" / "index.html").exists()
    assert json.loads((proj / "reports" / "validation.json").read_text())["success"] is True
    eval_metrics = json.loads((proj / "metrics" / "eval.json").read_text())
    assert eval_metrics["n_pairs"] > 0 and 0.0 <= eval_metrics["accuracy"] <= 1.0
    assert (proj / "models" / "export" / "config.json").exists()
    # `make repro`'s last step: without git the registry is unavailable, said in one line, and nothing else changes
    registered = run([str(BIN / "rmpipe"), "register", "--trigger", "make repro"], proj)
    assert registered.stdout.strip().startswith("registry unavailable: not a git repository")
    assert len(registered.stdout.strip().splitlines()) == 1 and "Traceback" not in registered.stderr
    assert json.loads((proj / "models/export/lineage.json").read_text())["promotion"]["promoted"] in (True, False)
    lock = yaml.safe_load((proj / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(stages)

    # Nothing changed: nothing runs.
    again = run([str(BIN / "dvc"), "repro"], proj)
    assert ran_stages(again) == []

    # One training param changed: training and what depends on it re-run, from the cached token ids.
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["train"]["lr"] = 2.5e-3
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = run([str(BIN / "dvc"), "repro"], proj)
    assert ran_stages(third) == ["train", "evaluate", "export"]
    assert "using tokenized splits from data/tokenized" in third.stdout + third.stderr

    # Editing a module a stage runs makes `dvc status` report exactly the stages whose import closure
    # holds it (dvc.yaml's code deps are those closures: rmpipe.core.codedeps). batching.py: the issue's
    # example, once missing from evaluate and export; io.py: in every stage.
    assert json.loads(run([str(BIN / "dvc"), "status", "--json"], proj).stdout) == {}
    closures = codedeps.wanted_deps(proj / "dvc.yaml")
    for module in ("rmpipe/model/batching.py", "rmpipe/core/io.py"):
        original = (proj / module).read_bytes()
        (proj / module).write_bytes(original + b"\n# an edit\n")
        stale = json.loads(run([str(BIN / "dvc"), "status", "--json"], proj).stdout)
        assert set(stale) == {stage for stage, deps in closures.items() if module in deps}, (module, stale)
        (proj / module).write_bytes(original)


def git_checkout(dest: Path) -> Path:
    proj = copy_project(dest)
    run(["git", "init", "-q"], proj)
    run(["git", "add", "-A"], proj)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qm", "init"], proj)
    run([str(BIN / "rmpipe"), "sample-data"], proj)
    return proj


@pytest.fixture(scope="module")
def data_stages_built(tmp_path_factory) -> dict:
    """A git checkout with the sample batches whose data stages ran once (`dvc repro validate`), then the run
    committed as the README says. Tests read it, or change a copy of it (`working_copy`), so none depends on
    what another did."""
    proj = git_checkout(tmp_path_factory.mktemp("checkout") / "proj")
    ok = run([str(BIN / "dvc"), "repro", "validate"], proj)
    status = run(["git", "status", "--porcelain"], proj).stdout
    run(["git", "add", "-A"], proj)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qm", "data stages"], proj)
    return {"project": proj, "repro": ok, "git_status": status}


def working_copy(proj: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(proj, tmp_path / "proj", symlinks=True))


def test_data_stages_in_a_git_checkout_and_a_failed_validation_stops_training(data_stages_built, tmp_path):
    ok = data_stages_built["repro"]
    assert ran_stages(ok) == ["collect", "aggregate", "split", "validate"]
    assert "is empty" not in ok.stdout + ok.stderr  # a clean run's (empty) quarantine is no warning
    # DVC wrote .gitignore entries for its outputs, so git sees no stray data.
    status = data_stages_built["git_status"]
    assert "data/split" not in status and "votes.parquet" not in status

    # A contract the data cannot meet: validation fails, and DVC stops before the backbone/train stages.
    proj = working_copy(data_stages_built["project"], tmp_path)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["validate"]["max_response_chars"] = 10
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    failed = run([str(BIN / "dvc"), "repro"], proj, check=False)
    assert failed.returncode != 0
    assert "FAIL" in failed.stdout + failed.stderr
    assert "Traceback" not in failed.stderr.split("ERROR")[0]
    assert "backbone" not in ran_stages(failed) and "train" not in ran_stages(failed)
    assert not (proj / "models" / "reward_model").exists()


def test_two_experiments_show_their_metrics_and_plots_side_by_side(data_stages_built, tmp_path):
    """Metrics, plots and reports are committed with dvc.lock (not git-ignored), so every experiment's
    commit holds them and `dvc exp show` / `dvc plots diff` compare reward models by them. The experiments
    start from a commit whose data stages already ran: they train, evaluate and export."""
    proj = working_copy(data_stages_built["project"], tmp_path)

    first = run([str(BIN / "dvc"), "exp", "run", "-n", "lr-high", "-S", "train.lr=0.004"], proj)
    run([str(BIN / "dvc"), "exp", "run", "-n", "lr-low", "-S", "train.lr=0.001"], proj)
    assert "is empty" not in first.stderr  # a clean run's (empty) quarantine is no warning

    shown = json.loads(run([str(BIN / "dvc"), "exp", "show", "--json"], proj).stdout)
    experiments = {rev["name"]: rev["data"] for row in shown for exp in row.get("experiments") or []
                   for rev in exp["revs"]}
    assert set(experiments) == {"lr-high", "lr-low"}
    for name, lr in (("lr-high", 0.004), ("lr-low", 0.001)):
        data = experiments[name]
        assert data["params"]["params.yaml"]["data"]["train"]["lr"] == lr
        evaluation = data["metrics"]["metrics/eval.json"]["data"]
        training = data["metrics"]["metrics/train.json"]["data"]
        assert 0.0 <= evaluation["accuracy"] <= 1.0 and evaluation["n_pairs"] > 0
        assert 0.0 <= training["val_accuracy"] <= 1.0
        assert data["metrics"]["reports/annotators.json"]["data"]["n_votes_in"] > 0
    assert experiments["lr-high"]["metrics"]["metrics/train.json"] != experiments["lr-low"]["metrics"]["metrics/train.json"]

    plots = json.loads(run([str(BIN / "dvc"), "plots", "diff", "lr-high", "lr-low", "--json"], proj).stdout)["data"]
    for plot in ("plots/eval/calibration.csv", "dvclive/train/plots/metrics/train/loss.tsv"):
        (entry,) = plots[plot]
        assert {row["rev"] for row in entry["content"]["data"]["values"]} == {"lr-high", "lr-low"}
