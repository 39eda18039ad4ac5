"""Benchmark: FlexAttention (block masks: masked blocks are skipped) vs SDPA with a dense mask, for rmpipe's
packed layouts, forward + backward of one training batch on this machine.

Usage:  .venv/bin/python bench/flex_attention.py [--backbone tiny|smollm2] [--groups 4] [--repeats 3]
                                                 [--layouts groups,shared_prompt]

The batch is `long4` of bench/train_throughput.py (K = 4 long multi-turn prompts, all 6 comparisons each),
laid out by `rmpipe.model.packing.make_batch`. SDPA gets the (R, 1, W, W) boolean mask the trainer passes today;
flex_attention (transformers' implementation, which runs torch's compiled `flex_attention`) gets a
`BlockMask` whose rule is that same mask (so it allows exactly the same pairs of positions; the 128 x 128
blocks it never allows are skipped). Both are
checked against the stacked layout's rewards (fp32), then the forward pass is timed (the first call, which
compiles, apart; the median of the rest), and one forward + backward is tried (torch 2.13 has no flex
backward on CPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layouts", default="groups,shared_prompt")
    args = parser.parse_args(argv)

    import torch

    from long_prompts import make_long_groups
    from rmpipe.model.backbones import load_backbone
    from rmpipe.model.render import tokenize_pairs
    from rmpipe.model.packing import make_batch
    from rmpipe.model.reward_model import RewardModel, bradley_terry_loss
    from train_throughput import sample_splits, smollm2_folder, tiny_folder

    torch.manual_seed(0)
    if args.backbone == "smollm2":
        folder = smollm2_folder()
    else:
        import tempfile

        folder = tiny_folder(sample_splits(Path(tempfile.mkdtemp(prefix="rmpipe-flex-")))[0], 1024)
    results = {}
    for impl in ("sdpa", "flex_attention"):
        backbone, tokenizer = load_backbone(folder)
        backbone.config._attn_implementation = impl
        model = RewardModel.from_backbone(backbone, seed=0)
        pairs = tokenize_pairs(tokenizer, make_long_groups(args.groups, 0, tokenizer), 1024)
        rows = list(range(len(pairs)))
        with torch.no_grad():
            backbone.config._attn_implementation = "sdpa"
            reference = model(**make_batch(pairs, rows, "none", tokenizer.pad_token_id).inputs)
            backbone.config._attn_implementation = impl
        for layout in args.layouts.split(","):
            batch = make_batch(pairs, rows, layout, tokenizer.pad_token_id)
            inputs = dict(batch.inputs)
            if impl == "flex_attention":
                inputs["attention_mask"] = flex_mask(batch.inputs["attention_mask"])
            fwd, error = [], None
            with torch.no_grad():
                for k in range(args.repeats + 1):
                    t0 = time.perf_counter()
                    rewards = model_forward(model, inputs)
                    fwd.append(time.perf_counter() - t0)
            error = float((rewards - reference).abs().max())
            try:  # training needs the backward pass
                model.zero_grad()
                t0 = time.perf_counter()
                r_c, r_r = model_forward(model, inputs).chunk(2)
                bradley_terry_loss(r_c, r_r).backward()
                train_step = f"{time.perf_counter() - t0:.3f} s"
            except NotImplementedError as exc:
                train_step = f"not supported ({str(exc).split('.')[0]})"
            results[(impl, layout)] = statistics.median(fwd[1:])
            print(f"{impl:>15} {layout:>14}: {batch.computed_tokens} positions, max |dr| vs stacked {error:.1e}; forward "
                  f"first call {fwd[0]:.2f} s, median {statistics.median(fwd[1:]):.3f} s ({args.repeats} repeats); "
                  f"forward + backward {train_step}", flush=True)
    for layout in args.layouts.split(","):
        sdpa, flex = results[("sdpa", layout)], results[("flex_attention", layout)]
        print(f"{layout}: forward flex / sdpa {flex / sdpa:.2f} (sdpa {sdpa:.3f} s, flex {flex:.3f} s)")


def flex_mask(allowed):
    """A BlockMask whose rule is the dense mask itself (exactly the same pairs of positions)."""
    from torch.nn.attention.flex_attention import create_block_mask

    dense = allowed[:, 0]

    def rule(b, h, q, kv):
        return dense[b, q, kv]

    return create_block_mask(rule, B=dense.shape[0], H=None, Q_LEN=dense.shape[1], KV_LEN=dense.shape[2], device="cpu")


def model_forward(model, inputs):
    """RewardModel.forward without its eager/SDPA mask conversion when the mask is a BlockMask."""
    out = model.backbone(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         position_ids=inputs["position_ids"], use_cache=False)
    pooled = out.last_hidden_state.flatten(0, 1)[inputs["read_at"]]
    return model.head(pooled).squeeze(-1)


if __name__ == "__main__":
    main()
