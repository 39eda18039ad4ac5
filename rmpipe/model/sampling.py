"""Candidate responses for annotation: prompts -> SFT samples -> A/B tasks (the first half of "collect pairs").

Each prompt gets `sampling.n_completions` samples from the SFT causal LM through its chat
template (generation prompt on). Every unordered pair of *distinct* completions becomes one
annotation task, written in the vote-row shape minus `choice` / `annotator_id`, so a labelled
file dropped into data/incoming/ flows straight through the collect stage. With `groups`, each
prompt becomes one ranking task instead (`prompt`, `responses`: its K distinct completions):
labelled with a `ranking` or `scores`, it is a ranked group collect expands into the same pairs.

Reproducible: each prompt is sampled under its own seed, derived from `sampling.seed` and the
prompt's hash, so a prompt's completions do not depend on which other prompts share the file.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from pathlib import Path
from typing import Any

import torch

from rmpipe.core.errors import DataError
from rmpipe.core.progress import progress
from rmpipe.core.schema import (
    PromptError,
    canonical_prompt,
    normalize_text,
    pair_id,
    prompt_hash,
    prompt_messages,
)
from rmpipe.core.settings import ModelSettings, SamplingSettings
from rmpipe.model.backbones import max_positions

log = logging.getLogger("rmpipe.sampling")


# --- prompts in ------------------------------------------------------------------------------
def read_prompts(path: str | Path) -> list[str]:
    """Canonical prompts from a .jsonl (`prompt`: string or chat messages) or .txt (one per line) file.

    Blank lines are skipped; a prompt given twice (same prompt hash) is sampled once.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"prompts file {path} not found")
    if path.suffix not in (".jsonl", ".txt"):
        raise DataError(f"prompts file {path} must be .jsonl (with a 'prompt' field) or .txt (one prompt per line)")
    prompts: dict[str, str] = {}
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                raw = _prompt_field(line) if path.suffix == ".jsonl" else line.rstrip("\n")
                canonical = canonical_prompt(raw)
            except (PromptError, ValueError) as exc:
                raise DataError(f"{path}:{line_no}: {exc}") from None
            prompts.setdefault(prompt_hash(canonical), canonical)
    if not prompts:
        raise DataError(f"prompts file {path} holds no prompts")
    return list(prompts.values())


def _prompt_field(line: str) -> Any:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg})") from None
    if not isinstance(row, dict) or "prompt" not in row:
        raise ValueError("each line must be a JSON object with a 'prompt' field")
    return row["prompt"]


# --- sampling --------------------------------------------------------------------------------
def prompt_seed(seed: int, canonical: str) -> int:
    """The seed one prompt is sampled under: a function of the run seed and the prompt only."""
    digest = hashlib.sha256(f"{seed}\x1f{prompt_hash(canonical)}".encode()).hexdigest()
    return int(digest[:8], 16)


@torch.no_grad()
def sample_completions(model, tokenizer, canonical: str, settings: SamplingSettings) -> list[str] | None:
    """`n_completions` sampled responses to one prompt, or None when the prompt leaves no room to generate."""
    text = tokenizer.apply_chat_template(prompt_messages(canonical), tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(model.device)
    prompt_len = inputs["input_ids"].shape[1]
    if prompt_len + settings.max_new_tokens > max_positions(model):
        return None
    with torch.random.fork_rng(devices=[]):  # seeded per prompt, without disturbing the caller's RNG
        torch.manual_seed(prompt_seed(settings.seed, canonical))
        output = model.generate(
            **inputs,
            do_sample=True,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=0,  # nucleus sampling only; generate() would otherwise add a default top-k of 50
            max_new_tokens=settings.max_new_tokens,
            num_return_sequences=settings.n_completions,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return [tokenizer.decode(row[prompt_len:], skip_special_tokens=True).strip() for row in output]


def _distinct(completions: list[str]) -> tuple[list[tuple[int, str]], int]:
    """(index, text) of the first of each distinct non-empty completion, and how many were empty."""
    kept: dict[str, tuple[int, str]] = {}
    empty = 0
    for index, completion in enumerate(completions):
        if not completion:
            empty += 1
            continue
        kept.setdefault(normalize_text(completion), (index, completion))
    return list(kept.values()), empty


def group_task(canonical: str, completions: list[str], metadata: dict[str, Any]) -> tuple[list[dict], dict[str, int]]:
    """One ranking task per prompt: its distinct completions as `responses` (none when fewer than 2)."""
    distinct, empty = _distinct(completions)
    non_empty = len(completions) - empty
    counts = {"empty_completions": empty, "identical_pairs_skipped": non_empty * (non_empty - 1) // 2
              - len(distinct) * (len(distinct) - 1) // 2}
    if len(distinct) < 2:
        return [], counts
    task = {"task_id": prompt_hash(canonical)[:12], "prompt": prompt_messages(canonical),
            "responses": [text for _, text in distinct], **metadata}
    return [task], counts


def pair_tasks(canonical: str, completions: list[str], metadata: dict[str, Any]) -> tuple[list[dict], dict[str, int]]:
    """All unordered pairs of distinct, non-empty completions as annotation tasks (+ counts of what was left out).

    Completions equal after whitespace/Unicode normalization (what `pair_id` and collect compare)
    are kept once, so no task asks an annotator to compare a response with itself.
    """
    distinct, empty = _distinct(completions)
    non_empty = len(completions) - empty
    messages = prompt_messages(canonical)
    tag = prompt_hash(canonical)[:12]
    tasks = [
        {
            "task_id": f"{tag}-{i}-{j}",
            "pair_id": pair_id(canonical, a, b),
            "prompt": messages,
            "response_a": a,
            "response_b": b,
            **metadata,
        }
        for (i, a), (j, b) in itertools.combinations(distinct, 2)
    ]
    pairs_possible = non_empty * (non_empty - 1) // 2
    return tasks, {"empty_completions": empty, "identical_pairs_skipped": pairs_possible - len(tasks)}


def sample_tasks(model, tokenizer, prompts: list[str], settings: SamplingSettings, backbone: str,
                 groups: bool = False) -> tuple[list[dict], dict]:
    """Annotation tasks for every prompt (A/B pairs, or one ranking task each with `groups`), plus a report
    of what was generated and what was left out."""
    model.eval()
    tasks: list[dict] = []
    report = {"prompts": len(prompts), "prompts_too_long": 0, "completions": 0, "empty_completions": 0,
              "identical_pairs_skipped": 0, "prompts_without_pairs": 0}
    for canonical in progress(prompts, total=len(prompts), desc="sampling"):
        completions = sample_completions(model, tokenizer, canonical, settings)
        if completions is None:
            report["prompts_too_long"] += 1
            continue
        metadata = {"backbone": backbone, **settings.model_dump(), "prompt_seed": prompt_seed(settings.seed, canonical)}
        new_tasks, counts = (group_task if groups else pair_tasks)(canonical, completions, metadata)
        report["completions"] += len(completions)
        for key, value in counts.items():
            report[key] += value
        report["prompts_without_pairs"] += not new_tasks
        tasks.extend(new_tasks)
    report["tasks"] = len(tasks)
    return tasks, report


def sample_pairs_file(prompts_path: str | Path, out_path: str | Path, model_settings: ModelSettings,
                      settings: SamplingSettings, groups: bool = False) -> dict:
    """`rmpipe sample-pairs`: read prompts, sample with the SFT backbone, write the tasks JSONL atomically."""
    from rmpipe.core import io
    from rmpipe.model.backbones import load_backbone, sampling_source

    prompts = read_prompts(prompts_path)
    name = model_settings.backbone
    model, tokenizer = load_backbone(sampling_source(model_settings), trust_remote_code=model_settings.trust_remote_code,
                                     lm_head=True)
    log.info("sampling %d completions for each of %d prompts with backbone %s", settings.n_completions, len(prompts), name)
    tasks, report = sample_tasks(model, tokenizer, prompts, settings, name, groups=groups)
    io.write_jsonl(out_path, tasks)
    log.info("%d tasks -> %s (%d identical pairs skipped, %d empty completions, %d prompts too long for the backbone)",
             report["tasks"], out_path, report["identical_pairs_skipped"], report["empty_completions"],
             report["prompts_too_long"])
    return report
