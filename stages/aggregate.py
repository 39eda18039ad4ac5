"""DVC stage `aggregate`: data/collected/votes/ -> data/aggregated/pairs/ (parts) + annotator report.

    python -m stages.aggregate [--params params.yaml]
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from rmpipe.core.io import write_json, write_text
from rmpipe.core.params import PARAMS_FILE, load_params
from rmpipe.core.paths import ProjectPaths
from rmpipe.core.settings import DataSettings
from rmpipe.core.stage import stage_main
from rmpipe.data.aggregate.labels import count_pairs
from rmpipe.data.aggregate.memo import MEMO_DIR, AggregateMemo
from rmpipe.data.aggregate.run import (
    AggregateSettings,
    aggregate_file,
    annotator_markdown,
    check_dropped,
)
from rmpipe.data.engine import pair_counter

log = logging.getLogger("rmpipe.aggregate")


def run(params_file: str | Path = PARAMS_FILE, paths: ProjectPaths = ProjectPaths()) -> dict:
    params = load_params(params_file)
    settings = AggregateSettings.parse(params)
    engine = DataSettings.parse(params)  # where the group-by runs, not what it gives
    memo = AggregateMemo(MEMO_DIR, settings)  # the text work of unchanged parts: deleting it changes only time
    with pair_counter(engine, count_pairs) as counter:  # streams: texts never all in memory
        report = aggregate_file(paths.votes, paths.pairs, settings, counter, memo).report
    memo.finish()
    write_json(paths.annotators_json, report)
    write_text(paths.annotators_md, annotator_markdown(report))
    check_dropped(report, settings)  # after the reports, so the message can point at them
    log.info("wrote %s (%d pairs), %s, %s", paths.pairs, report["n_pairs_out"], paths.annotators_json,
             paths.annotators_md)
    return report


main = stage_main("aggregate", run, __doc__)

if __name__ == "__main__":
    main(sys.argv[1:])
