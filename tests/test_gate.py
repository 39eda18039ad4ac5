"""The promotion gate: a paired comparison with the model in prod on the same pairs, never an absolute margin.

The statistics on small arrays, then the real thing: three tiny reward models trained by the real train
stage on the same toy preferences (prod: seed 0; an equal candidate: seed 1; a clearly worse one:
lr 1e-12), each evaluated and exported by the real stages in a plain folder (no git: the promoted folder
is the prod model). The equal one is promoted, the worse one refused by the paired test.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from rmpipe.core.settings import ExportSettings
from rmpipe.export.promotion import Baseline, Scores, battery_regressions, paired_comparison, promotion_decision
from test_train import backbone, make_pairs, make_project, paths_in  # noqa: F401 - backbone is a fixture


def settings(tolerance: float = 0.01, regressions: int = 0) -> ExportSettings:
    return ExportSettings(out_dir=Path("e"), promoted_dir=Path("p"), parity_tolerance=1e-4, golden_pairs=2,
                          promotion_tolerance=tolerance, max_battery_regressions=regressions)


# --- the statistics -------------------------------------------------------------------------------
def test_paired_comparison_counts_discordant_pairs_and_bounds_the_difference():
    prod = np.array([True] * 90 + [False] * 10)
    cand = prod.copy()
    cand[:3] = False  # prod right, candidate wrong: c = 3
    cand[95:] = True  # candidate right, prod wrong: b = 5
    t = paired_comparison(cand, prod, tolerance=0.01, alpha=0.05)
    assert (t["n"], t["b"], t["c"]) == (100, 5, 3)
    assert t["accuracy_diff"] == pytest.approx(0.02) and t["candidate_accuracy"] == pytest.approx(0.92)
    assert t["mcnemar_p"] == pytest.approx(0.8555, abs=1e-3)  # P(X >= 3), X ~ Bin(8, 1/2)
    assert t["ci"][0] < 0.02 < t["upper_bound"] and not t["significantly_worse"]
    assert paired_comparison(cand, prod, 0.01, 0.05) == t  # seeded: the same inputs, the same decision

    worse = prod.copy()
    worse[:30] = False  # 30 pairs prod gets right, the candidate wrong, none the other way
    w = paired_comparison(worse, prod, tolerance=0.01, alpha=0.05)
    assert (w["b"], w["c"]) == (0, 30) and w["significantly_worse"] and w["upper_bound"] < -0.01
    assert w["mcnemar_p"] == pytest.approx(0.5 ** 30)
    same = paired_comparison(prod, prod, 0.0, 0.05)
    assert (same["b"], same["c"], same["upper_bound"], same["mcnemar_p"]) == (0, 0, 0.0, 1.0)
    assert not same["significantly_worse"]  # equal is never significantly worse, even with no margin


def test_one_wrong_pair_in_two_hundred_is_within_the_tolerance_not_a_refusal():
    prod = np.ones(200, dtype=bool)
    cand = prod.copy()
    cand[0] = False
    assert not paired_comparison(cand, prod, tolerance=0.01, alpha=0.05)["significantly_worse"]


def test_the_battery_is_judged_by_sign_relative_to_prod():
    prod = {"a": 0.2, "b": 3.0, "c": -0.5, "d": 0.01}
    cand = {"a": 0.001, "b": -0.1, "c": 0.4, "d": 5.0}  # every margin smaller or larger: only b flipped sign
    result = battery_regressions(cand, prod)
    assert result["regressions"] == ["b"] and result["improvements"] == ["c"]
    passed = {"accuracy": 0.9, "passed": True, "checks": {}}
    base = Baseline(Scores(np.ones(20, dtype=bool), prod), "v0.0.1", "models/promoted")
    refused = promotion_decision(passed, Scores(np.ones(20, dtype=bool), cand), base, settings())
    assert not refused["promoted"] and refused["reason"].startswith("battery regression vs prod v0.0.1: b ")
    allowed = promotion_decision(passed, Scores(np.ones(20, dtype=bool), cand), base, settings(regressions=1))
    assert allowed["promoted"] and "McNemar b=0 c=0" in allowed["reason"]


def test_no_version_in_prod_promotes_a_candidate_that_passed_and_never_one_that_failed():
    s = settings()
    first = promotion_decision({"accuracy": 0.6, "passed": True, "checks": {}}, None, None, s, "no version in prod")
    assert first["promoted"] and first["reason"].startswith("passed; no previously promoted model")
    failed = promotion_decision({"accuracy": 0.99, "passed": False, "checks": {"accuracy": True, "padding_canary": False}},
                                None, None, s)
    assert not failed["promoted"] and failed["reason"] == "evaluation failed: padding_canary"


# --- real tiny models through the real stages ---------------------------------------------------------
TOY_BATTERY = [{"name": f"toy-{i}", **{k: r[k] for k in ("prompt", "chosen", "rejected")}}
               for i, r in enumerate(make_pairs(6, 7).to_dict("records"))]


def build(folder: Path, backbone_dir: Path, **train) -> Path:
    """Train with the real train stage, then write the test split and the battery the evaluate stage reads."""
    from stages.train import run as train_run

    project = make_project(folder, backbone_dir, n_train=64, **train)
    params = yaml.safe_load((project / "params.yaml").read_text())
    # toy preferences: the chosen answer is always the longer one, so the length check would flag any model;
    # accuracy and the battery are left to the gate (the point here is the comparison with prod, not evaluate's
    # own floor, which alone would refuse the lr 1e-12 model before any comparison)
    params["evaluate"].update({"battery_file": "data/battery.jsonl", "max_length_r2": 1.0, "min_accuracy": 0.0,
                               "max_battery_failures": len(TOY_BATTERY)})
    params["export"]["golden_pairs"] = 4
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    make_pairs(60, 3).assign(agreement=1.0, batch_ids=[["toy.jsonl"]] * 60).to_parquet(project / "data/split/test.parquet")
    for name in ("train", "val"):
        frame = __import__("pandas").read_parquet(project / f"data/split/{name}.parquet")
        frame.assign(agreement=1.0, batch_ids=[["toy.jsonl"]] * len(frame)).to_parquet(project / f"data/split/{name}.parquet")
    (project / "data/battery.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TOY_BATTERY))
    train_run(str(project / "params.yaml"), paths_in(project))
    return project


def evaluate_and_export(project: Path) -> dict:
    from stages import evaluate as evaluate_stage
    from stages import export as export_stage

    with contextlib.chdir(project):
        evaluate_stage.run()
        return export_stage.run()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, backbone):  # noqa: F811 - the fixture imported above
    tmp = tmp_path_factory.mktemp("gate")
    prod = build(tmp / "prod", backbone, seed=0)
    first = evaluate_and_export(prod)
    return {"prod": prod, "first": first, "equal": build(tmp / "equal", backbone, seed=1),
            "worse": build(tmp / "worse", backbone, seed=0, lr=1e-12)}


def against_prod(trained: dict, name: str) -> dict:
    project = trained[name]
    shutil.copytree(trained["prod"] / "models/promoted", project / "models/promoted")
    return evaluate_and_export(project)["promotion"]


@pytest.mark.slow
def test_the_first_model_is_promoted_an_equal_one_too_and_a_clearly_worse_one_refused(trained):
    first = trained["first"]["promotion"]
    assert first["promoted"] and first["reason"].startswith("passed; no previously promoted model")
    assert "registry unavailable: not a git repository" in first["baseline_note"]

    equal = against_prod(trained, "equal")
    assert equal["promoted"] and "paired_test" in equal, equal
    t = equal["paired_test"]
    assert equal["reason"].startswith("passed; not significantly worse than the promoted model")
    assert t["n"] == 60 and t["candidate_accuracy"] >= 0.9 and t["prod_accuracy"] >= 0.9
    assert t["upper_bound"] >= -0.01 and f"b={t['b']} c={t['c']}" in equal["reason"]

    worse = against_prod(trained, "worse")
    assert not worse["promoted"] and worse["reason"].startswith("significantly worse than the promoted model"), worse
    w = worse["paired_test"]
    assert w["n"] == 60 and w["c"] > w["b"] and w["upper_bound"] < -0.01 and w["mcnemar_p"] < 0.05
    assert w["prod_accuracy"] == pytest.approx(t["prod_accuracy"])  # prod re-scored on the same pairs both times
    # the promoted copy is still prod
    promoted = json.loads((trained["worse"] / "models/promoted/lineage.json").read_text())
    assert promoted["created_at"] == trained["first"]["created_at"]
    assert os.path.exists(trained["equal"] / "models/promoted/promotion.json")
