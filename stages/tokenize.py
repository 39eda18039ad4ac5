"""DVC stage `tokenize`: train/val splits + the backbone's tokenizer -> data/tokenized/ (token ids, cached).

    python -m stages.tokenize [--params params.yaml]

Renders every pair through the backbone's chat template once; training reads the ids from here
(and re-tokenizes by itself only if this cache does not match its inputs). Pairs longer than
model.max_length are left-truncated and counted, never dropped.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from rmpipe.core.params import PARAMS_FILE, load_params
from rmpipe.core.paths import ProjectPaths, training_splits
from rmpipe.core.settings import ModelSettings
from rmpipe.core.stage import stage_main
from rmpipe.model import tokenized
from rmpipe.model.backbones import check_backbone, resolve_backbone
from rmpipe.model.render import tokenize_splits

log = logging.getLogger("rmpipe.tokenize")


def run(params_file: str | Path = PARAMS_FILE, paths: ProjectPaths = ProjectPaths()) -> dict:
    settings = ModelSettings.parse(load_params(params_file))
    frames = dict(zip(("train", "val"), training_splits(paths)))
    backbone_dir = resolve_backbone(settings, Path.cwd())
    _, tokenizer = check_backbone(backbone_dir, settings.trust_remote_code)  # has a pad token
    max_length = settings.max_length
    key = tokenized.cache_key(backbone_dir, paths, max_length)
    pairs = tokenize_splits(tokenizer, frames, max_length)
    tokenized.write(paths.tokenized, pairs, key)
    for name, split in pairs.items():
        shared = split.prefix.sum() / max(1, sum(len(c) for c in split.chosen))
        log.info("%s: %d pairs, %d truncated to %d tokens, %.0f%% of chosen tokens shared with rejected",
                 name, len(split), split.n_truncated, max_length, 100 * shared)
    return {name: len(split) for name, split in pairs.items()}


main = stage_main("tokenize", run, __doc__)

if __name__ == "__main__":
    main(sys.argv[1:])
