"""Benchmark: rmpipe's trainer against TRL's RewardTrainer on the same backbone, pairs and settings.

Usage:  .venv/bin/python bench/train_throughput.py [--quick] [--backbone smollm2|tiny] [--datasets sample,long,long4,sample4]
            [--batch-pairs B] [--steps N] [--max-length 1024] [--lr LR] [--seed 0] [--repeats R]
            [--modes shared_prompt,none] [--trl-order random|rmpipe] [--out results.json] [--keep DIR]
        make bench-train ARGS="--quick"          (installs the `bench` extra: trl + accelerate)

Each data set gets exactly B*N pairs, so one epoch is N optimizer steps of B pairs for both trainers:
  sample  the bundled sample data run through the project's stages (sample-data, collect, aggregate,
          split), first B*N pairs of the train split
  long    bench/long_prompts.py: multi-turn prompts of 100-400 tokens, responses of 20-120 tokens
  long4   the same prompts with K = 4 ranked responses each and all 6 comparisons (B*N/6 prompts)
  sample4 the bundled sample's generator (rmpipe.data.sample.batches), 4 responses per prompt (two good, two
          flawed: what `rmpipe sample-pairs` writes per prompt), all 6 comparisons
          (the K = 4 sets need B to be a multiple of 6: a batch holds whole prompts in rmpipe's `groups`)
Runs are interleaved (per repeat: trl, rmpipe[mode], ...), each in its own process, and report:
  pairs/s, tokens/s   steady state: the first step (warm-up allocations) is left out for both, rates are
                      sums over the remaining steps; a comparison is a pair for both trainers. tokens = real
                      (non-pad) tokens of every chosen and rejected sequence, prompt included in both,
                      whatever layout rmpipe computes them in
  tokens computed     what each trainer's forward passes hold, all steps: TRL its real tokens (a lower
                      bound: it also computes its padding), rmpipe the tokens of its layout; their ratio
                      is the token bound (the speed-up a step time proportional to tokens would give)
  step time           TRL: on_step_begin -> on_step_end (forward, backward, clip, AdamW, scheduler; its batch is
                      collated before); rmpipe: the step time it logs (batch layout included)
  peak RSS            the run's own process (os.wait4 ru_maxrss)
  loss                after the last step, and the mean of the last 3

Made equal on purpose: backbone weights, reward-head init (rmpipe's, copied into TRL's `score`), AdamW
(betas 0.9/0.95, eps 1e-8, weight decay 0.01 on matrices only), grad clip 1.0, the learning-rate multiplier
of every step (TRL gets rmpipe's warmup + cosine multipliers, via a LambdaLR), fp32, threads,
deterministic algorithms, seed. Left to each trainer: batch composition (rmpipe: length-bucketed batches;
TRL: its random sampler, or rmpipe's batches with --trl-order rmpipe) and how a batch is laid out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # rmpipe and bench/long_prompts.py, also when run as a plain script
sys.path.insert(0, str(ROOT / "bench"))

CHILD_ENV = {
    "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false",
}
os.environ.update({k: os.environ.get(k, v) for k, v in CHILD_ENV.items()})

CACHE = ROOT / "bench" / ".cache"  # tiny backbones (ignores itself in git)
BIG_BUDGET = 10**9  # train.tokens_per_batch: never the limit, so every rmpipe batch is exactly B pairs
DEFAULTS = {  # backbone -> (batch pairs, steps, lr)
    "smollm2": (4, 8, 1e-5),
    "tiny": (16, 8, 3e-3),
}
GROUPED_BATCH = {"smollm2": 6, "tiny": 24}  # default B when a K = 4 set runs: whole prompts of 6 comparisons
K4_SETS = ("long4", "sample4")
BUSY_CORES = 0.2  # CPU used by other processes during a run (cores, on average) above which its timings are flagged
RMPIPE_LIVE = Path("dvclive/train/plots/metrics/train")  # rmpipe's per-step TSVs (rmpipe.training.loop.fit)


@dataclass
class Settings:
    backbone: str
    datasets: list[str]
    batch_pairs: int
    steps: int
    max_length: int
    lr: float
    seed: int
    repeats: int
    modes: list[str]
    trl_order: str
    warmup_ratio: float = 0.0
    weight_decay: float = 0.01
    grad_clip: float = 1.0

    @property
    def n_pairs(self) -> int:
        return self.batch_pairs * self.steps


def log(message: str) -> None:
    print(message, flush=True)


# --- child processes ---------------------------------------------------------------------------
def busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (all cores, all processes), from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class Child(NamedTuple):
    code: int
    wall_s: float
    rss_mb: float  # peak RSS of that process alone
    others_cores: float  # CPU used meanwhile by every *other* process, in cores on average


def run_child(cmd: list[str], cwd: Path, log_file: Path) -> Child:
    """Run `cmd` in `cwd` with its output in `log_file`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start, busy = time.perf_counter(), busy_cpu_s()
    with open(log_file, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (ru_maxrss in KB on Linux)
    wall = time.perf_counter() - start
    others = max(0.0, busy_cpu_s() - busy - usage.ru_utime - usage.ru_stime) / wall
    return Child(os.waitstatus_to_exitcode(status), wall, usage.ru_maxrss / 1024, others)


def fail(what: str, log_file: Path) -> None:
    tail = log_file.read_text(errors="replace")[-4000:] if log_file.exists() else ""
    sys.exit(f"{what} failed (log: {log_file}):\n{tail}")


# --- backbones -----------------------------------------------------------------------------------
def smollm2_folder() -> Path:
    """The project's own de-quantized SmolLM2 cache (built once, about a minute)."""
    from rmpipe.model.backbones import SMOLLM2_CACHE, ignore_from_git, materialize_smollm2

    ignore_from_git((ROOT / SMOLLM2_CACHE).parent)
    return materialize_smollm2(ROOT / SMOLLM2_CACHE)


def tiny_folder(sample_train, max_length: int) -> Path:
    """rmpipe's tiny backbone, its tokenizer trained on the sample split plus every long-set phrase.

    The long set is measured in the backbone's tokens, so its tokenizer must exist first; training it on
    the generator's phrases gives it the merges the long set needs. Cached by the hash of its inputs.
    """
    import yaml

    import long_prompts
    from rmpipe.model.backbones import build_tiny_backbone, ignore_from_git, tiny_corpus
    from rmpipe.core.settings import ModelSettings

    model_cfg = {**yaml.safe_load((ROOT / "params.yaml").read_text())["model"], "max_length": max_length}
    texts = list(tiny_corpus(sample_train)) + list(long_prompts.corpus())
    key = hashlib.sha256(json.dumps([model_cfg, texts], sort_keys=True, default=str).encode()).hexdigest()[:16]
    ignore_from_git(CACHE)
    folder = CACHE / f"tiny-{key}"
    if not (folder / "config.json").exists():
        tmp = Path(tempfile.mkdtemp(dir=CACHE))
        build_tiny_backbone(texts, ModelSettings.from_section(model_cfg), tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return folder


# --- data ---------------------------------------------------------------------------------------
def sample_splits(where: Path):
    """(train, val) split frames of the bundled sample, made by the project's own stages in `where`."""
    where.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "params.yaml", where / "params.yaml")
    for name, cmd in [("sample-data", [sys.executable, "-m", "pipeline.cli", "sample-data"])] + [
            (stage, [sys.executable, "-m", f"stages.{stage}"]) for stage in ("collect", "aggregate", "split")]:
        if run_child(cmd, where, where / f"{name}.log").code != 0:
            fail(f"sample data: {name}", where / f"{name}.log")
    import pandas as pd

    return (pd.read_parquet(where / "data/split/train.parquet"), pd.read_parquet(where / "data/split/val.parquet"))


def dataset(name: str, s: Settings, tokenizer, sample):
    """(train = B*N pairs, val = B pairs): identical input for both trainers."""
    if name == "sample":
        train, val = sample
        if len(train) < s.n_pairs:
            sys.exit(f"the sample train split has {len(train)} pairs, fewer than B*N = {s.n_pairs}")
        return train.head(s.n_pairs).reset_index(drop=True), val.head(s.batch_pairs).reset_index(drop=True)
    if name == "long":
        from long_prompts import make_long_pairs

        frame = make_long_pairs(s.n_pairs + s.batch_pairs, s.seed, tokenizer)
        return frame.head(s.n_pairs).reset_index(drop=True), frame.tail(s.batch_pairs).reset_index(drop=True)
    if name in K4_SETS:
        if s.batch_pairs % 6:
            sys.exit(f"--batch-pairs must be a multiple of 6 for {name} (whole prompts of 6 comparisons)")
        if name == "long4":
            from long_prompts import make_long_groups

            frame = make_long_groups((s.n_pairs + s.batch_pairs) // 6, s.seed, tokenizer)
        else:
            frame = sample_groups((s.n_pairs + s.batch_pairs) // 6, s.seed)
        return frame.head(s.n_pairs).reset_index(drop=True), frame.tail(s.batch_pairs).reset_index(drop=True)
    sys.exit(f"unknown data set {name!r} (sample, long, long4, sample4)")


def sample_groups(n_groups: int, seed: int):
    """K = 4 groups from the bundled sample's generator: per prompt two (good, flawed) draws, ranked
    good, good, flawed, flawed; all 6 comparisons, with the split's columns."""
    import pandas as pd

    from rmpipe.data.sample.texts import ranked_groups
    from rmpipe.core.schema import PAIR_COLUMNS, canonical_prompt, pair_id, prompt_hash

    rows = []
    for prompt, ranked in ranked_groups(n_groups, seed):
        canonical, digest = canonical_prompt(prompt), prompt_hash(prompt)
        rows += [{"pair_id": pair_id(canonical, ranked[i], ranked[j]), "prompt": canonical, "chosen": ranked[i],
                  "rejected": ranked[j], "n_votes": 1, "n_chosen": 1, "n_rejected": 0, "n_tie": 0, "agreement": 1.0,
                  "soft_label": 1.0, "margin": 0.0, "prompt_hash": digest, "split": "train",
                  "batch_ids": ["sample_groups"]} for i in range(4) for j in range(i + 1, 4)]
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


# --- rmpipe --------------------------------------------------------------------------------------
def rmpipe_has_packing() -> bool:
    from rmpipe.core.settings import TrainSettings

    return "packing" in TrainSettings.model_fields


def rmpipe_params(s: Settings, backbone: Path, mode: str) -> dict:
    """The repo's params.yaml with the benchmark's settings: one epoch of N batches of exactly B pairs."""
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(backbone=str(backbone), max_length=s.max_length)
    params["train"].update(
        epochs=1, lr=s.lr, seed=s.seed, max_pairs_per_batch=s.batch_pairs, tokens_per_batch=BIG_BUDGET,
        warmup_ratio=s.warmup_ratio, weight_decay=s.weight_decay, grad_clip=s.grad_clip, head_lr_mult=1.0,
        checkpoint_every=10**6, num_procs=1, hostfile=None, zero_stage=0, offload_optimizer=False,
        deepspeed_config=None, bf16=False, gradient_checkpointing=False, use_margin=False, use_soft_labels=False,
        center_coef=0.0)
    if rmpipe_has_packing():
        params["train"]["packing"] = mode
    return params


def rmpipe_plan(params: dict, tokenizer, train) -> tuple[list[list[int]], list[int], list[int]]:
    """rmpipe's batches for epoch 0, and per batch (real tokens stacked, tokens rmpipe itself counts).

    Recomputed with rmpipe's own planner so tokens/s can count every run the same way (a shared prompt
    is computed once by rmpipe's shared_prompt layout but counts twice here, as in any stacked trainer).
    """
    from rmpipe.training import loop as rt
    from rmpipe.model.batching import plan_batches
    from rmpipe.model.render import tokenize_pairs
    from rmpipe.core.settings import TrainSettings

    pairs = tokenize_pairs(tokenizer, train, params["model"]["max_length"])
    settings = TrainSettings.from_section(params["train"])
    mode = getattr(settings, "packing", "none")
    if hasattr(rt, "plan_units"):  # batches of units (single pairs, or whole groups)
        units, plans = rt.plan_epochs(pairs, settings, 1)
        plan = [units.rows(b) for b in plans[0]]
        packed = [int(units.tokens[b].sum()) for b in plans[0]]
    else:
        plan = (rt.plan_epochs(pairs, settings, 1)[0] if hasattr(rt, "plan_epochs") else
                plan_batches(pairs.lengths(), settings.tokens_per_batch, settings.max_pairs_per_batch, settings.seed))
        packed = None
    prefix = getattr(pairs, "prefix", None)
    stacked = [sum(len(pairs.chosen[i]) + len(pairs.rejected[i]) for i in b) for b in plan]
    if mode in ("shared_prompt", "groups") and packed is not None:
        own = packed
    else:
        own = [n - (int(sum(prefix[i] for i in b)) if mode == "shared_prompt" and prefix is not None else 0)
               for n, b in zip(stacked, plan)]
    return plan, stacked, own


def read_tsv(path: Path) -> list[float]:
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    key = next(k for k in rows[0] if k not in ("step", "timestamp"))
    return [float(r[key]) for r in rows]


def run_rmpipe(run_dir: Path, s: Settings, backbone: Path, mode: str, tokenizer, train, val, real_tokens: int) -> dict:
    """`python -m stages.train` in a scratch project holding just params.yaml and the two splits."""
    import yaml

    params = rmpipe_params(s, backbone, mode)
    (run_dir / "data/split").mkdir(parents=True)
    (run_dir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    train.to_parquet(run_dir / "data/split/train.parquet", index=False)
    val.to_parquet(run_dir / "data/split/val.parquet", index=False)
    try:
        _, stacked, own = rmpipe_plan(params, tokenizer, train)
    except Exception as exc:  # rmpipe's planner changed shape: keep going, tokens/s becomes an estimate
        log(f"      cannot recompute rmpipe's batches ({type(exc).__name__}: {exc}); tokens/s is estimated")
        stacked = own = None

    child = run_child([sys.executable, "-m", "stages.train"], run_dir, run_dir / "run.log")
    if child.code != 0:
        fail(f"rmpipe[{mode}]", run_dir / "run.log")
    live = run_dir / RMPIPE_LIVE
    pairs_per_s, tokens_per_s = read_tsv(live / "pairs_per_s.tsv"), read_tsv(live / "tokens_per_s.tsv")
    # rmpipe logs pairs/s = B / step_s and tokens/s = its own token count / step_s for every step.
    step_s = [s.batch_pairs / p for p in pairs_per_s]
    logged_tokens = [round(t * dt) for t, dt in zip(tokens_per_s, step_s)]
    if stacked is None:  # rmpipe's own per-step counts, scaled to count every prompt twice
        stacked = [n * real_tokens / sum(logged_tokens) for n in logged_tokens]
    metrics = json.loads((run_dir / "metrics/train.json").read_text())
    training = json.loads((run_dir / "models/reward_model/training.json").read_text())
    return {
        "step_s": step_s, "tokens": stacked, "losses": read_tsv(live / "loss.tsv"), "lrs_after_step": read_tsv(live / "lr.tsv"),
        "wall_s": child.wall_s, "rss_mb": child.rss_mb, "others_cores": child.others_cores,
        "packing": training.get("packing", "none"),
        "plan_matches_log": logged_tokens == own,  # our recomputed batches are the ones rmpipe ran
        "computed_tokens": sum(own) if own is not None else sum(logged_tokens),
        "truncated_pairs": metrics.get("truncated_pairs"), "rmpipe_metrics": metrics,
    }


# --- TRL -----------------------------------------------------------------------------------------
def lr_multipliers(s: Settings) -> list[float]:
    """The lr multiplier of each of rmpipe's N optimizer steps (rmpipe.training.ds_config.warmup_cosine)."""
    from rmpipe.training.ds_config import warmup_cosine, warmup_steps

    warmup = warmup_steps(s.warmup_ratio, s.steps)
    return [warmup_cosine(step, s.steps, warmup) for step in range(s.steps)]


def run_trl(run_dir: Path, s: Settings, backbone: Path, head_init: str, tokenizer, train) -> dict:
    """This script again (`--_run-trl spec.json`) in its own process."""
    train.to_parquet(run_dir / "train.parquet", index=False)
    order = None
    if s.trl_order == "rmpipe":  # rmpipe's stacked-layout batches, in rmpipe's order
        plan, _, _ = rmpipe_plan(rmpipe_params(s, backbone, "none"), tokenizer, train)
        order = [i for batch in plan for i in batch]
    spec = {**asdict(s), "backbone_dir": str(backbone), "head_init": head_init, "train": str(run_dir / "train.parquet"),
            "order": order, "lr_multipliers": lr_multipliers(s), "threads": os.cpu_count() or 1,
            "result": str(run_dir / "result.json")}
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=1))
    child = run_child([sys.executable, str(Path(__file__).resolve()), "--_run-trl", str(run_dir / "spec.json")],
                      run_dir, run_dir / "run.log")
    if child.code != 0:
        fail("trl", run_dir / "run.log")
    return {**json.loads((run_dir / "result.json").read_text()), "wall_s": child.wall_s, "rss_mb": child.rss_mb,
            "others_cores": child.others_cores}


def distinct_pad_token(tokenizer, sequences: list[list[int]]) -> str | None:
    """A pad token for TRL's pooling when the current one ends some sequence, else None (keep it).

    transformers' *ForSequenceClassification reads the reward at the rightmost token != pad_token_id, so
    a sequence whose last real token is the pad token would be pooled one token early (TRL#2758).
    """
    pad = tokenizer.pad_token_id
    if all(seq[-1] != pad for seq in sequences):
        return None
    used = {t for seq in sequences for t in seq}
    for token in [tokenizer.unk_token, "<|endoftext|>", "<|pad|>", tokenizer.bos_token]:
        if token and token in tokenizer.get_vocab() and tokenizer.convert_tokens_to_ids(token) not in used:
            return token
    raise RuntimeError("no unused special token to pad with: TRL would pool the wrong token")


def trl_main(spec_file: str) -> None:
    """The TRL run (child process): RewardTrainer with rmpipe's settings, timed by a callback."""
    import torch

    spec = json.loads(Path(spec_file).read_text())
    # As rmpipe.training.distributed.make_deterministic does for one process.
    torch.set_num_threads(spec["threads"])
    torch.use_deterministic_algorithms(True, warn_only=True)

    import pandas as pd
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    from rmpipe.model.render import encode
    from rmpipe.model.reward_model import make_head
    from rmpipe.core.schema import prompt_messages

    folder, B, N = spec["backbone_dir"], spec["batch_pairs"], spec["steps"]
    frame = pd.read_parquet(spec["train"])
    if spec["order"] is not None:
        frame = frame.iloc[spec["order"]].reset_index(drop=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    expected = [(encode(tokenizer, p, c), encode(tokenizer, p, r))
                for p, c, r in zip(frame["prompt"], frame["chosen"], frame["rejected"])]
    original_pad = tokenizer.pad_token
    new_pad = distinct_pad_token(tokenizer, [seq for pair in expected for seq in pair])
    if new_pad is not None:
        tokenizer.pad_token = new_pad
    # TRL's conversational format: it renders prompt + assistant turn through the same chat template as rmpipe.
    data = Dataset.from_list([{"prompt": prompt_messages(p), "chosen": [{"role": "assistant", "content": c}],
                               "rejected": [{"role": "assistant", "content": r}]}
                              for p, c, r in zip(frame["prompt"], frame["chosen"], frame["rejected"])])

    with suppress_seqcls_warning():
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=torch.float32)
    with torch.no_grad():  # rmpipe's head init (same seed), so both start from the same weights
        head = make_head(model.config.hidden_size, spec["head_init"], torch.Generator().manual_seed(spec["seed"]))
        model.score.weight.copy_(head.weight)

    multipliers = spec["lr_multipliers"]

    class Trainer(RewardTrainer):
        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:  # rmpipe's per-step lr, exactly (see lr_multipliers)
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer, lambda k: multipliers[min(k, len(multipliers) - 1)])
            return self.lr_scheduler

    class Probe(TrainerCallback):
        """Per optimizer step: wall time (forward, backward, clip, AdamW, scheduler), lr, loss, tokens."""

        def __init__(self):
            self.step_s, self.lrs, self.losses, self.num_tokens, self.threads = [], [], [], [], None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.threads = torch.get_num_threads()
            self.checkpointing = bool(getattr(model, "is_gradient_checkpointing", False))

        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            self.lrs.append(float(optimizer.param_groups[0]["lr"]))
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_s.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))
                self.num_tokens.append(int(logs["num_tokens"]))  # cumulative sum of attention masks

    config = RewardConfig(
        output_dir=str(Path(spec_file).parent / "trl_out"), per_device_train_batch_size=B, max_steps=N,
        num_train_epochs=1, learning_rate=spec["lr"], seed=spec["seed"], data_seed=spec["seed"],
        optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=spec["weight_decay"],
        max_grad_norm=spec["grad_clip"], warmup_steps=0, max_length=spec["max_length"],
        train_sampling_strategy="sequential" if spec["order"] is not None else "random",
        logging_steps=1, report_to="none", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
        dataloader_num_workers=0, dataloader_pin_memory=False)
    probe = Probe()
    trainer = Trainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=[probe])
    kept = trainer.train_dataset
    if len(kept) != len(frame):
        raise RuntimeError(f"TRL dropped {len(frame) - len(kept)} of {len(frame)} pairs longer than max_length")
    ids_match = all(list(c) == e[0] and list(r) == e[1]
                    for c, r, e in zip(kept["chosen_ids"], kept["rejected_ids"], expected))
    trainer.train()

    steps_tokens = [b - a for a, b in zip([0] + probe.num_tokens, probe.num_tokens)]
    Path(spec["result"]).write_text(json.dumps({
        "step_s": probe.step_s, "tokens": steps_tokens, "losses": probe.losses, "lrs": probe.lrs,
        "threads": probe.threads, "gradient_checkpointing": probe.checkpointing, "ids_match_rmpipe": ids_match, "pad_token": tokenizer.pad_token,
        "original_pad_token": original_pad, "pooled_token": "rightmost token != pad_token_id",
        "expected_tokens": sum(len(c) + len(r) for c, r in expected),
        "computed_tokens": sum(steps_tokens),  # real tokens only: its padding is computed too
    }))


# --- summary -------------------------------------------------------------------------------------
def summarize(raw: dict, batch_pairs: int) -> dict:
    """Steady-state rates (first step left out), last / last-3 loss."""
    step_s, tokens, losses = raw["step_s"], raw["tokens"], raw["losses"]
    skip = 1 if len(step_s) > 1 else 0
    busy = sum(step_s[skip:])
    return {
        "steps": len(step_s), "pairs_per_s": batch_pairs * (len(step_s) - skip) / busy,
        "tokens_per_s": sum(tokens[skip:]) / busy, "median_step_s": statistics.median(step_s),
        "first_step_s": step_s[0], "last_loss": losses[-1], "loss_last3": statistics.fmean(losses[-3:]),
        "rss_mb": raw["rss_mb"], "wall_s": raw["wall_s"], "others_cores": raw["others_cores"],
        "computed_tokens": raw.get("computed_tokens", float("nan")),
    }


COLUMNS = [("pairs/s", "pairs_per_s", "{:.2f}"), ("tokens/s", "tokens_per_s", "{:,.0f}"),
           ("tok computed", "computed_tokens", "{:,.0f}"),
           ("med step s", "median_step_s", "{:.3f}"), ("1st step s", "first_step_s", "{:.2f}"),
           ("peak RSS MB", "rss_mb", "{:,.0f}"), ("last loss", "last_loss", "{:.4f}"),
           ("loss last3", "loss_last3", "{:.4f}"), ("wall s", "wall_s", "{:.1f}"),
           ("other cores", "others_cores", "{:.2f}")]


def print_tables(results: list[dict], s: Settings, info: dict) -> dict:
    """One table per data set (medians over repeats) and the rmpipe/trl pairs/s ratio per mode."""
    ratios = {}
    for name in s.datasets:
        rows = [r for r in results if r["dataset"] == name]
        log(f"\n== {name}: {s.n_pairs} pairs = {s.steps} steps x {s.batch_pairs} pairs, "
            f"{info[name]['real_tokens']:,} real tokens, backbone {s.backbone}, {s.repeats} repeat(s) (medians)")
        log(f"{'run':<22}" + "".join(f"{title:>13}" for title, _, _ in COLUMNS))
        for run in ["trl"] + [f"rmpipe[{m}]" for m in s.modes]:
            mine = [r["summary"] for r in rows if r["run"] == run]
            log(f"{run:<22}" + "".join(f"{fmt.format(statistics.median(m[key] for m in mine)):>13}"
                                        for _, key, fmt in COLUMNS))
        for mode in s.modes:
            per_repeat = [next(r for r in rows if r["run"] == f"rmpipe[{mode}]" and r["repeat"] == k)["summary"]["pairs_per_s"]
                          / next(r for r in rows if r["run"] == "trl" and r["repeat"] == k)["summary"]["pairs_per_s"]
                          for k in range(s.repeats)]
            ratios[f"{name}/{mode}"] = statistics.median(per_repeat)
            trl_tokens = statistics.median(r["summary"]["computed_tokens"] for r in rows if r["run"] == "trl")
            own_tokens = statistics.median(r["summary"]["computed_tokens"] for r in rows if r["run"] == f"rmpipe[{mode}]")
            log(f"rmpipe[{mode}] / trl pairs/s: {statistics.median(per_repeat):.2f}x "
                f"(median of {', '.join(f'{x:.2f}' for x in per_repeat)}); token bound "
                f"{trl_tokens / own_tokens:.2f}x ({trl_tokens:,.0f} / {own_tokens:,.0f} tokens computed)")
    return ratios


def check(results: list[dict], s: Settings) -> list[str]:
    """What would make a comparison unfair, in words (also stored in --out)."""
    notes = []
    for r in results:
        raw, tag = r["raw"], f"{r['dataset']} {r['run']} r{r['repeat']}"
        if raw["others_cores"] > BUSY_CORES:  # 2 torch threads on 2 shared cores slow down many-fold
            notes.append(f"{tag}: other processes used {raw['others_cores']:.2f} cores meanwhile: timings unreliable")
        if len(raw["step_s"]) != s.steps:
            notes.append(f"{tag}: {len(raw['step_s'])} steps, not {s.steps}")
        if round(sum(raw["tokens"])) != r["real_tokens"]:
            notes.append(f"{tag}: counted {sum(raw['tokens'])} real tokens, the data set has {r['real_tokens']}")
        if r["run"] == "trl":
            if not raw["ids_match_rmpipe"]:
                notes.append(f"{tag}: TRL's token ids differ from rmpipe.model.render.encode")
            if raw["pad_token"] != raw["original_pad_token"]:
                notes.append(f"{tag}: pad token {raw['original_pad_token']!r} ends some sequences; TRL padded with "
                             f"{raw['pad_token']!r} so its pooling reads the last real token")
        else:
            if not raw["plan_matches_log"]:
                notes.append(f"{tag}: recomputed rmpipe batches do not match its logged token counts (tokens/s inexact)")
            if raw["truncated_pairs"]:
                notes.append(f"{tag}: rmpipe truncated {raw['truncated_pairs']} pairs")
            if r["run"] != f"rmpipe[{raw['packing']}]":
                notes.append(f"{tag}: rmpipe ran packing {raw['packing']!r}")
    return notes


# --- main ----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", choices=sorted(DEFAULTS), default=None, help="default smollm2 (tiny with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny backbone, 6 steps, 1 repeat: a smoke run")
    parser.add_argument("--datasets", default="sample,long")
    parser.add_argument("--batch-pairs", type=int, default=None,
                        help="B (default 4 smollm2, 16 tiny; 6 / 24 when a K = 4 set runs)")
    parser.add_argument("--steps", type=int, default=None, help="N (default 8; 6 with --quick)")
    parser.add_argument("--max-length", type=int, default=1024, help="no pair of either data set is longer")
    parser.add_argument("--lr", type=float, default=None, help="default 1e-5 smollm2, 3e-3 tiny")
    parser.add_argument("--warmup-ratio", type=float, default=0.0, help="train.warmup_ratio (TRL mirrors the schedule)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--modes", default="shared_prompt", help="rmpipe train.packing values, comma-separated")
    parser.add_argument("--trl-order", choices=("random", "rmpipe"), default="random",
                        help="TRL's batches: its own random sampler, or rmpipe's length-bucketed batches")
    parser.add_argument("--out", type=Path, default=None, help="raw results as JSON")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run folders here (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    backbone = args.backbone or ("tiny" if args.quick else "smollm2")
    b, n, lr = DEFAULTS[backbone]
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    if any(d in K4_SETS for d in datasets):
        b = GROUPED_BATCH[backbone]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not rmpipe_has_packing() and modes != ["none"]:
        log(f"note: this rmpipe has no train.packing; running modes {modes} as 'none'")
        modes = ["none"]
    s = Settings(backbone=backbone, datasets=datasets,
                 batch_pairs=args.batch_pairs or b, steps=args.steps or (6 if args.quick else n),
                 max_length=args.max_length, lr=args.lr or lr, seed=args.seed, repeats=args.repeats, modes=modes,
                 trl_order=args.trl_order, warmup_ratio=args.warmup_ratio)
    s.out, s.keep = args.out, args.keep  # not part of the settings record
    return s


def main(argv: list[str] | None = None) -> None:
    s = parse_args(argv)
    import yaml

    from rmpipe.model.backbones import load_tokenizer
    from rmpipe.model.render import encode

    work = s.keep or Path(tempfile.mkdtemp(prefix="rmpipe-bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        log(f"settings: {json.dumps(asdict(s))}\nwork dir: {work}")
        before = busy_cpu_s()
        time.sleep(2)
        if (busy := (busy_cpu_s() - before) / 2) > BUSY_CORES:
            log(f"WARNING: other processes keep {busy:.2f} cores busy: timings will be unreliable")
        sample = sample_splits(work / "sample") if "sample" in s.datasets or s.backbone == "tiny" else None
        backbone = smollm2_folder() if s.backbone == "smollm2" else tiny_folder(sample[0], s.max_length)
        head_init = yaml.safe_load((ROOT / "params.yaml").read_text())["model"]["head_init"]
        tokenizer = load_tokenizer(backbone)
        data = {name: dataset(name, s, tokenizer, sample) for name in s.datasets}
        info = {}
        for name, (train, _) in data.items():
            lengths = [(len(encode(tokenizer, p, c)), len(encode(tokenizer, p, r)))
                       for p, c, r in zip(train["prompt"], train["chosen"], train["rejected"])]
            info[name] = {"real_tokens": sum(c + r for c, r in lengths), "longest": max(max(x) for x in lengths)}
            log(f"data {name}: {len(train)} pairs, {info[name]['real_tokens']:,} real tokens, longest sequence "
                f"{info[name]['longest']} (max_length {s.max_length})")

        runs = [(k, name, run) for k in range(s.repeats) for name in s.datasets
                for run in ["trl"] + [f"rmpipe[{m}]" for m in s.modes]]
        results = []
        for i, (k, name, run) in enumerate(runs, 1):
            log(f"[{i}/{len(runs)}] {run} {name} repeat {k + 1} ...")
            run_dir = work / "runs" / f"{name}-{run.replace('[', '-').rstrip(']')}-r{k + 1}"
            run_dir.mkdir(parents=True)
            train, val = data[name]
            raw = (run_trl(run_dir, s, backbone, head_init, tokenizer, train) if run == "trl" else
                   run_rmpipe(run_dir, s, backbone, run[len("rmpipe["):-1], tokenizer, train, val,
                              info[name]["real_tokens"]))
            summary = summarize(raw, s.batch_pairs)
            results.append({"dataset": name, "run": run, "repeat": k, "real_tokens": info[name]["real_tokens"],
                            "summary": summary, "raw": raw})
            log(f"      {summary['pairs_per_s']:.2f} pairs/s, {summary['tokens_per_s']:,.0f} tokens/s, "
                f"last loss {summary['last_loss']:.4f}, peak RSS {summary['rss_mb']:,.0f} MB, {summary['wall_s']:.1f} s")

        ratios = print_tables(results, s, info)
        notes = check(results, s)
        log("\n" + ("\n".join(f"NOTE: {n}" for n in notes) if notes else "checks: every run did N steps over all "
            "B*N pairs, same token ids and pooled token in both trainers, nothing truncated"))
        log(f"total {time.perf_counter() - started:.0f} s")
        if s.out:
            s.out.write_text(json.dumps({"settings": asdict(s), "data": info, "ratios_pairs_per_s": ratios,
                                         "notes": notes, "runs": results}, indent=1))
            log(f"raw results: {s.out}")
    finally:
        if s.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--_run-trl":
        trl_main(sys.argv[2])
    else:
        main()
