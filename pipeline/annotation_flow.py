"""The `annotation-pull` flow: finished Label Studio judgements -> one batch -> `on-new-batch`.

See `pipeline.annotate` for the commands. The batch is written to `.rmpipe/annotate/outbox/` (a
delivery folder, like a watched one: on-new-batch copies it into its queue and admits it into
data/incoming with its `.source.json`). Handed-over names are kept in
`.rmpipe/annotate/outbox/.delivered.json`, written after on-new-batch returned.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline import prefect_env

prefect_env.configure()  # before `import prefect`: Prefect reads its settings at import

from prefect import flow, get_run_logger

from pipeline.annotate import OUTBOX
from pipeline.flows import on_new_batch
from pipeline.prefect_env import find_project_root
from pipeline.tasks import fails_cleanly
from rmpipe.core import io

DELIVERED = ".delivered.json"


def _delivered(outbox: Path) -> list[str]:
    path = outbox / DELIVERED
    return json.loads(path.read_text()) if path.is_file() else []


def _undelivered(outbox: Path) -> list[Path]:
    done = set(_delivered(outbox))
    return sorted(p for p in outbox.glob("label-studio-*.jsonl") if p.name not in done) if outbox.is_dir() else []


@flow(name="annotation-pull", log_prints=True)
@fails_cleanly
def annotation_pull(label_studio_project: str, project: str | None = None) -> dict[str, Any]:
    """Pull once; hand every batch not yet handed over to on-new-batch. Returns what happened."""
    from rmpipe.data.annotate.client import Client, connection
    from rmpipe.data.annotate.pull import pull

    root = find_project_root(project)
    outbox = root / OUTBOX
    logger = get_run_logger()
    summary = pull(Client(connection(root)), label_studio_project, outbox, root)
    logger.info("pulled export %s of %r: %s", summary["export_id"], label_studio_project,
                summary["batch"] or "nothing new")
    handed: dict[str, Any] = {}
    for batch in _undelivered(outbox):
        record = on_new_batch(batch_path=str(batch), project=str(root))
        handed[batch.name] = record.get("outcome") if isinstance(record, dict) else str(record)
        io.write_json(outbox / DELIVERED, [*_delivered(outbox), batch.name])
    return {**summary, "handed_over": handed}
