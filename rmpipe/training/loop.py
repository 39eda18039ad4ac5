"""Reward-model training on a DeepSpeed engine: read top to bottom, one optimizer step per global batch.

    fit(model, data, settings, paths, fingerprint, ds_config, rank, world) -> TrainResult

The process group and its collectives are `rmpipe.training.distributed`; the fingerprint, the loop's
`LoopState` and checkpoint save / resume are `rmpipe.training.checkpoint`.

Everything a user can get wrong (missing or empty splits, a backbone that does not load, a
max_length the backbone cannot take) is checked by `paths.training_splits` / `check_max_length` before
any compute. The loop itself:
  * each rank scores its shard of the global batch in ONE forward pass, in the layout
    `train.packing` names (`rmpipe.model.packing`: stacked rows, padding-free, shared-prompt or group
    packing); a batch holds whole groups (prompts) in the `groups` layout;
  * Bradley-Terry loss (optional margin, soft labels, centering), each pair weighted 1 or, with
    `train.loss_weighting: group`, 1 / (pairs of its prompt); scaled so the mean over ranks is the
    weighted mean over the global batch (`batching.shard_weight`);
  * a non-finite loss on any rank skips the step on every rank; too many abort the run;
  * checkpoints (DeepSpeed `save_checkpoint` + the `LoopState` + RNG) every `checkpoint_every`
    steps; a run resumes only from a checkpoint with the same fingerprint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch

from rmpipe.core import io
from rmpipe.core.errors import ConfigError, DataError, UserError
from rmpipe.core.paths import ProjectPaths
from rmpipe.core.progress import progress
from rmpipe.core.settings import TrainSettings
from rmpipe.model.batching import (
    TokenizedPairs,
    Units,
    plan_batches,
    shard,
    shard_weight,
)
from rmpipe.model.packing import make_batch
from rmpipe.model.reward_model import RewardModel, bradley_terry_loss
from rmpipe.training import checkpoint
from rmpipe.training.checkpoint import LoopState
from rmpipe.training.distributed import all_agree, reduce_max, reduce_sum

log = logging.getLogger("rmpipe.train")

LN2 = math.log(2.0)
LN2_CHECK_STEPS = 8  # steps after which a loss still pinned at ln 2 with identical scores is a bug


# --- checks before compute ------------------------------------------------------------------
def check_max_length(max_length: int, backbone_positions: int, backbone: str) -> int:
    """`model.max_length` (>= 8, by ModelSettings) against what this backbone takes."""
    if max_length > backbone_positions:
        raise ConfigError(
            f"params.yaml: 'model.max_length' is {max_length} but backbone '{backbone}' takes at most "
            f"{backbone_positions} positions: lower model.max_length to {backbone_positions} or less")
    return max_length


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

    @classmethod
    def of(cls, state: LoopState, stopped_early: bool, wall_s: float) -> "TrainResult":
        return cls(steps=state.step, skipped_steps=state.skipped, resumed_from_step=state.resumed_from_step,
                   stopped_early=stopped_early, train=state.train, val=state.val,
                   pairs_per_s=state.pairs / state.busy_s if state.busy_s else 0.0,
                   tokens_per_s=state.tokens / state.busy_s if state.busy_s else 0.0, wall_s=wall_s,
                   losses=state.losses)


@dataclass
class Data:
    train: TokenizedPairs
    val: TokenizedPairs
    pad_id: int


def tokenize(tokenizer, backbone_dir: Path | str, paths: ProjectPaths, train_frame: pd.DataFrame,
             val_frame: pd.DataFrame, max_length: int) -> Data:
    """Both splits as token ids: from data/tokenized/ when it was made from exactly these inputs."""
    from rmpipe.model import tokenized

    if tokenizer.pad_token_id is None:
        raise UserError("the backbone's tokenizer has no pad token")
    key = tokenized.cache_key(backbone_dir, paths, max_length)
    pairs = tokenized.load_or_tokenize(paths.tokenized, tokenizer, {"train": train_frame, "val": val_frame}, key)
    return Data(pairs["train"], pairs["val"], tokenizer.pad_token_id)


# --- the loop -------------------------------------------------------------------------------
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
    loss, correct, n = reduce_sum(totals)
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


def fit(model: RewardModel, data: Data, s: TrainSettings, paths: ProjectPaths, fp: str, ds_config: dict,
        rank: int, world: int) -> TrainResult:
    """Train `model` on `data` under DeepSpeed; returns metrics (rank 0 logs them, every rank computes them)."""
    started = time.monotonic()
    units, plans = plan_epochs(data.train, s, world)
    weights = torch.from_numpy(data.train.pair_weights(s.loss_weighting))
    total_steps = sum(len(p) for p in plans)
    engine = _engine(model, s, ds_config, total_steps)
    state = checkpoint.resume(engine, paths.checkpoints, fp) or LoopState()
    if rank == 0 and state.resumed_from_step is not None:
        log.info("resuming from %s (step %d of %d)", paths.checkpoints / f"step{state.step}", state.step, total_steps)
    elif rank == 0:
        log.info("training %d pairs x %d epochs = %d steps on %d rank(s)", len(data.train), s.epochs, total_steps, world)
    live = _open_live(paths.live_dir, resumed=state.resumed_from_step is not None) if rank == 0 else None
    todo = [(e, b) for e in range(s.epochs) for b in range(len(plans[e])) if (e, b) >= (state.epoch, state.next_batch)]
    stopped = False
    for epoch, b in (progress(todo, total=len(todo), desc="train") if rank == 0 else todo):
        t0 = time.monotonic()
        # forward: this rank's shard of the global batch, in one pass
        rows = units.rows(shard(plans[epoch][b], units.tokens, rank, world))
        batch = make_batch(data.train, rows, s.packing, data.pad_id).to(engine.device)
        weight = weights[rows].to(engine.device)
        r_c, r_r = engine(**batch.inputs).float().chunk(2)
        loss = bradley_terry_loss(r_c, r_r, margin=batch.margin if s.use_margin else None,
                                  soft_label=batch.soft_label if s.use_soft_labels else None,
                                  center_coef=s.center_coef, weight=weight if s.loss_weighting != "pair" else None)

        # backward, clip and step (DeepSpeed clips to train.grad_clip), the loss scaled so the sum over ranks
        # is the global batch's weighted mean; a non-finite loss on any rank skips the step on every rank
        finite = all_agree(bool(torch.isfinite(loss)))
        if finite:
            global_weight = float(weights[units.rows(plans[epoch][b])].sum())
            lr, grad_norm = _backward_step(engine, model, loss * shard_weight(float(weight.sum()), global_weight, world))
        else:
            _skip_step(engine, state, s, epoch, b, rank)

        # log: the step's totals over all ranks; the first steps' loss checked against the ln 2 anchor
        metrics = _tally(state, finite, loss, weight, (r_c - r_r).detach(), len(rows), batch.real_tokens, t0)
        if metrics is not None and live is not None:
            _log_metrics(live, {**metrics, "train/grad_norm": float(grad_norm or 0.0),
                                "train/lr": float(lr[0]) if lr else 0.0})

        # evaluate at the end of each epoch
        last_of_epoch = b == len(plans[epoch]) - 1
        if last_of_epoch:
            state.end_epoch()
            state.val = evaluate_pairs(engine, data.val, data.pad_id, s, rank, world)
            _log_epoch(live, state, epoch, rank)

        # checkpoint every train.checkpoint_every steps and after the last one
        state.epoch, state.next_batch = (epoch + 1, 0) if last_of_epoch else (epoch, b + 1)
        if state.step % s.checkpoint_every == 0 or last_of_epoch and epoch == s.epochs - 1:
            checkpoint.save(engine, paths.checkpoints, state, fp, rank)
        if s.stop_after_steps is not None and state.step >= s.stop_after_steps:
            stopped = True
            break
    if live is not None:
        live.end()
    return TrainResult.of(state, stopped, time.monotonic() - started)


def _engine(model: RewardModel, s: TrainSettings, ds_config: dict, total_steps: int):
    """The DeepSpeed engine: AdamW param groups (no decay on biases and norms, the head's own lr) and the schedule."""
    import deepspeed

    from rmpipe.training.ds_config import lr_scheduler, param_groups

    if s.gradient_checkpointing:
        model.backbone.gradient_checkpointing_enable()
        if s.lora.r:  # frozen embeddings: without this, checkpointed blocks pass no gradient to the adapters
            model.backbone.enable_input_require_grads()
    groups = param_groups(model, s.lr, s.weight_decay, s.head_lr_mult)
    schedule = None if "scheduler" in ds_config else lr_scheduler(s.warmup_ratio, total_steps)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config,
                                           lr_scheduler=schedule)
    return engine


def _backward_step(engine, model: RewardModel, loss: torch.Tensor) -> tuple[list[float], float | None]:
    """Backward and optimizer step; returns the lr this step used and the gradient norm before clipping."""
    engine.backward(loss)
    # DeepSpeed reports the norm it clipped with under ZeRO; without ZeRO (fp32) it reports none,
    # and there every rank holds the whole, all-reduced gradient.
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    own_norm = float(torch.nn.utils.get_total_norm(grads)) if engine.zero_optimization_stage() == 0 else None
    lr = engine.get_lr()  # the lr this step uses (the scheduler moves on inside step())
    engine.step()
    return lr, engine.get_global_grad_norm() if own_norm is None else own_norm


def _skip_step(engine, state: LoopState, s: TrainSettings, epoch: int, b: int, rank: int) -> None:
    """Drop this step's gradients; too many skipped steps abort the run."""
    state.skipped += 1
    engine.zero_grad()
    if rank == 0:
        log.warning("non-finite loss at epoch %d batch %d: step skipped (%d of at most %d)",
                    epoch, b, state.skipped, s.max_nonfinite_steps)
    if state.skipped > s.max_nonfinite_steps:
        raise DataError(
            f"{state.skipped} steps had a non-finite loss (train.max_nonfinite_steps = {s.max_nonfinite_steps}): "
            "check the margin / soft_label columns for NaN or inf, or lower train.lr")


def _tally(state: LoopState, finite: bool, loss: torch.Tensor, weight: torch.Tensor, gap: torch.Tensor,
           n_pairs: int, real_tokens: int, t0: float) -> dict[str, float] | None:
    """Add the step's totals over all ranks to `state`; the step's metrics, or None for a skipped step."""
    w_sum = float(weight.sum())  # the logged loss is the objective: the weighted mean over the global batch
    loss_sum, correct, n, margin_sum, tokens, w_sum = reduce_sum([
        loss.item() * w_sum if finite else 0.0, float((gap > 0).sum()), float(n_pairs),
        float(gap.sum()) if finite else 0.0, float(real_tokens), w_sum])
    step_s = time.monotonic() - t0
    state.step += 1
    state.busy_s += step_s
    state.tokens += tokens
    state.pairs += n
    if not finite:
        return None
    step_loss = loss_sum / w_sum
    state.losses.append(step_loss)
    state.epoch_loss += loss_sum
    state.epoch_correct += correct
    state.epoch_pairs += n
    state.epoch_weight += w_sum
    if len(state.ln2_history) < LN2_CHECK_STEPS:
        state.ln2_history.append((step_loss, reduce_max(float(gap.abs().max()))))
        if stuck_at_ln2(state.ln2_history):
            raise UserError(
                f"the loss stayed at ln 2 = {LN2:.4f} with identical chosen/rejected rewards for the first "
                f"{LN2_CHECK_STEPS} steps: the reward is read at a position that does not see the response. "
                "Check pooling (last real token from the attention mask) and the padding side / pad token "
                "(cf. huggingface/trl#2758)")
    return {"train/loss": step_loss, "train/accuracy": correct / n, "train/margin": margin_sum / n,
            "train/tokens_per_s": tokens / step_s, "train/pairs_per_s": n / step_s}


def _log_epoch(live, state: LoopState, epoch: int, rank: int) -> None:
    if rank == 0 and state.val:
        log.info("epoch %d: train loss %.4f acc %.3f | val loss %.4f acc %.3f", epoch + 1,
                 state.train["loss"], state.train["accuracy"], state.val["loss"], state.val["accuracy"])
        if live is not None:
            _log_metrics(live, {"val/loss": state.val["loss"], "val/accuracy": state.val["accuracy"], "epoch": epoch + 1})


def _log_metrics(live, metrics: dict[str, float]) -> None:
    """One dvclive step: dvclive/train/plots/metrics/<name>.tsv gets a row per metric."""
    for name, value in metrics.items():
        live.log_metric(name, value)
    live.next_step()

def _open_live(folder: Path, resumed: bool):
    from dvclive import Live

    if resumed:
        _repair_live_summary(folder)
    # dvcyaml=None: dvclive must not edit the project's dvc.yaml (the train stage declares its plots).
    return Live(dir=str(folder), resume=resumed, save_dvc_exp=False, dvcyaml=None)


def _repair_live_summary(folder: Path) -> None:
    """dvclive rewrites its summary (metrics.json) in place at every step, so a kill can leave it cut
    short, and dvclive cannot resume from that. Rebuild it as the last step its plots recorded (the
    plots are appended a line at a time: a cut last line is skipped)."""
    summary = folder / "metrics.json"
    try:
        json.loads(summary.read_text(encoding="utf-8"))
        return
    except FileNotFoundError:
        return
    except ValueError:
        pass
    steps = [0]
    for plot in (folder / "plots" / "metrics").rglob("*.tsv"):
        for line in plot.read_text(encoding="utf-8", errors="replace").split("\n")[1:-1]:  # header; cut or empty end
            with contextlib.suppress(ValueError, IndexError):
                steps.append(int(line.split("\t")[0]))
    log.warning("%s was cut short by a kill: rebuilt at step %d from its plots", summary, max(steps))
    summary.write_text(json.dumps({"step": max(steps)}), encoding="utf-8")


# --- outputs --------------------------------------------------------------------------------
def save_outputs(result: TrainResult, model: RewardModel, tokenizer, paths: ProjectPaths, record: dict, rank: int,
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
    io.write_json(paths.train_metrics, {
        "val_accuracy": result.val.get("accuracy"), "val_loss": result.val.get("loss"),
        "train_loss": result.train.get("loss"), "train_accuracy": result.train.get("accuracy"),
        "steps": result.steps, "skipped_steps": result.skipped_steps,
        "pairs_per_s": round(result.pairs_per_s, 2), "tokens_per_s": round(result.tokens_per_s, 1),
        "truncated_pairs": record.get("truncated_pairs"), "wall_s": round(result.wall_s, 1),
    })
