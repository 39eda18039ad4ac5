"""Where a training step goes: forward, backward and optimizer time per batch layout, one process, no DeepSpeed.

Usage:  .venv/bin/python bench/step_profile.py [--backbone smollm2|tiny] [--batch-pairs 4] [--batches 3]

Takes B pairs of the long-prompt set (bench/long_prompts.py) per batch and times, for each layout of
`rmpipe.model.packing` plus "random" (the stacked layout on pairs in arbitrary order, as a trainer without length
bucketing pads them): forward, backward and an AdamW step (median over batches, after one warm-up), with the
tokens each layout computes. The layouts run interleaved on the same batches, so their ratios are comparable.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from long_prompts import make_long_pairs  # noqa: E402
from rmpipe.model.backbones import SMOLLM2_CACHE, load_backbone, materialize_smollm2  # noqa: E402
from rmpipe.model.batching import plan_batches  # noqa: E402
from rmpipe.model.render import tokenize_pairs  # noqa: E402
from rmpipe.model.packing import make_batch  # noqa: E402
from rmpipe.model.reward_model import RewardModel, bradley_terry_loss  # noqa: E402

LAYOUTS = ("random", "none", "padding_free", "shared_prompt")


def timed_step(model, optimizer, batch) -> dict[str, float]:
    t0 = time.perf_counter()
    r_chosen, r_rejected = model(**batch.inputs).chunk(2)
    loss = bradley_terry_loss(r_chosen, r_rejected)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "total": t3 - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="smollm2", help="smollm2 or a Hugging Face folder")
    parser.add_argument("--batch-pairs", type=int, default=4)
    parser.add_argument("--batches", type=int, default=3)
    args = parser.parse_args()
    folder = materialize_smollm2(ROOT / SMOLLM2_CACHE) if args.backbone == "smollm2" else Path(args.backbone)
    backbone, tokenizer = load_backbone(folder)
    torch.manual_seed(0)
    model = RewardModel.from_backbone(backbone, seed=0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-9, betas=(0.9, 0.95))  # tiny lr: weights barely move

    n = args.batch_pairs * (args.batches + 1)
    pairs = tokenize_pairs(tokenizer, make_long_pairs(n, 0, tokenizer), 1024)
    bucketed = plan_batches(pairs.lengths(), 10**9, args.batch_pairs, seed=0)
    in_order = [list(range(i, i + args.batch_pairs)) for i in range(0, n, args.batch_pairs)]
    times: dict[str, list[dict[str, float]]] = {layout: [] for layout in LAYOUTS}
    tokens: dict[str, list[int]] = {layout: [] for layout in LAYOUTS}
    for b in range(args.batches + 1):
        for layout in LAYOUTS:
            rows = in_order[b] if layout == "random" else bucketed[b]
            batch = make_batch(pairs, rows, "none" if layout == "random" else layout, tokenizer.pad_token_id)
            step = timed_step(model, optimizer, batch)
            if b:  # the first round warms allocators up
                times[layout].append(step)
                tokens[layout].append(batch.computed_tokens)
            print(f"batch {b} {layout:14s} {step['total']:.2f} s", flush=True)

    print(f"\n{args.backbone}, {args.batch_pairs} pairs per batch, median of {args.batches} batches:")
    print(f"{'layout':14s} {'tokens':>8s} {'forward s':>10s} {'backward s':>11s} {'optimizer s':>12s} {'step s':>8s}"
          f" {'vs random':>10s}")
    base = statistics.median(t["total"] for t in times["random"])
    for layout in LAYOUTS:
        med = {k: statistics.median(t[k] for t in times[layout]) for k in ("forward", "backward", "optimizer", "total")}
        print(f"{layout:14s} {int(np.median(tokens[layout])):8d} {med['forward']:10.2f} {med['backward']:11.2f}"
              f" {med['optimizer']:12.2f} {med['total']:8.2f} {base / med['total']:9.2f}x")


if __name__ == "__main__":
    main()
