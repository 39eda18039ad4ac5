"""The whole pipeline under real DVC, in a plain copy of the project and in a git checkout.

These are the slow, meaningful ones: they run `dvc repro` exactly as a user does, on a small
sample, with real GX, real transformers and real DeepSpeed (one CPU process).
"""

from __future__ import annotations

import json
import os
import re
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


# What a stage must not print: Hugging Face's progress bars (two log lines each in a service log), a second
# timestamp on a line that has one (`00:31:07 rmpipe.train | ...` relayed under a log's own time).
NOISE = ("Loading weights", "Writing model shards", "it/s]")
TWO_TIMES = re.compile(r"\d\d:\d\d:\d\d\S* .*\b\d\d:\d\d:\d\d \S+ \| ")


def assert_no_noise(log: str) -> None:
    for noise in NOISE:
        assert noise not in log, noise
    assert not TWO_TIMES.search(log), TWO_TIMES.search(log).group(0)


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
    assert_no_noise(first.stderr)

    for split in ("train", "val", "test"):  # a folder of parts, one per part of the aggregated pairs
        parts = sorted((proj / "data" / "split" / split).glob("*.parquet"))
        assert parts and all(part.stat().st_size > 0 for part in parts)
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
    assert "data/split" not in status and "data/collected" not in status

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
    assert_no_noise(first.stderr)  # train, evaluate and export load and save models: no bars

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
        assert evaluation["accuracy_ci_low"] <= evaluation["accuracy"] <= evaluation["accuracy_ci_high"]
        # metrics are what runs are compared by; per-annotator and per-batch figures are reports
        assert list(data["metrics"]) == ["metrics/eval.json", "metrics/train.json"]
    assert experiments["lr-high"]["metrics"]["metrics/train.json"] != experiments["lr-low"]["metrics"]["metrics/train.json"]

    # The table: the held-out accuracy is the first figure after the experiment's name and date ...
    header = run([str(BIN / "dvc"), "exp", "show", "--no-pager", "--csv"], proj).stdout.splitlines()[0].split(",")
    assert header.index("accuracy") < 12, header[:12]
    n_params = sum(1 for name in header if name.split(".")[0] in yaml.safe_load((proj / "params.yaml").read_text()))
    n_metrics = header.index(next(name for name in header if "." in name)) - header.index("accuracy")
    assert n_metrics <= 20, header  # the figures of two metrics files, no per-annotator or per-batch columns
    assert n_params > 60  # every param and code dep follows them: DVC shows them all, hence metrics first
    # ... so the first 120 characters of `dvc exp show` (what a terminal's pager shows first) hold both
    # experiments' accuracy, side by side
    table = run([str(BIN / "dvc"), "exp", "show"], proj).stdout.splitlines()
    (head,) = [line[:120] for line in table if "Experiment" in line]
    assert "accuracy" in head
    column = slice(head.index("Created"), head.index("accuracy") + len("accuracy"))
    for name in ("lr-high", "lr-low"):
        (row,) = [line for line in table if f"[{name}]" in line]
        value = float(row[column].split()[-1])
        assert value == pytest.approx(experiments[name]["metrics"]["metrics/eval.json"]["data"]["accuracy"], abs=1e-4)

    plots = json.loads(run([str(BIN / "dvc"), "plots", "diff", "lr-high", "lr-low", "--json"], proj).stdout)["data"]
    for plot in ("calibration", "train_loss"):
        (entry,) = plots[plot]
        assert {row["rev"] for row in entry["content"]["data"]["values"]} == {"lr-high", "lr-low"}
    # calibration: the model's curve beside the y = x line, on bins of at least calibration_min_pairs pairs
    curve = [row for row in plots["calibration"][0]["content"]["data"]["values"] if row["field"] == "observed"]
    assert all(float(row["predicted"]) == float(row["perfectly_calibrated"]) for row in curve)
    min_pairs = yaml.safe_load((proj / "params.yaml").read_text())["evaluate"]["calibration_min_pairs"]
    assert all(int(row["pairs"]) >= min_pairs for row in curve)
    run([str(BIN / "dvc"), "plots", "diff", "lr-high", "lr-low"], proj)  # the page the README opens
    assert (proj / "dvc_plots/index.html").exists()
    assert "dvc_plots" not in run(["git", "status", "--porcelain"], proj).stdout  # regenerated, git-ignored
