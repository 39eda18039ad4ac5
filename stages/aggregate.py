"""DVC stage `aggregate`: data/collected/votes.parquet -> data/aggregated/pairs.parquet + annotator report."""

from __future__ import annotations

import logging

from rmpipe.aggregate import AggregateSettings, aggregate, annotator_markdown, check_dropped, read_votes
from rmpipe.errors import exits_cleanly
from rmpipe.io import write_json, write_parquet, write_text
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
    settings = AggregateSettings.from_params(section(load_params(), "aggregate"))
    result = aggregate(read_votes(VOTES), settings)
    write_parquet(PAIRS, result.pairs)
    write_json(REPORT_JSON, result.report)
    write_text(REPORT_MD, annotator_markdown(result.report))
    check_dropped(result.report, settings)  # after the reports, so the message can point at them
    log.info("wrote %s (%d pairs), %s, %s", PAIRS, len(result.pairs), REPORT_JSON, REPORT_MD)


if __name__ == "__main__":
    main()
