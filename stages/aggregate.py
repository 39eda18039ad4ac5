"""DVC stage `aggregate`: data/collected/votes.parquet -> data/aggregated/pairs.parquet + annotator report."""

from __future__ import annotations

import logging

from rmpipe.aggregate import AggregateSettings, aggregate_file, annotator_markdown, check_dropped
from rmpipe.aggregate_labels import count_pairs
from rmpipe.engine import EngineSettings, pair_counter
from rmpipe.errors import exits_cleanly
from rmpipe.io import write_json, write_text
from rmpipe.params import load_params, section
from rmpipe.progress import setup_logging

VOTES = "data/collected/votes.parquet"
PAIRS = "data/aggregated/pairs.parquet"
REPORT_JSON = "reports/annotators.json"
REPORT_MD = "reports/annotators.md"

log = logging.getLogger("rmpipe.aggregate")


@exits_cleanly
def main() -> None:
    setup_logging()
    params = load_params()
    settings = AggregateSettings.from_params(section(params, "aggregate"))
    with pair_counter(EngineSettings.from_params(params), count_pairs) as counter:  # where the group-by runs, not what it gives
        report = aggregate_file(VOTES, PAIRS, settings, counter).report  # streams: texts never all in memory
    write_json(REPORT_JSON, report)
    write_text(REPORT_MD, annotator_markdown(report))
    check_dropped(report, settings)  # after the reports, so the message can point at them
    log.info("wrote %s (%d pairs), %s, %s", PAIRS, report["n_pairs_out"], REPORT_JSON, REPORT_MD)


if __name__ == "__main__":
    main()
