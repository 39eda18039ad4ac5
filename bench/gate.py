"""The promotion gate's error rates: false refusals of equal models, and damaged candidates let through.

    python bench/gate.py [--seeds 8] [--out bench/gate.json]

One plain copy of this project (default params, the bundled sample, the tiny backbone) runs its data
stages once. The model in prod is trained with train.seed 0, evaluated and exported by the real
stages (the first export is promoted). Then each candidate is trained by the real train stage and
judged by the real gate (`rmpipe.export.export.gate`: the same code the export stage runs) against it:

* `--seeds` default runs that differ only in train.seed (1..N): each should be promoted;
* damaged runs, each should be refused: 30% of the training pairs' labels flipped; lr 1e-12; and a
  model whose pooling reads the first pad position instead of the last real token. That damage
  exists only here: the model is trained through the core API with the train stage's RewardModel
  swapped for a subclass (`PadPooling`), and evaluated and gated as that subclass.

Each candidate runs in its own process (a fresh DeepSpeed group); nothing here touches the product.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FLIP_SHARE = 0.3


def project_copy(dest: Path) -> Path:
    """The project's git-tracked files (no batches, tests or benches), DVC without git, the sample batches."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if not rel.startswith(("data/incoming/", "tests/", "bench/")) and (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    (dest / "data/incoming").mkdir(parents=True, exist_ok=True)
    if not (dest / ".dvc").is_dir():
        run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], dest)
    run([sys.executable, "-m", "dvc", "config", "--local", "core.no_scm", "true"], dest)
    run([sys.executable, "-m", "pipeline.cli", "sample-data"], dest)
    return dest


def run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def set_params(project: Path, **train: object) -> None:
    import yaml

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"].update(train)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


# --- one candidate, in its own process -------------------------------------------------------------
def candidate(spec: dict) -> dict:
    """Train (real train stage), evaluate and gate one candidate in the current directory."""
    import numpy as np
    import pandas as pd
    import torch

    import stages.train as train_stage
    from rmpipe.core.params import load_params
    from rmpipe.core.paths import ProjectPaths, read_splits
    from rmpipe.core.settings import EvalSettings, ExportSettings, ModelSettings
    from rmpipe.evaluation.evaluate import evaluate_model, load_checkpoint
    from rmpipe.evaluation.pathology import load_battery
    from rmpipe.export.export import gate
    from rmpipe.export.promotion import baseline, battery_regressions, candidate_scores, paired_comparison
    from rmpipe.model.reward_model import RewardModel, last_real_token_index

    class PadPooling(RewardModel):
        """The damage: read the position after the last real token (a pad, in every padded row)."""

        def forward(self, input_ids, attention_mask, position_ids=None, read_at=None):
            if read_at is not None:
                return super().forward(input_ids, attention_mask, position_ids, read_at)
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            at = (last_real_token_index(attention_mask) + 1).clamp(max=input_ids.shape[1] - 1)
            pooled = out.last_hidden_state[torch.arange(input_ids.shape[0]), at]
            return self.head(pooled.to(self.head.weight.dtype)).squeeze(-1)

    paths = ProjectPaths()
    shutil.rmtree(paths.model_dir, ignore_errors=True)
    shutil.rmtree("checkpoints/train", ignore_errors=True)  # never resume another candidate's run
    train_file = Path(paths.train_split)
    original = train_file.read_bytes()
    try:
        if spec.get("flip"):
            frame = pd.read_parquet(train_file)
            flip = np.random.default_rng(1).random(len(frame)) < FLIP_SHARE
            frame.loc[flip, ["chosen", "rejected"]] = frame.loc[flip, ["rejected", "chosen"]].to_numpy()
            frame.to_parquet(train_file, index=False)
        if spec.get("pad_pooling"):
            train_stage.RewardModel = PadPooling
        started = time.perf_counter()
        train_stage.run()
        train_s = time.perf_counter() - started
    finally:
        train_file.write_bytes(original)
    params = load_params("params.yaml")
    model_s, eval_s, export_s = ModelSettings.parse(params), EvalSettings.parse(params), ExportSettings.parse(params)
    model, tokenizer = load_checkpoint(paths.model_dir)
    if spec.get("pad_pooling"):
        model.__class__ = PadPooling  # the trained weights, read the way they were trained
    splits = read_splits(paths, ("test", "val"))
    battery = load_battery(eval_s.battery_file)
    result = evaluate_model(model, tokenizer, splits["test"], splits["val"], battery, eval_s, model_s.max_length)
    decision = gate(model, tokenizer, splits["test"], battery, result.metrics, result.pathology, export_s, model_s,
                    eval_s.batch_size, Path("."))
    # The paired test alone, whatever evaluate said (a candidate failing its own evaluation never reaches it in
    # the gate): how far below prod it is on the same pairs.
    prod, _ = baseline(Path("."), export_s, splits["test"], battery, eval_s.batch_size)
    margins = {r["name"]: r["margin"] for r in result.pathology["battery"]["results"]}
    scores = candidate_scores(model, tokenizer, splits["test"], margins, model_s.max_length, eval_s.batch_size)
    alone = paired_comparison(scores.correct, prod.scores.correct, export_s.promotion_tolerance, export_s.promotion_alpha)
    m = result.metrics
    return {**spec, "paired_test_alone": alone,
            "battery_regressions_alone": battery_regressions(scores.battery, prod.scores.battery)["regressions"], "train_s": round(train_s, 1), "accuracy": m["accuracy"], "passed": m["passed"],
            "failed_checks": [k for k, ok in m["checks"].items() if not ok],
            "battery_below_min_margin": m["battery_below_min_margin"], "promoted": decision["promoted"],
            "reason": decision["reason"], "paired_test": decision.get("paired_test"),
            "battery": decision.get("battery")}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8, help="equal candidates: train.seed 1..N")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--damaged-only", action="store_true", help="only the damaged candidates")
    parser.add_argument("--keep", default=None, help="build the project here and keep it (default: a temp folder)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one candidate (JSON spec)
    args = parser.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(candidate(json.loads(args.one)), default=str))
        return
    work = Path(args.keep or tempfile.mkdtemp(prefix="rmpipe-bench-gate-"))
    project = project_copy(work / "project")
    started = time.perf_counter()
    set_params(project, seed=0)
    run([sys.executable, "-m", "dvc", "repro"], project)  # prod: the real pipeline, promoted as the first export
    manifest = json.loads((project / "models/promoted/lineage.json").read_text())
    print(f"prod (seed 0): accuracy {manifest['evaluation']['accuracy']:.4f}, {manifest['promotion']['reason']}",
          flush=True)
    specs = [{"kind": "equal", "seed": s} for s in range(1, args.seeds + 1)]
    specs += [{"kind": "labels 30% flipped", "seed": 0, "flip": True}, {"kind": "lr 1e-12", "seed": 0, "lr": 1e-12},
              {"kind": "pooling reads the pad", "seed": 0, "pad_pooling": True}]
    if args.damaged_only:
        specs = [s for s in specs if s["kind"] != "equal"]
    results = []
    for spec in specs:
        set_params(project, seed=spec["seed"], lr=spec.get("lr", 3.0e-3))
        out = run([sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec)], project)
        result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
        results.append(result)
        t = result["paired_test_alone"]
        print(f"{result['kind']:<22} seed {result['seed']}: accuracy {result['accuracy']:.4f} "
              f"{'PROMOTED' if result['promoted'] else 'refused '} | paired test alone: b={t['b']} c={t['c']} "
              f"diff={t['accuracy_diff']:+.4f} upper={t['upper_bound']:+.4f} p={t['mcnemar_p']:.2g} "
              f"battery regressions {len(result['battery_regressions_alone'])} | {result['reason']}", flush=True)
    equal = [r for r in results if r["kind"] == "equal"]
    damaged = [r for r in results if r["kind"] != "equal"]
    summary = {"false_refusals": sum(not r["promoted"] for r in equal), "equal_runs": len(equal),
               "damaged_refused": sum(not r["promoted"] for r in damaged), "damaged_runs": len(damaged),
               "prod_accuracy": manifest["evaluation"]["accuracy"], "wall_s": round(time.perf_counter() - started),
               "results": results}
    print(f"false refusals {summary['false_refusals']} of {len(equal)}; damaged refused "
          f"{summary['damaged_refused']} of {len(damaged)}; {summary['wall_s']} s")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2, default=str))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
