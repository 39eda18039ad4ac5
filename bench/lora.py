"""Benchmark: LoRA (r = 8, 16) against full fine-tuning with rmpipe's real trainer, same pairs, side by side.

Usage:  .venv/bin/python bench/lora.py [--backbone smollm2|tiny] [--batch-pairs 8] [--steps 30] [--held-out 200]
            [--ranks 8,16] [--lr-full 1e-5] [--lr-lora 1e-4] [--max-length 256] [--out results.json] [--keep DIR]

Each configuration is `python -m stages.train` in its own process and project folder, on the same pairs:
B x N pairs of the bundled sample's train split (the project's own stages make it), one epoch of N steps
of exactly B pairs, then the trainer's own evaluation of `--held-out` pairs of the sample's *test* split
(given to it as its validation split: no prompt of it was trained on). Reported per configuration:
  trainable / total   parameters that receive gradients (LoRA: the adapters and the reward head)
  peak RSS            the training process's own (os.wait4 ru_maxrss): weights, gradients, AdamW state, activations
  pairs/s             steady state: every step but the first (rmpipe's per-step log)
  held-out accuracy   strict (r_chosen > r_rejected) on the held-out pairs, after the N steps
  loss                the mean of the last 3 steps' training loss
Learning rates differ on purpose: each is what its method is run at (TRL: 1e-5 for full fine-tuning, 1e-4
with LoRA); LoRA targets q, k, v, o (params.yaml's default), alpha = 2 r.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from train_throughput import (
    BIG_BUDGET,
    log,
    run_child,
    sample_splits,
    smollm2_folder,
    tiny_folder,
)

RMPIPE_LIVE = Path("dvclive/train/plots/metrics/train")


def params_for(backbone: Path, args, rank: int) -> dict:
    """params.yaml with one epoch of exactly `--batch-pairs` pairs per step; `rank` 0 = full fine-tuning."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(backbone=str(backbone), max_length=args.max_length)
    params["train"].update(
        epochs=1, lr=args.lr_lora if rank else args.lr_full, seed=0, max_pairs_per_batch=args.batch_pairs,
        tokens_per_batch=BIG_BUDGET, warmup_ratio=0.1, checkpoint_every=10**6, num_procs=1, hostfile=None,
        zero_stage=0, offload_optimizer=False, deepspeed_config=None, bf16=False, packing="shared_prompt",
        lora={"r": rank, "alpha": float(2 * rank or 16), "dropout": 0.0,
              "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]})
    return params


def run_config(name: str, rank: int, backbone: Path, train: pd.DataFrame, held_out: pd.DataFrame, args,
               where: Path) -> dict:
    folder = where / name.replace(" r=", "-r")
    (folder / "data/split").mkdir(parents=True, exist_ok=True)
    train.to_parquet(folder / "data/split/train.parquet")
    held_out.to_parquet(folder / "data/split/val.parquet")
    (folder / "params.yaml").write_text(yaml.safe_dump(params_for(backbone, args, rank)))
    log(f"{name}: training {len(train)} pairs in {args.steps} steps, then scoring {len(held_out)} held-out pairs")
    child = run_child([sys.executable, "-m", "stages.train"], folder, folder / "train.log")
    if child.code != 0:
        sys.exit(f"{name} failed: {(folder / 'train.log').read_text(errors='replace')[-3000:]}")
    record = json.loads((folder / "models/reward_model/training.json").read_text())
    rates = pd.read_csv(folder / RMPIPE_LIVE / "pairs_per_s.tsv", sep="\t")["pairs_per_s"].tolist()[1:]
    losses = pd.read_csv(folder / RMPIPE_LIVE / "loss.tsv", sep="\t")["loss"].tolist()
    return {"config": name, "trainable": record["trainable_parameters"], "total": record["total_parameters"],
            "peak_rss_gb": round(child.rss_mb / 1024, 2), "pairs_per_s": round(len(rates) / sum(1 / r for r in rates), 3),
            "held_out_accuracy": round(record["val"]["accuracy"], 4), "held_out_pairs": len(held_out),
            "loss_last3": round(sum(losses[-3:]) / 3, 4), "wall_s": round(child.wall_s, 1),
            "other_cores": round(child.others_cores, 2)}


def table(rows: list[dict]) -> str:
    full = next((r for r in rows if r["config"] == "full"), rows[0])
    lines = ["| config | trainable / total params | peak RSS | pairs/s | held-out accuracy | loss (last 3) | wall |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['trainable']:,} / {r['total']:,} ({100 * r['trainable'] / r['total']:.2f}%) "
                     f"| {r['peak_rss_gb']:.2f} GB ({r['peak_rss_gb'] / full['peak_rss_gb']:.2f}x) "
                     f"| {r['pairs_per_s']:.2f} ({r['pairs_per_s'] / full['pairs_per_s']:.2f}x) "
                     f"| {r['held_out_accuracy']:.3f} (n={r['held_out_pairs']}) | {r['loss_last3']:.3f} | {r['wall_s']:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--batch-pairs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--held-out", type=int, default=200)
    parser.add_argument("--ranks", default="8,16")
    parser.add_argument("--no-full", action="store_true", help="LoRA runs only (e.g. another --lr-lora)")
    parser.add_argument("--lr-full", type=float, default=1e-5)
    parser.add_argument("--lr-lora", type=float, default=1e-4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--keep", type=Path, help="keep the run folders here (default: a temp folder, removed)")
    args = parser.parse_args(argv)

    where = args.keep or Path(tempfile.mkdtemp(prefix="rmpipe-bench-lora-"))
    train, test = sample_splits(where / "sample")
    test = pd.read_parquet(where / "sample/data/split/test.parquet")
    n = args.batch_pairs * args.steps
    if len(train) < n or len(test) < args.held_out:
        sys.exit(f"the sample has {len(train)} train / {len(test)} test pairs: fewer than {n} / {args.held_out}")
    backbone = smollm2_folder() if args.backbone == "smollm2" else tiny_folder(train, args.max_length)
    train, held_out = train.head(n).reset_index(drop=True), test.head(args.held_out).reset_index(drop=True)
    configs = [("full", 0)] * (not args.no_full) + [(f"lora r={r}", int(r)) for r in args.ranks.split(",")]
    rows = [run_config(name, rank, backbone, train, held_out, args, where) for name, rank in configs]
    log(f"\n{args.backbone}, {n} pairs ({args.steps} steps x {args.batch_pairs}), max_length {args.max_length}, "
        f"lr full {args.lr_full} / LoRA {args.lr_lora}\n" + table(rows))
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    if not args.keep:
        shutil.rmtree(where, ignore_errors=True)


if __name__ == "__main__":
    main()
