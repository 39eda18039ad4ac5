"""DVC stage `tokenize`: train/val splits + the backbone's tokenizer -> data/tokenized/ (token ids, cached).

    python -m stages.tokenize [--params params.yaml]

Renders every pair through the backbone's chat template once; training reads the ids from here
(and re-tokenizes by itself only if this cache does not match its inputs). Pairs longer than
model.max_length are left-truncated and counted, never dropped.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rmpipe import tokenized
from rmpipe.backbones import check_backbone, resolve_backbone
from rmpipe.errors import exits_cleanly
from rmpipe.params import get, load_params, section
from rmpipe.progress import setup_logging
from rmpipe.train import TrainPaths, read_splits

log = logging.getLogger("rmpipe.tokenize")


def run(params_file: str = "params.yaml", paths: TrainPaths | None = None) -> dict:
    model_cfg = section(load_params(params_file), "model")
    paths = paths or TrainPaths()
    frames = dict(zip(("train", "val"), read_splits(paths)))
    backbone_dir = resolve_backbone(model_cfg, Path.cwd())
    _, tokenizer = check_backbone(backbone_dir, get(model_cfg, "trust_remote_code", bool, "model"))  # has a pad token
    max_length = get(model_cfg, "max_length", int, "model")
    key = tokenized.cache_key(backbone_dir, paths, max_length)
    pairs = tokenized.tokenize_splits(tokenizer, frames, max_length)
    tokenized.write(paths.tokenized, pairs, key)
    for name, split in pairs.items():
        shared = split.prefix.sum() / max(1, sum(len(c) for c in split.chosen))
        log.info("%s: %d pairs, %d truncated to %d tokens, %.0f%% of chosen tokens shared with rejected",
                 name, len(split), split.n_truncated, max_length, 100 * shared)
    return {name: len(split) for name, split in pairs.items()}


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    setup_logging()
    parser = argparse.ArgumentParser(prog="python -m stages.tokenize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    run(args.params)


if __name__ == "__main__":
    main(sys.argv[1:])
