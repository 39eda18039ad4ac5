"""Benchmark (issue #28): what an arriving or retracted batch costs the four data stages, side by side.

Usage:  .venv/bin/python bench/data_stages.py --incremental [--votes 1000000] [--keep DIR] [--new-votes 10000]

In one run, on one generated history (`--votes`, as bench/data_stages.py makes it) and one new batch of
`--new-votes` votes (another seed, 4 votes a pair, named to sort after the history):

  batch alone   the four stages on a project holding only the new batch (the per-run cost)
  full run      the four stages on the history, memo deleted first (what every run cost before #28)
  1% more       the new batch dropped in, the four stages again (memo warm)
  from scratch  the same folder, memo deleted, again: its outputs must be byte-identical to `1% more`'s
  retraction    the new batch retracted (register entry, file removed), the four stages again: its outputs
                must be byte-identical to the full run's

CPU s = user + system of each stage's process (os.wait4), as bench/data_stages.py measures them.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

STAGES = ["collect", "aggregate", "split", "validate"]
OUTPUTS = ["data/collected", "data/aggregated", "data/split", "reports"]
NEW_NAME = "batch-9999-new.jsonl"


def output_hashes(project: Path) -> dict[str, str]:
    """sha256 of every output file of the four stages, but the GX data docs (HTML stamped with the run's time)."""
    hashes = {}
    for top in OUTPUTS:
        for path in sorted((project / top).rglob("*")):
            if path.is_file() and "data_docs" not in path.parts:
                hashes[path.relative_to(project).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def new_batch(project: Path, votes: int, out: Path) -> Path:
    """One batch of `votes` votes from another seed, written to `out`."""
    from rmpipe.data.sample.batches import write_sample_batches

    params = yaml.safe_load((project / "params.yaml").read_text())["sample_data"]
    params.update(seed=params["seed"] + 7919, n_pairs=max(1, votes // 4), n_batches=1, pair_rows=0)
    with tempfile.TemporaryDirectory() as tmp:
        (written,) = write_sample_batches(tmp, params)
        shutil.move(written, out)
    return out


def stages(project: Path, run_stage, label: str, rows: list) -> None:
    """The four stages in `project`; one row (label, CPU s per stage, total, wall) appended to `rows`."""
    cpus, wall = [], 0.0
    for name in STAGES:
        seconds, cpu, _rss, status = run_stage(name, project)
        if status != 0:
            sys.exit(f"{label}: stage {name} failed (exit {status})")
        cpus.append(cpu)
        wall += seconds
    rows.append((label, cpus, sum(cpus), wall))
    print(f"{label:<14} " + " ".join(f"{c:>9.1f}" for c in cpus) + f" {sum(cpus):>9.1f} {wall:>9.1f}", flush=True)


def drop_memo(project: Path) -> None:
    shutil.rmtree(project / ".rmpipe" / "memo", ignore_errors=True)


def retract(project: Path, batch: Path) -> None:
    """What `rmpipe retract` does to the data before its rebuild: a register entry, the file moved out."""
    from rmpipe.core.io import sha256_file
    from rmpipe.data import retractions

    entry = {"kind": "batch", "target": batch.name, "sha256": sha256_file(batch), "reason": "benchmark",
             "by": "bench", "time": "2026-12-07T00:00:00Z"}
    retractions.register(project, entry)
    (project / retractions.RETRACTED_DIR).mkdir(parents=True, exist_ok=True)
    shutil.move(batch, project / retractions.RETRACTED_DIR / batch.name)


def run(project: Path, new_votes: int, run_stage) -> int:
    """The five runs above; prints the table and the byte checks; exit status 1 if a check fails."""
    from rmpipe.data import retractions

    incoming = project / "data" / "incoming"
    (incoming / NEW_NAME).unlink(missing_ok=True)  # a kept project from an earlier run: its new batch and
    (project / retractions.REGISTER).unlink(missing_ok=True)  # that batch's retraction go
    shutil.rmtree(project / retractions.RETRACTED_DIR, ignore_errors=True)
    alone = Path(tempfile.mkdtemp(prefix="rmpipe-bench-alone-"))
    rows: list = []
    try:
        (alone / "data" / "incoming").mkdir(parents=True)
        shutil.copy(project / "params.yaml", alone / "params.yaml")
        batch = new_batch(project, new_votes, alone / "data" / "incoming" / NEW_NAME)
        print(f"{'run':<14} " + " ".join(f"{s:>9}" for s in STAGES) + f" {'CPU s':>9} {'wall s':>9}")
        stages(alone, run_stage, "batch alone", rows)
        drop_memo(project)
        stages(project, run_stage, "full run", rows)
        full = output_hashes(project)
        shutil.copy(batch, incoming / NEW_NAME)
        stages(project, run_stage, "1% more", rows)
        more = output_hashes(project)
        drop_memo(project)
        stages(project, run_stage, "from scratch", rows)
        scratch = output_hashes(project)
        retract(project, incoming / NEW_NAME)
        stages(project, run_stage, "retraction", rows)
        after = output_hashes(project)
    finally:
        shutil.rmtree(alone, ignore_errors=True)
    return report(rows, [("1% more == from scratch", more, scratch), ("retraction == full run", after, full)])


def report(rows: list, checks: list) -> int:
    by = {label: total for label, _cpus, total, _wall in rows}
    base, full = by["batch alone"], by["full run"]
    print(f"\n1% more: {by['1% more']:.1f} CPU s; target batch alone + 5% of full = {base + 0.05 * full:.1f}")
    print(f"retraction: {by['retraction']:.1f} CPU s; target batch alone + 10% of full = {base + 0.10 * full:.1f}")
    failed = 0
    for label, got, want in checks:
        differ = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        print(f"{label}: {'byte-identical' if not differ else 'DIFFERS: ' + ', '.join(differ[:8])} "
              f"({len(want)} files)")
        failed += bool(differ)
    return 1 if failed else 0
