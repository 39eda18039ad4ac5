"""DVC stage `collect`: data/incoming/* batches -> data/collected/votes/ (a part per batch) + quarantine + reports/collect.json.

    python -m stages.collect [--params params.yaml]

The report and the quarantine are written before a rejected batch stops the run,
so the error message can point at them. If data/incoming changes while the stage
reads it, the stage fails (see `rmpipe.data.collect.run.raise_if_changed`).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from rmpipe.core.errors import environment_fault
from rmpipe.core.io import atomic_dir, write_json, write_jsonl
from rmpipe.core.params import PARAMS_FILE, load_params
from rmpipe.core.paths import ProjectPaths
from rmpipe.core.settings import CollectSettings, DataSettings
from rmpipe.core.stage import stage_main
from rmpipe.data import retractions
from rmpipe.data.collect.batch import collect_batch
from rmpipe.data.collect.memo import MEMO_DIR, CollectMemo
from rmpipe.data.collect.run import (
    collect_to,
    incoming_snapshot,
    raise_for_rejected,
    raise_if_changed,
)
from rmpipe.data.engine import batch_runner

log = logging.getLogger("rmpipe.collect")


def run(params_file: str | Path = PARAMS_FILE, paths: ProjectPaths = ProjectPaths()) -> dict:
    params = load_params(params_file)
    cfg = CollectSettings.parse(params)
    engine = DataSettings.parse(params)  # where the batches are read; never what comes out
    # What DVC will hash as this stage's input must be exactly what was read: snapshot the
    # folder first and fail at the end if it changed (DVC then records nothing for the stage).
    before = incoming_snapshot(cfg.incoming_dir)
    # The votes go to a temp folder, published only if no rejected batch stops the run.
    try:
        with batch_runner(engine, collect_batch) as ahead, atomic_dir(paths.votes) as votes:
            memo = CollectMemo(MEMO_DIR, cfg)  # a cache of each batch's outcome: deleting it changes only time
            quarantine, report = collect_to(cfg.incoming_dir, cfg, votes, retractions.load(Path(".")), ahead=ahead,
                                            memo=memo)
            write_jsonl(paths.quarantine, quarantine)
            write_json(paths.collect_report, report)
            raise_for_rejected(report, cfg)
    except OSError as exc:  # a full disk: which folder, how much is free and about how much collect needs
        size = sum(st[0] for st in before.values()) / 2**20
        fault = environment_fault(exc, paths.votes.parent, f"up to about {size:.1f} MB (the batches' size)")
        if fault is None:
            raise
        raise fault from None
    raise_if_changed(cfg.incoming_dir, before)
    memo.moved(votes, paths.votes)
    memo.finish()
    totals = report["totals"]
    log.info("wrote %s: %d votes on %d pairs from %d annotators; %d rows quarantined (%s)", paths.votes,
             totals["votes"], totals["pairs"], totals["annotators"], totals["rows_quarantined"], paths.quarantine)
    return report


main = stage_main("collect", run, __doc__)

if __name__ == "__main__":
    main(sys.argv[1:])
