"""What a training run saves to resume from, and when it may resume.

    fp = fingerprint(model_settings, train_settings, train_split, backbone_dir, world_size)
    state = resume(engine, folder, fp) or LoopState()    # None: nothing to resume (the reason logged)
    ...
    save(engine, folder, state, fp, rank)                # every train.checkpoint_every steps

A checkpoint is DeepSpeed's own (`engine.save_checkpoint`: weights, optimizer, scheduler) plus the
loop's `LoopState` and the torch RNG in its client state, in `step<N>/`; `latest` names the one
complete checkpoint. A run resumes only from a checkpoint whose fingerprint (params, the DeepSpeed config
file's contents, data, backbone, world size, code) is the current run's, so a persisted folder never carries one run into another.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from rmpipe.core import codedeps, io
from rmpipe.core.errors import UserError, environment_fault
from rmpipe.core.io import sha256_file
from rmpipe.core.settings import ModelSettings, TrainSettings
from rmpipe.training.distributed import barrier

log = logging.getLogger("rmpipe.train")

LATEST = "latest"
STATE_FILE = "rmpipe_state.json"
# Keys of `train:` that do not change the weights a run ends with, so they do not block a resume.
NOT_FINGERPRINTED = ("checkpoint_every", "stop_after_steps", "hostfile", "max_nonfinite_steps")

# --- fingerprint: what a checkpoint must match to be resumed ---------------------------------
# A checkpoint made by other training code (a fixed loss, a new batching rule) must not be resumed.
# Every module on the training path, relative to the project root: the train stage's import closure,
# the same list `rmpipe deps` writes as train's code deps in dvc.yaml.
CODE_ROOT = codedeps.ROOT
TRAINING_CODE = tuple(codedeps.closure("stages/train.py"))


def _deepspeed_config_digest(path: str | None) -> str | None:
    """sha256 of the JSON `train.deepspeed_config` names: its contents, not only its path, decide the run."""
    if not path:
        return None
    file = Path(path)
    return sha256_file(file) if file.is_file() else f"missing: {path}"


def fingerprint(model: ModelSettings, train: TrainSettings, train_split: Path, backbone_dir: Path | str,
                world_size: int) -> str:
    """Every field of both settings (bar NOT_FINGERPRINTED), the DeepSpeed config file's contents, the train
    split, backbone, world size and code."""
    relevant = train.model_dump(exclude=set(NOT_FINGERPRINTED))
    backbone = io.folder_sha256(backbone_dir) if Path(backbone_dir).is_dir() else str(backbone_dir)
    code = {name: sha256_file(CODE_ROOT / name) for name in TRAINING_CODE}
    blob = json.dumps({"model": model.model_dump(), "train": relevant, "train_split": io.path_sha256(train_split),
                       "deepspeed_config_file": _deepspeed_config_digest(train.deepspeed_config),
                       "backbone": backbone, "world_size": world_size, "code": code}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


# --- the loop's state -------------------------------------------------------------------------
@dataclass
class LoopState:
    """Where the training loop is and what it has counted: all a checkpoint holds beside the engine.

    Sums are over every rank (the loop adds the all-reduced totals of each step).
    """

    epoch: int = 0  # the next batch to run: its epoch ...
    next_batch: int = 0  # ... and its index in that epoch's plan
    step: int = 0  # batches run, skipped ones included
    skipped: int = 0  # steps skipped for a non-finite loss
    losses: list[float] = field(default_factory=list)  # per finite step: the global batch's weighted mean loss
    ln2_history: list[tuple[float, float]] = field(default_factory=list)  # first steps' (loss, max |r_c - r_r|)
    # this epoch so far: weighted loss sum, pairs ranked right, pairs, weight sum
    epoch_loss: float = 0.0
    epoch_correct: float = 0.0
    epoch_pairs: float = 0.0
    epoch_weight: float = 0.0
    train: dict[str, float] = field(default_factory=dict)  # the last finished epoch's means
    val: dict[str, float] = field(default_factory=dict)  # the last finished epoch's validation
    tokens: float = 0.0  # throughput so far: real tokens, pairs and seconds spent in steps
    pairs: float = 0.0
    busy_s: float = 0.0
    resumed_from_step: int | None = None  # set by `load_state_dict`, never saved

    def state_dict(self) -> dict:
        state = asdict(self)
        del state["resumed_from_step"]
        return state

    def load_state_dict(self, state: dict) -> None:
        for f in fields(self):
            if f.name in state:
                setattr(self, f.name, state[f.name])
        self.ln2_history = [tuple(x) for x in self.ln2_history]
        self.resumed_from_step = self.step

    def end_epoch(self) -> None:
        """Turn this epoch's sums into its train means, and start the next epoch's."""
        self.train = {"loss": self.epoch_loss / max(self.epoch_weight, 1e-12),
                      "accuracy": self.epoch_correct / max(self.epoch_pairs, 1)}
        self.epoch_loss = self.epoch_correct = self.epoch_pairs = self.epoch_weight = 0.0


# --- save and resume --------------------------------------------------------------------------
def save(engine, folder: Path, state: LoopState, fp: str, rank: int) -> None:
    """DeepSpeed checkpoint in `step<N>/`, then `latest` switched atomically; older tags removed.

    `latest` only ever names a tag whose files are complete, so a kill mid-write leaves the
    previous checkpoint as the one a resume picks up.
    """
    tag = f"step{state.step}"
    saved = {"fingerprint": fp, **state.state_dict()}
    try:
        engine.save_checkpoint(str(folder), tag=tag, client_state={"rmpipe": {**saved, "rng": torch.get_rng_state()}},
                               save_latest=False, exclude_frozen_parameters=has_frozen(engine.module))
    except Exception as exc:  # torch.save says "file write failed", not why: CheckpointSaveFailed finds out
        failed = CheckpointSaveFailed.after(exc, folder, tag, rank)
        if failed is None:  # not the machine's fault: a bug, with its traceback
            raise
        raise failed from None
    barrier()
    if rank == 0:
        io.write_json(folder / tag / STATE_FILE, saved)
        io.write_text(folder / LATEST, tag)
        for old in folder.glob("step*"):
            if old.is_dir() and old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
    barrier()


class CheckpointSaveFailed(UserError):
    """A checkpoint could not be written (a full disk, a quota): the partial step folder is removed."""

    @classmethod
    def after(cls, exc: BaseException, folder: Path, tag: str, rank: int) -> UserError | None:
        """The one-line error for a failed `save_checkpoint` into `folder/tag` (why, where, what was kept),
        or None when the machine is not the cause. The partial folder is removed either way."""
        partial = folder / tag
        fault = environment_fault(exc, partial) or _write_probe(folder)  # probed while the partial fills the disk
        if rank == 0:  # never resumed from (`latest` names complete tags only); removed so it frees its space
            shutil.rmtree(partial, ignore_errors=True)
        latest = folder / LATEST
        kept = latest.read_text(encoding="utf-8").strip() if latest.exists() else None
        if fault is None:
            return None
        resume = f"`latest` still names {kept}, which the next run resumes from" if kept else "no earlier checkpoint"
        return cls(f"training checkpoint save to {partial} failed: {fault} (the partial {tag} folder was removed; "
                   f"{resume})")


def _write_probe(folder: Path, size: int = 1 << 20) -> UserError | None:
    """Whether `folder` takes a 1 MB write now: the `environment_fault` that stops it (ENOSPC...), else None."""
    probe = folder / ".rmpipe-space-probe"
    try:
        with open(probe, "wb") as stream:
            stream.write(b"\0" * size)
            stream.flush()
    except OSError as exc:
        return environment_fault(exc, folder)
    finally:
        probe.unlink(missing_ok=True)
    return None


def has_frozen(module: torch.nn.Module) -> bool:
    """Whether some weights do not train (LoRA): the checkpoint then leaves them out."""
    return any(not p.requires_grad for p in module.parameters())


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


def resume(engine, folder: Path, fp: str) -> LoopState | None:
    """Load the engine and the loop's state from the checkpoint in `folder` made by this very run, if any."""
    folder.mkdir(parents=True, exist_ok=True)
    tag = find_resumable(folder, fp)
    if tag is None:
        return None
    # a LoRA run saves what trains (adapters, head); the frozen backbone comes from the fingerprinted backbone
    _, client = engine.load_checkpoint(str(folder), tag=tag, load_module_strict=not has_frozen(engine.module))
    saved = client["rmpipe"]
    state = LoopState()
    state.load_state_dict(saved)
    torch.set_rng_state(saved["rng"])
    return state
