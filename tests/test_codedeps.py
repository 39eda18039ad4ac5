"""Stage code deps have one truth, the stages' imports: dvc.yaml, the trainer's resume fingerprint and the
tokenized-cache key all take it from rmpipe.core.codedeps, and `rmpipe deps --check` fails when dvc.yaml drifts.

(That editing a module makes real `dvc status` report exactly the stages whose closure holds it is
checked after a full repro in tests/test_dvc_pipeline.py, to share its run.)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from rmpipe.core import codedeps

ROOT = Path(__file__).resolve().parents[1]


def deps_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "deps", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def copy_code(dest: Path) -> Path:
    """dvc.yaml and the project's packages: all `rmpipe deps` reads."""
    dest.mkdir()
    shutil.copy2(ROOT / "dvc.yaml", dest / "dvc.yaml")
    for package in codedeps.PACKAGES:
        shutil.copytree(ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def code_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if not any(f"- {p}/" in ln and ".py" in ln for p in codedeps.PACKAGES)]


def test_dvc_yaml_code_deps_are_the_stages_import_closures():
    proc = deps_cli(ROOT, "--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert codedeps.drift(ROOT / "dvc.yaml") == {}
    # The closures the issue found missing are there (lazy imports included).
    wanted = codedeps.wanted_deps(ROOT / "dvc.yaml")
    assert {"rmpipe/model/batching.py", "rmpipe/model/packing.py", "rmpipe/evaluation/pathology.py", "rmpipe/model/reward_model.py"} <= set(wanted["export"])
    assert "rmpipe/model/batching.py" in wanted["evaluate"] and "rmpipe/model/render.py" in wanted["backbone"]
    assert not set(codedeps.UNRECORDED) & {d for deps in wanted.values() for d in deps}


def test_check_fails_on_a_removed_dep_an_extra_dep_and_a_new_import_and_deps_mends_them(tmp_path):
    proj = copy_code(tmp_path / "proj")
    original = (proj / "dvc.yaml").read_text()

    # A code dep dropped from evaluate, a stray one added to aggregate.
    text = original.replace("      - rmpipe/model/batching.py\n", "", 1)  # the first stage listing it
    first = next(s for s, deps in codedeps.wanted_deps(proj / "dvc.yaml").items() if "rmpipe/model/batching.py" in deps)
    text = text.replace("      - rmpipe/data/aggregate/run.py\n", "      - rmpipe/data/aggregate/run.py\n      - rmpipe/data/sample/batches.py\n")
    (proj / "dvc.yaml").write_text(text)
    # A new lazy import inside a function of split's code.
    with (proj / "rmpipe" / "data" / "split.py").open("a") as fh:
        fh.write("\n\ndef _later():\n    from rmpipe.model import sampling  # noqa: F401\n")

    proc = deps_cli(proj, "--check")
    assert proc.returncode == 1
    assert f"{first}: missing rmpipe/model/batching.py" in proc.stdout
    assert "aggregate: extra rmpipe/data/sample/batches.py" in proc.stdout
    assert "split: missing" in proc.stdout and "rmpipe/model/sampling.py" in proc.stdout.split("split: missing")[1].splitlines()[0]
    assert "run `rmpipe deps`" in proc.stderr and "Traceback" not in proc.stderr
    assert (proj / "dvc.yaml").read_text() == text  # --check changes nothing

    fixed = deps_cli(proj)
    assert fixed.returncode == 0, fixed.stderr
    assert deps_cli(proj, "--check").returncode == 0
    new = (proj / "dvc.yaml").read_text()
    # Only code lines changed: data deps, params, outs, comments and layout are as they were.
    assert code_lines(new) == code_lines(original)
    before, after = yaml.safe_load(original)["stages"], yaml.safe_load(new)["stages"]
    for name in before:
        assert {k: v for k, v in before[name].items() if k != "deps"} == {k: v for k, v in after[name].items() if k != "deps"}
        data = [d for d in before[name]["deps"] if not codedeps.is_code_dep(d)]
        assert [d for d in after[name]["deps"] if not codedeps.is_code_dep(d)] == data
    assert "rmpipe/model/sampling.py" in after["split"]["deps"]
    assert "rmpipe/data/sample/batches.py" not in after["aggregate"]["deps"]


def test_closure_follows_every_import_form_and_skips_only_type_checking_and_the_unrecorded(tmp_path):
    files = {
        "stages/__init__.py": "",
        "stages/s.py": "import os\nimport rmpipe.a\n",
        "rmpipe/__init__.py": '"""doc"""\n',
        "rmpipe/a.py": "from . import b\n",                                   # relative, module form
        "rmpipe/b.py": "def f():\n    from .c import g\n    return g\n",       # lazy, relative
        "rmpipe/c.py": "from rmpipe.sub import d\ng = 1\n",                    # from package import module
        "rmpipe/sub/__init__.py": "X = 1\n",
        "rmpipe/sub/d.py": "import importlib\nimportlib.import_module('rmpipe.e')\n",
        "rmpipe/e.py": ("from typing import TYPE_CHECKING\nfrom rmpipe.core.errors import E\n"
                        "if TYPE_CHECKING:\n    from rmpipe import never\n"),
        "rmpipe/never.py": "",
        "rmpipe/core/errors.py": "from rmpipe import g\nclass E(Exception): pass\n",  # unrecorded, imports followed
        "rmpipe/g.py": "",
        "rmpipe/unused.py": "",
    }
    for rel, body in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(textwrap.dedent(body))
    assert codedeps.closure("stages/s.py", tmp_path) == [
        "stages/s.py", "rmpipe/a.py", "rmpipe/b.py", "rmpipe/c.py", "rmpipe/e.py", "rmpipe/g.py",
        "rmpipe/sub/__init__.py", "rmpipe/sub/d.py"]


def test_training_fingerprint_and_token_cache_key_follow_the_same_closure(tmp_path):
    """backbones.py was in neither hand-kept list; it is in train's and tokenize's closures, so an edit
    to it now stops a checkpoint resume and a cached-tokens reuse, as it makes DVC re-run both stages."""
    from rmpipe.training import checkpoint
    from rmpipe.model import tokenized

    wanted = codedeps.wanted_deps(ROOT / "dvc.yaml")
    assert list(checkpoint.TRAINING_CODE) == wanted["train"]
    assert codedeps.closure(tokenized.CODE_ENTRY) == wanted["tokenize"]
    assert "rmpipe/model/backbones.py" in wanted["train"] and "rmpipe/model/backbones.py" in wanted["tokenize"]

    proj = copy_code(tmp_path / "proj")
    split = tmp_path / "train.parquet"
    split.write_bytes(b"pairs")
    edited = proj / "rmpipe" / "model" / "backbones.py"
    script = textwrap.dedent(f"""
        from types import SimpleNamespace
        import yaml
        from rmpipe.training import checkpoint
        from rmpipe.model import tokenized
        from rmpipe.core.settings import ModelSettings, TrainSettings
        paths = SimpleNamespace(train_split={str(split)!r}, val_split={str(split)!r})
        params = yaml.safe_load(open({str(ROOT / "params.yaml")!r}))
        model, train = ModelSettings.parse(params), TrainSettings.parse(params)
        def keys():
            return (checkpoint.fingerprint(model, train, {str(split)!r}, "hub/model", 1),
                    tokenized.cache_key("hub/model", paths, 64)["code"])
        first, again = keys(), keys()
        with open({str(edited)!r}, "a") as fh:
            fh.write("\\n# an edit\\n")
        print(*first, *again, *keys())
    """)
    env = {**os.environ, "PYTHONPATH": str(proj)}
    out = subprocess.run([sys.executable, "-c", script], cwd=proj, env=env, check=True,
                         capture_output=True, text=True, timeout=120).stdout.split()
    first, again, after = out[0:2], out[2:4], out[4:6]
    assert first == again  # deterministic
    assert after[0] != first[0] and after[1] != first[1]


# --- files named by params, every stage form, the check before a rebuild --------------------------------

def _with_deepspeed_config(proj: Path, value) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["deepspeed_config"] = value
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_the_deepspeed_config_file_is_a_generated_dep_and_editing_it_makes_dvc_status_name_train(tmp_path):
    """A real DVC repo: `rmpipe deps` adds the JSON train.deepspeed_config names to train's deps (marked as its
    own), `dvc status` then names train when the file's contents change, and setting the param back to null
    makes the dep stale (--check names it) until `rmpipe deps` removes it."""
    proj = copy_code(tmp_path / "proj")
    (proj / "ds.json").write_text('{"optimizer": {"type": "AdamW", "params": {"lr": 0.001}}}\n')
    _with_deepspeed_config(proj, "ds.json")
    check = deps_cli(proj, "--check")
    assert check.returncode != 0 and "train: missing ds.json" in check.stdout, check.stdout + check.stderr
    assert codedeps.stale_line(proj / "dvc.yaml").count("\n") == 0
    assert "stage train: missing ds.json" in codedeps.stale_line(proj / "dvc.yaml")
    assert deps_cli(proj).returncode == 0
    text = (proj / "dvc.yaml").read_text()
    marked = re.search(rf"\n *- ds.json +# {codedeps.PARAM_DEP_MARK}\n", text)
    assert marked, text
    assert deps_cli(proj, "--check").returncode == 0

    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=proj, check=True)
    train = yaml.safe_load(text)["stages"]["train"]
    assert "ds.json" in train["deps"]
    for dep in ("data/split", "data/tokenized", "models/backbone", "models/reward_model", "checkpoints/train",
                "dvclive/train/plots/metrics"):
        (proj / dep).mkdir(parents=True, exist_ok=True)
        (proj / dep / "f").write_text(dep)
    for path in ("reports/validation.json", "metrics/train.json"):
        (proj / path).parent.mkdir(parents=True, exist_ok=True)
        (proj / path).write_text("{}")
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "commit", "-f", "-q", "train"], cwd=proj, check=True, capture_output=True)
    clean = subprocess.run([*dvc, "status", "train"], cwd=proj, capture_output=True, text=True, check=True)
    assert "up to date" in clean.stdout, clean.stdout
    (proj / "ds.json").write_text('{"optimizer": {"type": "AdamW", "params": {"lr": 0.01}}}\n')
    stale = subprocess.run([*dvc, "status", "train"], cwd=proj, capture_output=True, text=True, check=True)
    assert "train:" in stale.stdout and "modified:" in stale.stdout and "ds.json" in stale.stdout, stale.stdout

    _with_deepspeed_config(proj, None)
    check = deps_cli(proj, "--check")
    assert check.returncode != 0 and "train: extra ds.json" in check.stdout
    assert deps_cli(proj).returncode == 0 and "ds.json" not in (proj / "dvc.yaml").read_text()
    assert (proj / "dvc.yaml").read_text() == text.replace(marked.group(0), "\n")  # nothing else moved


def test_every_stage_form_is_checked_or_named(tmp_path):
    """A cmd list, foreach and matrix stages are followed; a command the generator cannot follow is named."""
    proj = copy_code(tmp_path / "proj")
    closure = codedeps.closure("stages/split.py", proj)
    (proj / "dvc.yaml").write_text(textwrap.dedent("""\
        stages:
          listed:
            cmd:
              - python -m stages.split
              - python -m stages.aggregate --params params.yaml
            deps: [data/x]
          each:
            foreach: [a, b]
            do:
              cmd: python -m stages.split --params ${item}.yaml
              deps: ["data/${item}"]
          grid:
            matrix:
              p: [1, 2]
            cmd: python -m stages.split
            deps: [data/grid]
          script:
            cmd: python tools/make.py
            deps: [tools/make.py]
          mixed:
            cmd: python -m stages.split && python hold.py
            deps: [data/m]
          templated:
            foreach: [split]
            do:
              cmd: python -m stages.${item}
        """))
    assert set(codedeps.drift(proj / "dvc.yaml")) == {"listed", "each", "grid", "mixed"}
    skipped = codedeps.unchecked(proj / "dvc.yaml")
    assert set(skipped) == {"script", "mixed", "templated"}
    assert "`python tools/make.py` is not `python -m stages.<name>`" in skipped["script"]
    assert "also runs a script" in skipped["mixed"] and "templated" in skipped["templated"]
    proc = deps_cli(proj)
    assert proc.returncode == 0 and "script: not checked" in proc.stdout
    doc = yaml.safe_load((proj / "dvc.yaml").read_text())["stages"]
    both = closure + sorted(set(codedeps.closure("stages/aggregate.py", proj)) - set(closure))
    assert doc["listed"]["deps"] == [*both, "data/x"]
    assert doc["each"]["do"]["deps"] == [*closure, "data/${item}"] and doc["grid"]["deps"] == [*closure, "data/grid"]
    assert doc["script"]["deps"] == ["tools/make.py"]
    assert codedeps.drift(proj / "dvc.yaml") == {}
    check = deps_cli(proj, "--check")
    assert check.returncode == 0 and "templated: not checked" in check.stdout


def test_a_rebuild_with_stale_deps_stops_before_dvc_in_one_line_naming_the_stage(tmp_path):
    """`rmpipe rebuild` (the flow the service runs too) runs the check first: nothing is admitted or run."""
    proj = copy_code(tmp_path / "proj")
    text = (proj / "dvc.yaml").read_text()
    (proj / "dvc.yaml").write_text(text.replace("      - rmpipe/data/split.py\n", "", 1))
    (proj / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=proj, check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PYTHONPATH=str(ROOT), PREFECT_HOME=str(tmp_path / "prefect"))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "rebuild"], cwd=proj, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "stage split: missing rmpipe/data/split.py" in errors[0], proc.stderr
    assert "run `rmpipe deps`" in errors[0]
    assert not (proj / "dvc.lock").exists()
