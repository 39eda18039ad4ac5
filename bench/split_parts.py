"""Benchmark (issue #28): split and validate on a folder of pairs parts, full run against one new part.

Usage:  .venv/bin/python bench/split_parts.py [--pairs 100000] [--parts 8] [--new-pairs 2500] [--keep DIR]

Makes real aggregated pairs once (generated batches of `--pairs + --new-pairs` pairs, 4 votes a pair,
through `python -m stages.collect` and `stages.aggregate`), then cuts the pairs table into `--parts` parts of
the history and one new part of the last `--new-pairs` rows, in the pairs folder (`ProjectPaths().pairs`,
the layout split reads through `rmpipe.core.paths.pair_parts`). Then, each stage as `dvc repro` runs it
(`python -m stages.<name>` in the project):

  part alone    split + validate on a project holding only the new part (the per-run cost)
  full run      split + validate on the history, memos deleted first
  +1 part       the new part added, split + validate again (memos warm)
  from scratch  the same folder, memos deleted: its outputs must be byte-identical to `+1 part`'s

CPU s = user + system of each stage's process (os.wait4), as bench/data_stages.py measures them.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_stages import make_project, run_stage

from rmpipe.core.paths import ProjectPaths

PAIRS = ProjectPaths().pairs  # where the pairs parts go (a folder: rmpipe.core.paths.pair_parts)


def output_hashes(project: Path) -> dict[str, str]:
    """sha256 of the splits and the two reports (not the data docs: HTML stamped with the run's time)."""
    files = sorted(p for p in (project / "data/split").rglob("*") if p.is_file())
    files += [project / "reports/split.json", project / "reports/validation.json"]
    return {p.relative_to(project).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def make_parts(source: Path, n_pairs: int, n_parts: int, new_pairs: int) -> Path:
    """Real pairs (collect + aggregate on generated batches) cut into parts: `parts/part-NN.parquet` of the
    history and `new/part-99-new.parquet`."""
    make_project(source, n_pairs + new_pairs, max(1, (n_pairs + new_pairs) // 31_250))
    for name in ("collect", "aggregate"):
        _, cpu, _, status = run_stage(name, source)
        print(f"  made pairs: {name} {cpu:.1f} CPU s", flush=True)
        if status != 0:
            raise SystemExit(f"{name} failed")
    table = pq.read_table(source / "data/aggregated/pairs.parquet")  # one file: what aggregate writes here
    rows, cuts = table.num_rows - new_pairs, []
    for k in range(n_parts + 1):
        cuts.append(rows * k // n_parts)
    (source / "parts").mkdir()
    (source / "new").mkdir()
    for k in range(n_parts):
        pq.write_table(table.slice(cuts[k], cuts[k + 1] - cuts[k]), source / "parts" / f"part-{k:02d}.parquet")
    pq.write_table(table.slice(rows), source / "new" / "part-99-new.parquet")
    return source


def project(where: Path, source: Path, parts: list[Path]) -> Path:
    shutil.rmtree(where, ignore_errors=True)
    (where / PAIRS).mkdir(parents=True)
    shutil.copy(source / "params.yaml", where / "params.yaml")
    for part in parts:
        shutil.copy(part, where / PAIRS / part.name)
    return where


def stages(where: Path, label: str, rows: list) -> None:
    cpus = []
    for name in ("split", "validate"):
        _, cpu, _rss, status = run_stage(name, where)
        cpus.append(cpu)
        if status != 0:
            print(f"  {label}: {name} exited {status}", flush=True)
    rows.append((label, *cpus, sum(cpus)))
    print(f"  {label:<13} split {cpus[0]:5.1f}  validate {cpus[1]:5.1f}  total {sum(cpus):5.1f} CPU s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=100_000, help="pairs in the history")
    parser.add_argument("--parts", type=int, default=8, help="parts the history is cut into")
    parser.add_argument("--new-pairs", type=int, default=2_500, help="pairs in the new part")
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep it (default: a temp folder)")
    args = parser.parse_args()
    scratch = args.keep or Path(tempfile.mkdtemp(prefix="split-parts-"))
    scratch.mkdir(parents=True, exist_ok=True)
    source = scratch / "source"
    if not (source / "new").is_dir():
        shutil.rmtree(source, ignore_errors=True)
        source.mkdir()
        make_parts(source, args.pairs, args.parts, args.new_pairs)
    history, new = sorted((source / "parts").iterdir()), sorted((source / "new").iterdir())
    rows: list = []
    stages(project(scratch / "alone", source, new), "part alone", rows)
    main_project = project(scratch / "main", source, history)
    stages(main_project, "full run", rows)
    shutil.copy(new[0], main_project / PAIRS / new[0].name)
    stages(main_project, "+1 part", rows)
    incremental = output_hashes(main_project)
    shutil.rmtree(main_project / ".rmpipe")
    stages(main_project, "from scratch", rows)
    same = output_hashes(main_project) == incremental
    print("\n| run | split | validate | total CPU s |\n|---|---:|---:|---:|")
    for label, split_cpu, validate_cpu, total in rows:
        print(f"| {label} | {split_cpu:.1f} | {validate_cpu:.1f} | {total:.1f} |")
    print(f"\n+1 part outputs byte-identical to from scratch (splits, split.json, validation.json): {same}")
    if args.keep is None:
        shutil.rmtree(scratch, ignore_errors=True)
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
