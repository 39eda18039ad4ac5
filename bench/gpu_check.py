"""GPU check: rmpipe's real trainer on SmolLM2 in bf16, each packing layout, full fine-tuning and LoRA.

Usage:  .venv/bin/python bench/gpu_check.py [--steps 20] [--batch-pairs 16] [--max-length 512] [--lora-r 16]
            [--layouts none,padding_free,shared_prompt,groups] [--peak-tflops T] [--keep DIR]

Needs a CUDA device; on a machine without one it prints one line and exits 2. Each run is
`python -m stages.train` (bf16: true, DeepSpeed ZeRO-0) in its own process and project folder, on the
same B x N pairs of the bundled sample (made by the project's own stages); a run prints
  tokens/s      real (non-pad) tokens per second of training steps, all steps (the trainer's own figure:
                the first step's warm-up included, so use --steps 20 or more)
  peak memory   torch.cuda.max_memory_allocated of the training process
  MFU           6 x parameters x tokens/s over the device's dense bf16 peak (attention FLOPs left out,
                so a lower bound; LoRA counts the same 6 N: the frozen weights still run forward and backward)
With two or more devices it also runs the 2-rank ZeRO-3 path (DeepSpeed launcher, NCCL), shared_prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# Dense bf16 peak per device (TFLOP/s, without sparsity), by a substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0, "4090": 165.0}
MEMORY_FILE = "gpu_memory.json"


def child(params_file: str) -> None:
    """The training process: the train stage in-process, then its peak CUDA memory written beside the params."""
    import torch

    from stages.train import main

    cuda = torch.cuda.is_available()  # not so only under --plumbing-on-cpu
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    main(["--params", params_file])
    if cuda:
        Path(params_file).with_name(MEMORY_FILE).write_text(json.dumps({"peak_bytes": torch.cuda.max_memory_allocated()}))


def peak_tflops(override: float | None) -> tuple[float, str]:
    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    if override:
        return override, name
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), float("nan")), name


def run_layout(where: Path, name: str, backbone: Path, train, val, args, **train_params) -> dict:
    import yaml
    from train_throughput import BIG_BUDGET, run_child

    folder = where / name
    (folder / "data/split").mkdir(parents=True, exist_ok=True)
    train.to_parquet(folder / "data/split/train.parquet")
    val.to_parquet(folder / "data/split/val.parquet")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(backbone=str(backbone), max_length=args.max_length)
    params["train"].update(epochs=1, lr=1e-5, seed=0, bf16=not args.plumbing_on_cpu, max_pairs_per_batch=args.batch_pairs,
                           tokens_per_batch=BIG_BUDGET, checkpoint_every=10**6, zero_stage=0, num_procs=1,
                           **train_params)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = ([sys.executable, "-m", "stages.train"] if params["train"]["num_procs"] > 1
           else [sys.executable, str(Path(__file__).resolve()), "--child", str(folder / "params.yaml")])
    done = run_child(cmd, folder, folder / "train.log")
    if done.code != 0:
        return {"run": name, "error": (folder / "train.log").read_text(errors="replace")[-1500:]}
    record = json.loads((folder / "models/reward_model/training.json").read_text())
    memory = folder / MEMORY_FILE
    peak = json.loads(memory.read_text())["peak_bytes"] / 2**30 if memory.exists() else float("nan")
    return {"run": name, "packing": record["packing"], "tokens_per_s": record["tokens_per_s"],
            "peak_gib": peak, "params": record["total_parameters"], "trainable": record["trainable_parameters"],
            "val_accuracy": record["val"].get("accuracy"), "world_size": record["world_size"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-pairs", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--layouts", default="none,padding_free,shared_prompt,groups")
    parser.add_argument("--peak-tflops", type=float)
    parser.add_argument("--backbone", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--keep", type=Path)
    parser.add_argument("--plumbing-on-cpu", action="store_true",
                        help="run anyway on CPU in fp32 (checks the script itself; the figures mean nothing)")
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    import torch

    if not torch.cuda.is_available() and not args.plumbing_on_cpu:
        print("gpu_check: no CUDA device on this machine (torch.cuda.is_available() is False): "
              "run it where `nvidia-smi` lists a GPU and torch is a CUDA build", file=sys.stderr)
        return 2
    from train_throughput import sample_splits, smollm2_folder, tiny_folder

    where = args.keep or Path(tempfile.mkdtemp(prefix="rmpipe-gpu-check-"))
    train, val = sample_splits(where / "sample")
    train, val = train.head(args.batch_pairs * args.steps), val.head(4 * args.batch_pairs)
    backbone = smollm2_folder() if args.backbone == "smollm2" else tiny_folder(train, args.max_length)
    peak, device = peak_tflops(args.peak_tflops)
    lora = {"r": args.lora_r, "alpha": 2.0 * args.lora_r, "dropout": 0.0,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    runs = [(f"{layout}", {"packing": layout}) for layout in args.layouts.split(",")]
    runs += [(f"{layout}+lora{args.lora_r}", {"packing": layout, "lora": lora}) for layout in args.layouts.split(",")]
    if torch.cuda.device_count() >= 2:
        runs.append(("zero3-2rank", {"packing": "shared_prompt", "num_procs": 2, "zero_stage": 3}))
    print(f"{device}: {torch.cuda.device_count()} device(s), bf16 peak {peak} TFLOP/s; {args.backbone}, "
          f"{len(train)} pairs ({args.steps} steps x {args.batch_pairs}), max_length {args.max_length}", flush=True)
    failed = 0
    for name, settings in runs:
        row = run_layout(where, name, backbone, train, val, args, **settings)
        if "error" in row:
            failed += 1
            print(f"{name}: FAILED\n{row['error']}", flush=True)
            continue
        mfu = 6 * row["params"] * row["tokens_per_s"] / (peak * 1e12)
        print(f"{name:<24} packing {row['packing']:<13} tokens/s {row['tokens_per_s']:>10.0f}  peak {row['peak_gib']:6.2f} GiB"
              f"  MFU {100 * mfu:5.1f}%  trainable {row['trainable']:,}/{row['params']:,}  ranks {row['world_size']}"
              f"  val acc {row['val_accuracy']:.3f}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
