"""What a finished rebuild reports and ships: the metrics, the promotion decision, the push to the DVC remote.

The export stage applies the promotion gate inside `dvc repro` (rmpipe.export.promotion), so the decision
is part of the DVC-tracked run and its lineage manifest; here it is read back for the run records.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline import prefect_env

prefect_env.configure()  # before `import prefect`: Prefect reads its settings at import

from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from pipeline.dvc_runner import default_remote, dvc  # noqa: E402
from pipeline.tasks import TRANSIENT_RETRIES, TransientFailure, retry_transient_only  # noqa: E402
from rmpipe.core.params import PARAMS_FILE, load_params  # noqa: E402


def read_metrics(root: Path) -> dict[str, Any]:
    """The workspace's metrics files (dvc.yaml `metrics:`), read by DVC: {metrics file: values}.

    DVC names the workspace revision "workspace" in one version and "" in another; asked
    for no revision, it answers only the workspace, so the one entry is taken whatever its key.
    A metrics file DVC cannot read is left out (it is named in the log).
    """
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        revs = repo.metrics.show()
    workspace = next(iter(revs.values()), None) or {}
    metrics = {}
    for name, entry in (workspace.get("data") or {}).items():
        if "data" in entry:
            metrics[name] = entry["data"]
        else:
            logging.getLogger("rmpipe.flows").warning("metrics file %s unreadable: %s", name, entry.get("error"))
    return metrics


def promotion(root: Path) -> dict[str, Any]:
    """The promotion gate's decision for the model this rebuild exported, with the batches it was trained on."""
    cfg = load_params(root / PARAMS_FILE).get("export")
    if not isinstance(cfg, dict) or "out_dir" not in cfg:
        return {"export_path": None, "promoted": False, "reason": "this pipeline has no export stage yet"}
    from rmpipe.audit.lineage import manifest_sha256, read_manifest

    export_dir = root / str(cfg["out_dir"])
    manifest = read_manifest(export_dir)
    decision = manifest.get("promotion") or {}
    batches = sorted({b for ids in (manifest.get("batch_ids") or {}).values() for b in ids})
    promoted_dir = cfg.get("promoted_dir")
    return {"export_path": str(cfg["out_dir"]), "manifest_sha256": manifest_sha256(export_dir),
            "batch_ids": batches, "promoted": bool(decision.get("promoted")), "reason": decision.get("reason"),
            "accuracy": decision.get("accuracy"), "prod_accuracy": decision.get("previous_accuracy"),
            "promoted_path": str(promoted_dir) if decision.get("promoted") and promoted_dir else None}


@task(retries=TRANSIENT_RETRIES, retry_delay_seconds=30, retry_condition_fn=retry_transient_only,
      cache_policy=NO_CACHE)
def push_to_remote(root: Path) -> str | None:
    """`dvc push` when the project has a default DVC remote: the new outputs become recoverable elsewhere."""
    remote = default_remote(root)
    if remote is None:
        return None
    proc = dvc(root, "push")
    if proc.returncode != 0:
        raise TransientFailure(f"dvc push to '{remote}' failed: {proc.stderr.strip()[-500:]}")
    return remote


def outcome_line(record: dict[str, Any]) -> str:
    """How a delivered batch ended, in one line: `batch X: model <id> (accuracy 0.981, +0.3 pts vs prod)
    promoted` / `... not promoted: <reason>` / `batch X rejected: <reason>` / `batch X <outcome>: <reason>`."""
    name, outcome = record.get("batch_id"), record.get("outcome")
    reasons = "; ".join(str(r) for r in record.get("reasons") or []) or "-"
    gate = record.get("promotion") or {}
    if outcome != "accepted":
        return f"batch {name} {outcome}: {reasons}"
    if not gate.get("export_path"):
        return f"batch {name} accepted, no model: {gate.get('reason') or 'the rebuild exported none'}"
    acc, prod = gate.get("accuracy"), gate.get("prod_accuracy")  # prod's: only where the gate compared them
    figures = f"accuracy {acc:.3f}" if isinstance(acc, (int, float)) else "accuracy -"
    if isinstance(acc, (int, float)) and isinstance(prod, (int, float)):
        figures += f", {(acc - prod) * 100:+.1f} pts vs prod"
    elif gate.get("promoted"):
        figures += ", none in prod before"
    model = (gate.get("manifest_sha256") or "?")[:12]  # the id `rmpipe history` and `rmpipe trace` show
    verdict = "promoted" if gate.get("promoted") else f"not promoted: {gate.get('reason')}"
    return f"batch {name}: model {model} ({figures}) {verdict}"
