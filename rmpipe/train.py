"""Reward-model training on a DeepSpeed engine: read top to bottom, one optimizer step per global batch.

    fit(model, tokenizer, data, settings, paths, fingerprint) -> TrainResult

Everything a user can get wrong (missing or empty splits, a backbone that does not load, a
max_length the backbone cannot take) is checked by `read_splits` / `check_max_length` before
any compute. The loop itself:
  * each rank scores its shard of the global batch in ONE forward pass, in the layout
    `train.packing` names (`rmpipe.packing`: stacked rows, padding-free, shared-prompt or group
    packing); a batch holds whole groups (prompts) in the `groups` layout;
  * Bradley-Terry loss (optional margin, soft labels, centering), each pair weighted 1 or, with
    `train.loss_weighting: group`, 1 / (pairs of its prompt); scaled so the mean over ranks is the
    weighted mean over the global batch (`batching.shard_weight`);
  * a non-finite loss on any rank skips the step on every rank; too many abort the run;
  * checkpoints (DeepSpeed `save_checkpoint` + data position + RNG) every `checkpoint_every`
    steps; a run resumes only from a checkpoint with the same fingerprint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from rmpipe import codedeps, io
from rmpipe.batching import TokenizedPairs, Units, plan_batches, shard, shard_weight
from rmpipe.errors import ConfigError, DataError, UserError
from rmpipe.io import sha256_file
from rmpipe.packing import MODES, make_batch
from rmpipe.params import get
from rmpipe.progress import progress
from rmpipe.reward_model import RewardModel, bradley_terry_loss

log = logging.getLogger("rmpipe.train")

LOSS_WEIGHTINGS = ("pair", "group")
LN2 = math.log(2.0)
LN2_CHECK_STEPS = 8  # steps after which a loss still pinned at ln 2 with identical scores is a bug
LATEST = "latest"
STATE_FILE = "rmpipe_state.json"
# Keys of `train:` that do not change the weights a run ends with, so they do not block a resume.
NOT_FINGERPRINTED = ("checkpoint_every", "stop_after_steps", "hostfile", "max_nonfinite_steps")


# --- settings and paths ---------------------------------------------------------------------
@dataclass
class TrainSettings:
    """`params.yaml: train`, type-checked once so the loop can trust it."""

    seed: int
    epochs: int
    lr: float
    head_lr_mult: float
    weight_decay: float
    warmup_ratio: float
    grad_clip: float
    tokens_per_batch: int
    max_pairs_per_batch: int
    use_margin: bool
    use_soft_labels: bool
    center_coef: float
    bf16: bool | str
    gradient_checkpointing: bool
    zero_stage: int
    offload_optimizer: bool
    deepspeed_config: str | None
    num_procs: int
    hostfile: str | None
    checkpoint_every: int
    max_nonfinite_steps: int
    packing: str = "auto"  # resolved to a layout by `rmpipe.packing.resolve_packing` before training
    loss_weighting: str = "pair"  # pair: every comparison counts once; group: every prompt counts once
    stop_after_steps: int | None = None  # debug hook: stop as if killed after this many steps

    @classmethod
    def from_params(cls, cfg: dict[str, Any]) -> "TrainSettings":
        w = "train"
        s = cls(
            seed=get(cfg, "seed", int, w),
            epochs=get(cfg, "epochs", int, w),
            lr=float(get(cfg, "lr", float, w)),
            head_lr_mult=float(get(cfg, "head_lr_mult", float, w)),
            weight_decay=float(get(cfg, "weight_decay", float, w)),
            warmup_ratio=float(get(cfg, "warmup_ratio", float, w)),
            grad_clip=float(get(cfg, "grad_clip", float, w)),
            tokens_per_batch=get(cfg, "tokens_per_batch", int, w),
            max_pairs_per_batch=get(cfg, "max_pairs_per_batch", int, w),
            use_margin=get(cfg, "use_margin", bool, w),
            use_soft_labels=get(cfg, "use_soft_labels", bool, w),
            center_coef=float(get(cfg, "center_coef", float, w)),
            bf16=get(cfg, "bf16", (bool, str), w),
            gradient_checkpointing=get(cfg, "gradient_checkpointing", bool, w),
            zero_stage=get(cfg, "zero_stage", int, w, choices=(0, 1, 2, 3)),
            offload_optimizer=get(cfg, "offload_optimizer", bool, w),
            deepspeed_config=get(cfg, "deepspeed_config", (str, type(None)), w),
            num_procs=get(cfg, "num_procs", int, w),
            hostfile=get(cfg, "hostfile", (str, type(None)), w),
            checkpoint_every=get(cfg, "checkpoint_every", int, w),
            max_nonfinite_steps=get(cfg, "max_nonfinite_steps", int, w),
            packing=get(cfg, "packing", str, w, choices=("auto", *MODES)),
            loss_weighting=get(cfg, "loss_weighting", str, w, choices=LOSS_WEIGHTINGS) if "loss_weighting" in cfg
            else "pair",
            stop_after_steps=cfg.get("stop_after_steps"),
        )
        if s.bf16 not in (True, False, "auto"):
            raise ConfigError(f"params.yaml: 'train.bf16' must be true, false or auto, got {s.bf16!r}")
        for key in ("epochs", "tokens_per_batch", "max_pairs_per_batch", "checkpoint_every", "num_procs"):
            if getattr(s, key) < 1:
                raise ConfigError(f"params.yaml: 'train.{key}' must be at least 1, got {getattr(s, key)}")
        if s.lr <= 0:
            raise ConfigError(f"params.yaml: 'train.lr' must be positive, got {s.lr}")
        return s


@dataclass
class TrainPaths:
    train_split: Path = Path("data/split/train.parquet")
    val_split: Path = Path("data/split/val.parquet")
    checkpoints: Path = Path("checkpoints/train")
    model_dir: Path = Path("models/reward_model")
    metrics: Path = Path("metrics/train.json")
    live_dir: Path = Path("dvclive/train")
    tokenized: Path = Path("data/tokenized")


# --- checks before compute ------------------------------------------------------------------
PAIR_FIELDS = ("prompt", "chosen", "rejected", "margin", "soft_label")


def read_splits(paths: TrainPaths) -> tuple[pd.DataFrame, pd.DataFrame]:
    frames = []
    for path in (paths.train_split, paths.val_split):
        if not Path(path).exists():
            raise DataError(f"{path} not found: build the splits first (dvc repro split)")
        frame = pd.read_parquet(path)
        missing = [c for c in PAIR_FIELDS if c not in frame.columns]
        if missing:
            raise DataError(f"{path} lacks column(s) {missing}: rebuild it with `dvc repro split`")
        frames.append(frame)
    if frames[0].empty:
        raise DataError(f"{paths.train_split} holds no pairs: add preference batches to data/incoming/ and run `dvc repro`")
    return frames[0], frames[1]


def check_max_length(max_length: int, backbone_positions: int, backbone: str) -> int:
    if max_length < 8:
        raise ConfigError(f"params.yaml: 'model.max_length' must be at least 8, got {max_length}")
    if max_length > backbone_positions:
        raise ConfigError(
            f"params.yaml: 'model.max_length' is {max_length} but backbone '{backbone}' takes at most "
            f"{backbone_positions} positions: lower model.max_length to {backbone_positions} or less")
    return max_length


# --- fingerprint: what a checkpoint must match to be resumed ---------------------------------
# A checkpoint made by other training code (a fixed loss, a new batching rule) must not be resumed.
# Every module on the training path, relative to the project root: the train stage's import closure,
# the same list `rmpipe deps` writes as train's code deps in dvc.yaml.
CODE_ROOT = codedeps.ROOT
TRAINING_CODE = tuple(codedeps.closure("stages/train.py"))


def fingerprint(model_cfg: dict, train_cfg: dict, train_split: Path, backbone_dir: Path | str, world_size: int) -> str:
    relevant = {k: v for k, v in train_cfg.items() if k not in NOT_FINGERPRINTED}
    backbone = io.folder_sha256(backbone_dir) if Path(backbone_dir).is_dir() else str(backbone_dir)
    code = {name: sha256_file(CODE_ROOT / name) for name in TRAINING_CODE}
    blob = json.dumps({"model": model_cfg, "train": relevant, "train_split": sha256_file(train_split),
                       "backbone": backbone, "world_size": world_size, "code": code}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


# --- distributed set-up ---------------------------------------------------------------------
def free_port() -> int:
    """A TCP port nobody listens on now (for a rendezvous on this machine)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _skip_shm_comm_op() -> None:
    """Tell DeepSpeed its CPU shared-memory comm op is unavailable, so init does not JIT-compile it.

    Training never calls that op (gloo does the all-reduce), yet compiling it costs 1-3 minutes on a
    2-core machine, again each time the shared torch_extensions cache is rebuilt by another
    environment. DeepSpeed keeps its op-compatibility table in a module dict meant to be edited.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


_rendezvous_dir: Path | None = None  # the one-rank file store, removed by leave_distributed
# Set by the stage's single-node relaunch: the ranks meet through a file store in this folder. A TCP
# rendezvous store (torch's env:// default) listens on every interface, whatever MASTER_ADDR says.
RENDEZVOUS_ENV = "RMPIPE_RENDEZVOUS_DIR"


def init_distributed() -> tuple[int, int]:
    """Join (or, without a launcher, create a one-rank) process group; returns (rank, world_size)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    # Without a launcher, one rank meets itself through a file, not a TCP port another process could take.
    alone = "WORLD_SIZE" not in os.environ
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    if not dist.is_initialized():
        backend = None if torch.cuda.is_available() else "gloo"
        if backend == "gloo":
            _skip_shm_comm_op()
        rendezvous = {}
        if alone:
            global _rendezvous_dir
            _rendezvous_dir = Path(tempfile.mkdtemp(prefix="rmpipe-rendezvous-"))
            rendezvous = {"init_method": f"file://{_rendezvous_dir / 'store'}", "rank": 0, "world_size": 1}
        elif os.environ.get(RENDEZVOUS_ENV):
            rendezvous = {"init_method": f"file://{Path(os.environ[RENDEZVOUS_ENV]) / 'store'}",
                          "rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"])}
        deepspeed.init_distributed(dist_backend=backend, verbose=False, **rendezvous)
    return dist.get_rank(), dist.get_world_size()


def leave_distributed(finished: bool) -> None:
    """Leave the process group before the process exits.

    Left to interpreter shutdown, gloo's worker threads can abort a rank with "terminate called without an
    active exception" after all the work is done. Only for a process about to exit: DeepSpeed caches its
    sub-groups in module globals, so a group destroyed in a long-lived process cannot be re-created there.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()  # no rank tears down its connections while another still talks to it
        dist.destroy_process_group()
    if _rendezvous_dir is not None:
        shutil.rmtree(_rendezvous_dir, ignore_errors=True)


def make_deterministic(seed: int, world_size: int) -> None:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if not torch.cuda.is_available():
        # Ranks share the cores; oversubscription makes every rank slow.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_SIZE", world_size)))))


# --- the pooling anchor (TRL#2758) ------------------------------------------------------------
def stuck_at_ln2(history: list[tuple[float, float]], steps: int = LN2_CHECK_STEPS) -> bool:
    """True when each of the first `steps` (loss, max |r_c - r_r|) is ln 2 with identical scores."""
    if len(history) < steps:
        return False
    return all(abs(loss - LN2) < 1e-4 and gap <= 1e-6 for loss, gap in history[:steps])


# --- results --------------------------------------------------------------------------------
@dataclass
class TrainResult:
    steps: int = 0
    skipped_steps: int = 0
    resumed_from_step: int | None = None
    stopped_early: bool = False
    train: dict[str, float] = field(default_factory=dict)  # last epoch means
    val: dict[str, float] = field(default_factory=dict)  # last epoch
    pairs_per_s: float = 0.0
    tokens_per_s: float = 0.0
    wall_s: float = 0.0
    losses: list[float] = field(default_factory=list)  # per optimizer step (rank-averaged)


@dataclass
class Data:
    train: TokenizedPairs
    val: TokenizedPairs
    pad_id: int


def tokenize(tokenizer, backbone_dir: Path | str, paths: "TrainPaths", train_frame: pd.DataFrame,
             val_frame: pd.DataFrame, max_length: int) -> Data:
    """Both splits as token ids: from data/tokenized/ when it was made from exactly these inputs."""
    from rmpipe import tokenized

    if tokenizer.pad_token_id is None:
        raise UserError("the backbone's tokenizer has no pad token")
    key = tokenized.cache_key(backbone_dir, paths, max_length)
    pairs = tokenized.load_or_tokenize(paths.tokenized, tokenizer, {"train": train_frame, "val": val_frame}, key)
    return Data(pairs["train"], pairs["val"], tokenizer.pad_token_id)


# --- checkpoints ----------------------------------------------------------------------------
def _comm_device() -> str:
    """NCCL reduces GPU tensors only; gloo CPU tensors."""
    import torch.distributed as dist

    return f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"


def _all_same(flag: bool) -> bool:
    """True on every rank iff `flag` is true on every rank."""
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def save_checkpoint(engine, folder: Path, step: int, state: dict, rank: int) -> None:
    """DeepSpeed checkpoint in `step<N>/`, then `latest` switched atomically; older tags removed.

    `latest` only ever names a tag whose files are complete, so a kill mid-write leaves the
    previous checkpoint as the one a resume picks up.
    """
    import torch.distributed as dist

    tag = f"step{step}"
    engine.save_checkpoint(str(folder), tag=tag, client_state={"rmpipe": state}, save_latest=False)
    dist.barrier()
    if rank == 0:
        io.write_json(folder / tag / STATE_FILE, {k: v for k, v in state.items() if k != "rng"})
        io.write_text(folder / LATEST, tag)
        for old in folder.glob("step*"):
            if old.is_dir() and old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def find_resumable(folder: Path, fp: str) -> str | None:
    """The tag to resume from, or None (with the reason logged) to start fresh."""
    latest = folder / LATEST
    if not latest.exists():
        return None
    tag = latest.read_text(encoding="utf-8").strip()
    state_file = folder / tag / STATE_FILE
    if not state_file.exists():
        log.warning("checkpoint %s is incomplete (no %s): starting fresh", folder / tag, STATE_FILE)
        return None
    recorded = json.loads(state_file.read_text(encoding="utf-8")).get("fingerprint")
    if recorded != fp:
        log.warning("checkpoint %s was made with other params, data or backbone (fingerprint %s..., now %s...): "
                    "starting fresh", folder / tag, str(recorded)[:12], fp[:12])
        return None
    return tag


# --- the loop -------------------------------------------------------------------------------
def _reduce_sum(values: list[float]) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def _reduce_max(value: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def evaluate_pairs(engine, pairs: TokenizedPairs, pad_id: int, s: TrainSettings, rank: int, world: int) -> dict:
    """Plain BT loss and accuracy (r_c > r_r strictly; ties are wrong) over a split, summed over ranks."""
    if len(pairs) == 0:
        return {}
    units = plan_units(pairs, s)
    totals = [0.0, 0.0, 0.0]
    engine.eval()
    with torch.no_grad():
        for batch_units in plan_batches(units.lengths, s.tokens_per_batch, s.max_pairs_per_batch, s.seed,
                                        shuffle=False, min_pairs=world, packed_tokens=_packed(units, s),
                                        sizes=units.sizes(), first_pair=units.first_pair()):
            rows = units.rows(shard(batch_units, units.tokens, rank, world))
            batch = make_batch(pairs, rows, s.packing, pad_id).to(engine.device)
            r_c, r_r = engine(**batch.inputs).float().chunk(2)
            totals[0] += bradley_terry_loss(r_c, r_r).item() * len(rows)
            totals[1] += (r_c > r_r).sum().item()
            totals[2] += len(rows)
    engine.train()
    loss, correct, n = _reduce_sum(totals)
    return {"loss": loss / n, "accuracy": correct / n}


def plan_units(pairs: TokenizedPairs, s: TrainSettings) -> Units:
    """The planner's items in the resolved layout: pairs, or (`groups`) whole groups / sub-groups."""
    return pairs.units(s.packing, s.tokens_per_batch, s.max_pairs_per_batch)


def plan_epochs(pairs: TokenizedPairs, s: TrainSettings, world: int) -> tuple[Units, list[list[list[int]]]]:
    """The units and every epoch's global batches of unit indices, budgeted in the tokens the layout computes."""
    units = plan_units(pairs, s)
    return units, [plan_batches(units.lengths, s.tokens_per_batch, s.max_pairs_per_batch, s.seed, epoch,
                                min_pairs=world, packed_tokens=_packed(units, s), sizes=units.sizes(),
                                first_pair=units.first_pair())
                   for epoch in range(s.epochs)]


def _packed(units: Units, s: TrainSettings):
    """Per-unit tokens for a packed layout's budget; None (budget the padded stack) for `none`."""
    return None if s.packing == "none" else units.tokens


def fit(model: RewardModel, data: Data, s: TrainSettings, paths: TrainPaths, fp: str, ds_config: dict,
        rank: int, world: int) -> TrainResult:
    """Train `model` on `data` under DeepSpeed; returns metrics (rank 0 logs them, every rank computes them)."""
    import deepspeed

    from rmpipe.ds_config import lr_scheduler, param_groups

    started = time.monotonic()
    units, plans = plan_epochs(data.train, s, world)
    weights = torch.from_numpy(data.train.pair_weights(s.loss_weighting))
    total_steps = sum(len(p) for p in plans)

    if s.gradient_checkpointing:
        model.backbone.gradient_checkpointing_enable()
    groups = param_groups(model, s.lr, s.weight_decay, s.head_lr_mult)
    schedule = None if "scheduler" in ds_config else lr_scheduler({"warmup_ratio": s.warmup_ratio}, total_steps)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config,
                                           lr_scheduler=schedule)
    result = TrainResult()
    start_epoch, start_batch, nonfinite = 0, 0, 0
    ln2_history: list[tuple[float, float]] = []

    paths.checkpoints.mkdir(parents=True, exist_ok=True)
    tag = find_resumable(paths.checkpoints, fp)
    if tag is not None:
        _, client = engine.load_checkpoint(str(paths.checkpoints), tag=tag)
        state = client["rmpipe"]
        start_epoch, start_batch = state["epoch"], state["next_batch"]
        result.steps, nonfinite = state["step"], state["nonfinite"]
        result.skipped_steps, result.losses = state["skipped"], list(state["losses"])
        ln2_history = [tuple(x) for x in state["ln2_history"]]
        result.train, result.val = state.get("train_metrics", {}), state.get("val_metrics", {})
        torch.set_rng_state(state["rng"])
        result.resumed_from_step = result.steps
        if rank == 0:
            log.info("resuming from %s (step %d of %d)", paths.checkpoints / tag, result.steps, total_steps)
    elif rank == 0:
        log.info("training %d pairs x %d epochs = %d steps on %d rank(s)", len(data.train), s.epochs, total_steps, world)

    live = _open_live(paths.live_dir, resumed=tag is not None) if rank == 0 else None
    done_tokens, done_pairs, busy_s = state.get("throughput", (0, 0, 0.0)) if tag is not None else (0, 0, 0.0)
    positions = [(e, b) for e in range(s.epochs) for b in range(len(plans[e])) if (e, b) >= (start_epoch, start_batch)]
    epoch_sums = [0.0, 0.0, 0.0, 0.0]  # an epoch cut by a resume reports the train metrics of its resumed part only
    for epoch, b in (progress(positions, total=len(positions), desc="train") if rank == 0 else positions):
        t0 = time.monotonic()
        global_rows = units.rows(plans[epoch][b])
        rows = units.rows(shard(plans[epoch][b], units.tokens, rank, world))
        batch = make_batch(data.train, rows, s.packing, data.pad_id).to(engine.device)
        weight = weights[rows].to(engine.device)
        r_c, r_r = engine(**batch.inputs).float().chunk(2)
        loss = bradley_terry_loss(
            r_c, r_r,
            margin=batch.margin if s.use_margin else None,
            soft_label=batch.soft_label if s.use_soft_labels else None,
            center_coef=s.center_coef,
            weight=weight if s.loss_weighting != "pair" else None,
        )
        finite = _all_same(bool(torch.isfinite(loss)))
        if finite:
            engine.backward(loss * shard_weight(float(weight.sum()), float(weights[global_rows].sum()), world))
            # DeepSpeed reports the norm it clipped with under ZeRO; without ZeRO (fp32) it reports none,
            # and there every rank holds the whole, all-reduced gradient.
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            own_norm = float(torch.nn.utils.get_total_norm(grads)) if engine.zero_optimization_stage() == 0 else None
            step_lr = engine.get_lr()  # the lr this step uses (the scheduler moves on inside step())
            engine.step()
            grad_norm = engine.get_global_grad_norm() if own_norm is None else own_norm
        else:
            nonfinite += 1
            result.skipped_steps += 1
            engine.zero_grad()
            if rank == 0:
                log.warning("non-finite loss at epoch %d batch %d: step skipped (%d of at most %d)",
                            epoch, b, nonfinite, s.max_nonfinite_steps)
            if nonfinite > s.max_nonfinite_steps:
                raise DataError(
                    f"{nonfinite} steps had a non-finite loss (train.max_nonfinite_steps = {s.max_nonfinite_steps}): "
                    "check the margin / soft_label columns for NaN or inf, or lower train.lr")
        gap = (r_c - r_r).detach()
        w_sum = float(weight.sum())  # the logged loss is the objective: the weighted mean over the global batch
        loss_sum, correct, n, margin_sum, tokens, w_sum = _reduce_sum([
            loss.item() * w_sum if finite else 0.0, float((gap > 0).sum()), float(len(rows)),
            float(gap.sum()) if finite else 0.0, float(batch.real_tokens), w_sum])
        step_s = time.monotonic() - t0
        busy_s += step_s
        done_tokens += tokens
        done_pairs += n
        result.steps += 1
        if finite:
            step_loss = loss_sum / w_sum
            result.losses.append(step_loss)
            epoch_sums = [epoch_sums[0] + loss_sum, epoch_sums[1] + correct, epoch_sums[2] + n, epoch_sums[3] + w_sum]
            if len(ln2_history) < LN2_CHECK_STEPS:
                ln2_history.append((step_loss, _reduce_max(float(gap.abs().max()))))
                if stuck_at_ln2(ln2_history):
                    raise UserError(
                        f"the loss stayed at ln 2 = {LN2:.4f} with identical chosen/rejected rewards for the first "
                        f"{LN2_CHECK_STEPS} steps: the reward is read at a position that does not see the response. "
                        "Check pooling (last real token from the attention mask) and the padding side / pad token "
                        "(cf. huggingface/trl#2758)")
            if live is not None:
                for key, value in {"loss": step_loss, "accuracy": correct / n, "margin": margin_sum / n,
                                   "grad_norm": float(grad_norm or 0.0), "lr": float(step_lr[0]) if step_lr else 0.0,
                                   "tokens_per_s": tokens / step_s, "pairs_per_s": n / step_s}.items():
                    live.log_metric(f"train/{key}", value)
                live.next_step()

        last_of_epoch = b == len(plans[epoch]) - 1
        if last_of_epoch:
            result.train = {"loss": epoch_sums[0] / max(epoch_sums[3], 1e-12),
                            "accuracy": epoch_sums[1] / max(epoch_sums[2], 1)}
            epoch_sums = [0.0, 0.0, 0.0, 0.0]
            result.val = evaluate_pairs(engine, data.val, data.pad_id, s, rank, world)
            if rank == 0 and result.val:
                log.info("epoch %d: train loss %.4f acc %.3f | val loss %.4f acc %.3f", epoch + 1,
                         result.train["loss"], result.train["accuracy"], result.val["loss"], result.val["accuracy"])
                if live is not None:
                    live.log_metric("val/loss", result.val["loss"])
                    live.log_metric("val/accuracy", result.val["accuracy"])
                    live.log_metric("epoch", epoch + 1)
                    live.next_step()

        if result.steps % s.checkpoint_every == 0 or last_of_epoch and epoch == s.epochs - 1:
            next_pos = (epoch, b + 1) if not last_of_epoch else (epoch + 1, 0)
            save_checkpoint(engine, paths.checkpoints, result.steps, {
                "fingerprint": fp, "epoch": next_pos[0], "next_batch": next_pos[1], "step": result.steps,
                "nonfinite": nonfinite, "skipped": result.skipped_steps, "losses": result.losses,
                "ln2_history": ln2_history, "train_metrics": result.train, "val_metrics": result.val,
                "throughput": (done_tokens, done_pairs, busy_s),
                "rng": torch.get_rng_state()}, rank)
        if s.stop_after_steps is not None and result.steps >= s.stop_after_steps:
            result.stopped_early = True
            break

    result.pairs_per_s = done_pairs / busy_s if busy_s else 0.0
    result.tokens_per_s = done_tokens / busy_s if busy_s else 0.0
    result.wall_s = time.monotonic() - started
    if live is not None:
        live.end()
    return result


def _open_live(folder: Path, resumed: bool):
    from dvclive import Live

    # dvcyaml=None: dvclive must not edit the project's dvc.yaml (the train stage declares its plots).
    return Live(dir=str(folder), resume=resumed, save_dvc_exp=False, dvcyaml=None)


# --- outputs --------------------------------------------------------------------------------
def save_outputs(result: TrainResult, model: RewardModel, tokenizer, paths: TrainPaths, record: dict, rank: int,
                 zero_stage: int) -> None:
    """models/reward_model/ (weights + tokenizer + training.json, one atomic folder) and metrics/train.json."""
    import deepspeed

    gather = (deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
              if zero_stage == 3 else contextlib.nullcontext())
    with gather:
        if rank != 0:
            return
        with io.atomic_dir(paths.model_dir) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            summary = {k: v for k, v in asdict(result).items() if k != "losses"}
            io.write_json(tmp / "training.json", {**record, **summary})
    io.write_json(paths.metrics, {
        "val_accuracy": result.val.get("accuracy"), "val_loss": result.val.get("loss"),
        "train_loss": result.train.get("loss"), "train_accuracy": result.train.get("accuracy"),
        "steps": result.steps, "skipped_steps": result.skipped_steps,
        "pairs_per_s": round(result.pairs_per_s, 2), "tokens_per_s": round(result.tokens_per_s, 1),
        "truncated_pairs": record.get("truncated_pairs"), "wall_s": round(result.wall_s, 1),
    })
