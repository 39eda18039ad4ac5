"""DVC stage `collect`: data/incoming/* batches -> data/collected/votes.parquet + quarantine + reports/collect.json.

    python -m stages.collect [--params params.yaml]

The report and the quarantine are written before a rejected batch stops the run,
so the error message can point at them. If data/incoming changes while the stage
reads it, the stage fails (see `rmpipe.collect.raise_if_changed`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rmpipe import retractions
from rmpipe.collect import CollectConfig, collect_to, incoming_snapshot, raise_for_rejected, raise_if_changed
from rmpipe.collect_batch import collect_batch
from rmpipe.engine import EngineSettings, batch_runner
from rmpipe.errors import exits_cleanly
from rmpipe.io import atomic_path, write_json, write_jsonl
from rmpipe.params import load_params, section
from rmpipe.progress import setup_logging

VOTES = "data/collected/votes.parquet"
QUARANTINE = "data/collected/quarantine.jsonl"
REPORT = "reports/collect.json"

log = logging.getLogger("rmpipe.collect")


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    setup_logging()
    parser = argparse.ArgumentParser(prog="python -m stages.collect", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    cfg = CollectConfig.from_params(section(params, "collect"))
    engine = EngineSettings.from_params(params)  # where the batches are read; never what comes out
    # What DVC will hash as this stage's input must be exactly what was read: snapshot the
    # folder first and fail at the end if it changed (DVC then records nothing for the stage).
    before = incoming_snapshot(cfg.incoming_dir)
    # The votes stream into a temp file, published only if no rejected batch stops the run.
    with batch_runner(engine, collect_batch) as ahead, atomic_path(VOTES) as votes:
        quarantine, report = collect_to(cfg.incoming_dir, cfg, votes, retractions.load(Path(".")), ahead=ahead)
        write_jsonl(QUARANTINE, quarantine)
        write_json(REPORT, report)
        raise_for_rejected(report, cfg)
    raise_if_changed(cfg.incoming_dir, before)
    totals = report["totals"]
    log.info("wrote %s: %d votes on %d pairs from %d annotators; %d rows quarantined (%s)",
             VOTES, totals["votes"], totals["pairs"], totals["annotators"], totals["rows_quarantined"], QUARANTINE)


if __name__ == "__main__":
    main(sys.argv[1:])
