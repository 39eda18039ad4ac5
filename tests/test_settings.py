"""Settings parsed once: each params.yaml section is one frozen settings object, and a mistake in it is one
clear line naming the key (never a pydantic traceback). Also: the one table of project paths matches dvc.yaml."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rmpipe.core import settings as S
from rmpipe.core.errors import ConfigError
from rmpipe.core.paths import ProjectPaths

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
SECTIONS = {"model": S.ModelSettings, "train": S.TrainSettings, "evaluate": S.EvalSettings,
            "export": S.ExportSettings, "split": S.SplitSettings, "validate": S.ValidateSettings,
            "sampling": S.SamplingSettings, "collect": S.CollectSettings, "aggregate": S.AggregateSettings,
            "data": S.DataSettings, "sample_data": S.SampleDataSettings}


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_each_section_of_params_yaml_parses_into_its_frozen_settings(name):
    settings = SECTIONS[name].parse(PARAMS)
    # every key of the section is a field (extra keys are refused), and the object cannot be edited
    assert set(PARAMS[name]) <= set(settings.model_dump())
    field = next(iter(PARAMS[name]))
    with pytest.raises(Exception, match="frozen"):
        setattr(settings, field, getattr(settings, field))


@pytest.mark.parametrize("name, override, expected", [
    ("train", {"lr": "fast"}, "params.yaml: 'train.lr' must be a number, got 'fast'"),
    ("train", {"lr": 0}, "params.yaml: 'train.lr' must be greater than 0"),
    ("train", {"epochs": True}, "params.yaml: 'train.epochs' must be a whole number, got True"),
    ("train", {"zero_stage": 4}, "params.yaml: 'train.zero_stage' must be one of 0, 1, 2 or 3, got 4"),
    ("train", {"bf16": "yes"}, "params.yaml: 'train.bf16' must be true, false or auto, got 'yes'"),
    ("train", {"packing": "tight"}, "params.yaml: 'train.packing' must be one of 'auto', "),
    ("train", {"learning_rate": 1e-3}, "params.yaml: 'train.learning_rate' is not a setting rmpipe knows: "
                                       "remove it or correct its spelling"),
    ("model", {"max_length": 4}, "params.yaml: 'model.max_length' must be at least 8, got 4"),
    ("model", {"tiny": {**PARAMS["model"]["tiny"], "hidden_size": "64"}},
     "params.yaml: 'model.tiny.hidden_size' must be a whole number, got '64'"),
    ("evaluate", {"agreement_edges": [1.0, 0.5]}, "params.yaml: 'evaluate.agreement_edges' must be at least two"),
    ("export", {"promoted_dir": PARAMS["export"]["out_dir"]},
     "params.yaml: 'export.out_dir' and 'export.promoted_dir' must differ"),
    ("split", {"fractions": {"train": 0.8, "val": 0.1, "test": 0.2}}, "params.yaml: 'split.fractions' must sum to 1"),
    ("sampling", {"n_completions": 1}, "params.yaml: 'sampling.n_completions' must be at least 2, got 1"),
    ("collect", {"on_rejected_batch": "ignore"}, "params.yaml: 'collect.on_rejected_batch' must be one of 'fail' or "),
    ("aggregate", {"dawid_skene": {"n_iter": 20, "tol": "small"}},
     "params.yaml: 'aggregate.dawid_skene.tol' must be a number, got 'small'"),
])
def test_a_mistake_is_one_line_naming_the_key(name, override, expected):
    with pytest.raises(ConfigError) as err:
        SECTIONS[name].from_section({**PARAMS[name], **override})
    message = str(err.value)
    assert message.startswith(expected) and "\n" not in message
    assert "pydantic" not in message and "validation error" not in message.lower()


def test_a_missing_key_says_where_to_add_it():
    section = {k: v for k, v in PARAMS["train"].items() if k != "seed"}
    with pytest.raises(ConfigError, match=r"^params.yaml: 'train.seed' is missing: add it to the 'train:' section$"):
        S.TrainSettings.from_section(section)
    # a key code may default (AggregateSettings() in tests) must still be spelled out in params.yaml
    section = {k: v for k, v in PARAMS["aggregate"].items() if k != "method"}
    with pytest.raises(ConfigError, match=r"^params.yaml: 'aggregate.method' is missing"):
        S.AggregateSettings.from_section(section)


def test_settings_built_in_code_fail_the_same_way():
    with pytest.raises(ConfigError, match=r"^params.yaml: 'aggregate.method' must be one of 'majority' or"):
        S.AggregateSettings(method="median")


def test_the_stage_prints_the_config_error_without_a_traceback(tmp_path):
    params = {**PARAMS, "split": {**PARAMS["split"], "salt": 7}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, "-m", "stages.split"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: params.yaml: 'split.salt' must be a string, got 7"
    assert "Traceback" not in proc.stderr


def test_constants_restated_for_a_light_import_match_their_sources():
    from rmpipe.model import packing
    from rmpipe.core import paths
    from rmpipe.core import schema

    assert S.PACKING_MODES == packing.MODES
    assert S.SPLITS == paths.SPLITS == schema.SPLITS and S.STRENGTHS == schema.STRENGTHS
    assert set(S.TrainSettings.model_fields["packing"].annotation.__args__) == {"auto", *packing.MODES}


def test_every_project_path_is_one_dvc_yaml_declares():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    declared = set()
    for stage in spec["stages"].values():
        for kind in ("deps", "outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                declared.add(Path(next(iter(entry)) if isinstance(entry, dict) else entry))
    for name, path in vars(ProjectPaths()).items():
        assert any(path == d or d in path.parents or path in d.parents for d in declared), f"{name}: {path}"
    assert ProjectPaths.at(tmp := Path("/x")).train_split == tmp / "data/split/train"  # a folder of parts


# --- the top-level sections and the file the messages name ---------------------------------------------

def test_a_misspelled_section_is_refused_naming_the_closest_one(tmp_path):
    from rmpipe.core.params import load_params

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["trian"] = params.pop("train")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError) as caught:
        load_params(tmp_path / "params.yaml")
    assert str(caught.value) == (f"{tmp_path / 'params.yaml'}: unknown section 'trian:' (did you mean 'train:'?); "
                                 "rename or remove it")
    params["zzz"] = params.pop("trian")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match="unknown section 'zzz:' \\(the sections are sample_data, data, "):
        load_params(tmp_path / "params.yaml")


def test_the_known_sections_are_the_settings_sections_and_params_yamls():
    import inspect

    from rmpipe.core import settings
    from rmpipe.core.params import SECTIONS

    classes = [c for _, c in inspect.getmembers(settings, inspect.isclass)
               if issubclass(c, settings.Settings) and c is not settings.Settings]
    assert {c.SECTION.split(".")[0] for c in classes} == set(SECTIONS)
    assert set(yaml.safe_load((ROOT / "params.yaml").read_text())) == set(SECTIONS)


def test_errors_about_a_params_file_given_with_dash_dash_params_name_that_file(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["split"]["salt"] = 7
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "stages.split", "--params", "other.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "error: other.yaml: 'split.salt'" in proc.stderr and "params.yaml" not in proc.stderr, proc.stderr
    from rmpipe.core.params import load_params
    from rmpipe.core.settings import SplitSettings

    with pytest.raises(ConfigError, match=r"^.*other\.yaml: 'split\.salt'"):
        SplitSettings.parse(load_params(tmp_path / "other.yaml"))


def test_a_section_the_projects_own_stages_read_is_no_unknown_section(tmp_path):
    """DVC params serve a project's own stages too: a section a dvc.yaml stage names in `params:` is kept."""
    from rmpipe.core.params import load_params

    (tmp_path / "params.yaml").write_text("toy:\n  value: 1\nmine: 2\n")
    (tmp_path / "dvc.yaml").write_text("stages:\n  a:\n    cmd: x\n    params: [toy.value]\n"
                                       "  b:\n    foreach: [1]\n    do:\n      cmd: y\n      params:\n"
                                       "        - params.yaml: [mine]\n")
    assert load_params(tmp_path / "params.yaml") == {"toy": {"value": 1}, "mine": 2}
    (tmp_path / "params.yaml").write_text("toy:\n  value: 1\nmien: 2\n")
    with pytest.raises(ConfigError, match="unknown section 'mien:'"):
        load_params(tmp_path / "params.yaml")
