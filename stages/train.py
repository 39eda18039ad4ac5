"""DVC stage `train`: train/val splits + backbone -> models/reward_model/ + metrics/train.json.

    python -m stages.train [--params params.yaml]

One process runs without any launcher. `train.num_procs > 1` (or a `train.hostfile`) makes this
stage re-run itself under the DeepSpeed launcher with that many ranks; nothing else changes.
Checkpoints go to checkpoints/train/ and a re-run resumes from them when params, data and
backbone are unchanged.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from rmpipe.core.params import PARAMS_FILE, load_params
from rmpipe.core.paths import ProjectPaths, training_splits
from rmpipe.core.settings import ModelSettings, TrainSettings
from rmpipe.core.stage import stage_main
from rmpipe.model.backbones import (
    check_backbone,
    load_backbone,
    max_positions,
    resolve_backbone,
)
from rmpipe.model.lora import trainable_parameters, with_adapters
from rmpipe.model.packing import resolve_packing
from rmpipe.model.reward_model import RewardModel
from rmpipe.training.checkpoint import fingerprint
from rmpipe.training.distributed import (
    RENDEZVOUS_ENV,
    free_port,
    init_distributed,
    leave_distributed,
    make_deterministic,
)
from rmpipe.training.ds_config import bf16_wanted, build_config, load_config
from rmpipe.training.loop import check_max_length, fit, save_outputs, tokenize

log = logging.getLogger("rmpipe.train")

LAUNCHED = "RMPIPE_UNDER_LAUNCHER"


def relaunch(s: TrainSettings, params_file: str) -> int:
    """Re-run this stage under the DeepSpeed launcher (CPU: gloo ranks on this machine)."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    env = {**os.environ, LAUNCHED: "1"}
    if s.hostfile:  # several nodes: a TCP rendezvous on the first host is the only way to meet
        cmd += ["--hostfile", s.hostfile, "--master_port", str(free_port())]
        cmd += ["--module", "stages.train", "--params", params_file]
        log.info("launching %s", " ".join(cmd))
        return subprocess.call(cmd, env=env)
    # One machine: the ranks meet through a file store and talk over loopback, so nothing listens beyond
    # this machine (torch's TCP store binds every interface; gloo binds the interface named here).
    cmd += ["--num_gpus", str(s.num_procs), "--module", "stages.train", "--params", params_file]
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory(prefix="rmpipe-rendezvous-") as folder:
        env[RENDEZVOUS_ENV] = folder
        log.info("launching %s", " ".join(cmd))
        return subprocess.call(cmd, env=env)


def run(params_file: str | Path = PARAMS_FILE, paths: ProjectPaths = ProjectPaths()) -> dict | None:
    params = load_params(params_file)
    m, s = ModelSettings.parse(params), TrainSettings.parse(params)
    if (s.num_procs > 1 or s.hostfile) and LAUNCHED not in os.environ:
        code = relaunch(s, params_file)
        if code:
            sys.exit(code)
        return None

    # Everything a user can get wrong, before any compute.
    train_frame, val_frame = training_splits(paths)
    backbone_dir = resolve_backbone(m, Path.cwd())
    config, _ = check_backbone(backbone_dir, m.trust_remote_code)
    max_length = check_max_length(m.max_length, max_positions(config), str(backbone_dir))

    rank, world = init_distributed()
    make_deterministic(s.seed, world)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = bf16_wanted(s.bf16, device)
    backbone, tokenizer = load_backbone(backbone_dir, torch.float32, m.trust_remote_code)
    model = with_adapters(RewardModel.from_backbone(backbone, m.head_init, seed=s.seed), s.lora)  # r 0: as is
    trainable, total = trainable_parameters(model)
    data = tokenize(tokenizer, backbone_dir, paths, train_frame, val_frame, max_length)
    packing, packing_errors = resolve_packing(s.packing, model, data.train, data.pad_id)
    if rank == 0:
        log.info("trainable parameters: %s of %s (%s)", f"{trainable:,}", f"{total:,}",
                 f"LoRA r={s.lora.r} on {', '.join(s.lora.target_modules)}" if s.lora.r else "full fine-tuning")
        log.info("packing: %s%s", packing, "".join(f" | {k} max |dr| {e:.1e}" for k, e in packing_errors.items()))

    ds_config = load_config(s.deepspeed_config, world) if s.deepspeed_config else build_config(s, world, bf16)
    fp = fingerprint(m, s, paths.train_split, backbone_dir, world)  # the params as written (packing: auto)
    result = fit(model, data, s.model_copy(update={"packing": packing}), paths, fp, ds_config, rank, world)
    if result.stopped_early:
        log.warning("stopped after %d steps (train.stop_after_steps): no model written", result.steps)
        return None
    record = {"params": {"model": m.model_dump(), "train": s.model_dump()}, "fingerprint": fp,
              "backbone": str(backbone_dir), "world_size": world, "packing": packing, "packing_errors": packing_errors,
              "truncated_pairs": data.train.n_truncated + data.val.n_truncated,
              "train_pairs": len(data.train), "val_pairs": len(data.val), "deepspeed_config": ds_config,
              "trainable_parameters": trainable, "total_parameters": total}
    save_outputs(result, model, tokenizer, paths, record, rank, int(ds_config.get("zero_optimization", {}).get("stage", 0)))
    if rank == 0:
        log.info("wrote %s: val accuracy %.3f, %d steps, %.0f pairs/s, %.1f s", paths.model_dir,
                 result.val.get("accuracy", float("nan")), result.steps, result.pairs_per_s, result.wall_s)
    return record


main = stage_main("train", run, __doc__, launched=True)

if __name__ == "__main__":
    # Only a process about to exit leaves the process group (see leave_distributed): not a Prefect worker
    # that calls main() in-process and may train again.
    try:
        main(sys.argv[1:])
    except BaseException:
        leave_distributed(finished=False)
        raise
    leave_distributed(finished=True)
