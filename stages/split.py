"""DVC stage `split`: aggregated pairs -> data/split/{train,val,test}.parquet + reports/split.json.

    python -m stages.split [--params params.yaml]

Streams: pairs.parquet is read a record batch at a time and each batch's rows are appended to the
split their prompt hash picks, so memory holds one batch of texts whatever the number of pairs.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

from rmpipe.core import io
from rmpipe.core.params import PARAMS_FILE, load_params
from rmpipe.core.paths import ProjectPaths, read_chunks
from rmpipe.core.schema import SPLITS
from rmpipe.core.settings import SplitSettings
from rmpipe.core.stage import stage_main
from rmpipe.data.split import SplitTally, check_not_empty, split_frames, split_pairs

log = logging.getLogger("rmpipe.split")

BATCH_ROWS = 32_768  # pairs per chunk: ~80 MB of real-length text


def run(params_file: str | Path = PARAMS_FILE, paths: ProjectPaths = ProjectPaths()) -> dict:
    settings = SplitSettings.parse(load_params(params_file))
    salt, fractions = settings.salt, settings.fractions

    tally = SplitTally()
    with io.atomic_dir(paths.split_dir) as tmp, contextlib.ExitStack() as files:
        out = {name: files.enter_context(io.ParquetChunks(tmp / f"{name}.parquet")) for name in SPLITS}
        for chunk in read_chunks(paths.pairs, BATCH_ROWS, "aggregate"):
            table = split_pairs(chunk, salt, fractions)
            tally.add(table)
            for name, frame in split_frames(table).items():
                out[name].write(frame)
    report = tally.report(fractions)
    io.write_json(paths.split_report, report)

    for name in fractions:
        part = report[name]
        log.info("%-5s %7d pairs  %6d prompts  (%.3f of prompts, target %.3f)",
                 name, part["pairs"], part["prompts"], part["prompt_fraction"], part["target_fraction"])
    check_not_empty(report)  # after the report, so it can be read
    return report


main = stage_main("split", run, __doc__)

if __name__ == "__main__":
    main(sys.argv[1:])
