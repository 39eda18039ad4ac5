"""Benchmark: the four data stages (collect -> aggregate -> split -> validate) on N generated votes.

Usage:  .venv/bin/python bench/data_stages.py [--votes 1000000] [--compare [--old REF]] [--keep DIR]
                                             [--engine local|dask [--workers 2]] [--pair-rows N]
                                             [--incremental [--new-votes 10000]]

Generates realistic batches (prompts of a few hundred to a few thousand characters, responses of a
few hundred; exactly 4 votes per pair) into a scratch project, then runs each stage exactly as
`dvc repro` does (`python -m stages.<name>` in that folder) and prints wall seconds and peak RSS per
stage, measured on the stage's own process (os.wait4: the child's ru_maxrss), and its CPU seconds (user +
system), the figure to compare on a machine shared with other jobs.

--compare also runs each stage with the code of git ref REF (default: the last commit before
issue #13's collect, whose collect read each batch whole and normalized it row by row), extracted
with `git archive` into a scratch folder: old and new alternate stage by stage in one run, on the
same batches. --engine dask runs collect's batches and aggregate's group-by on a LocalCluster of
--workers processes (data.engine; outputs are the same bytes). --pair-rows N adds N plain pair
rows (prompt, chosen, rejected as text, as public pairwise sets come) in one Parquet file.
Targets (issue #13, 2-core machine): 1M votes through the four stages <= 20 s, peak RSS <= 3 GB
in every stage at 1M and 5M votes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["collect", "aggregate", "split", "validate"]
OLD_REF = "dfaf729"  # main just before issue #13's collect landed


def make_project(where: Path, n_pairs: int, n_batches: int, pair_rows: int = 0) -> None:
    """A scratch project: this repo's params.yaml plus generated batches (and `pair_rows` public-style
    prompt / chosen / rejected rows in one Parquet file)."""
    from rmpipe.data.sample.batches import write_sample_batches

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["sample_data"].update(n_pairs=n_pairs, n_batches=n_batches, long_texts=True, pair_rows=pair_rows,
                                 votes_per_pair={4: 1.0})  # exactly 4 votes per pair: 250k pairs -> 1M rows
    (where / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_sample_batches(where / "data" / "incoming", params["sample_data"])


def set_engine(where: Path, engine: str, workers: int) -> None:
    """params.yaml's `data:` section: where collect's batches and aggregate's group-by run."""
    params = yaml.safe_load((where / "params.yaml").read_text())
    params.pop("data", None)  # absent: local (what the old code of --compare knows)
    if engine != "local":
        params["data"] = {"engine": engine, "scheduler": "", "workers": workers}
    (where / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def old_code(ref: str) -> Path:
    """The project's code at `ref`, extracted into a scratch folder (to run its stages)."""
    where = Path(tempfile.mkdtemp(prefix="rmpipe-bench-old-"))
    archive = subprocess.run(["git", "archive", ref, "rmpipe", "stages", "pipeline"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(where, filter="data")
    return where


def run_stage(name: str, cwd: Path, code: Path = ROOT) -> tuple[float, float, float, int]:
    """Run `python -m stages.<name>` in `cwd` with the code in `code`; (wall seconds, CPU seconds (user + system:
    what load from other jobs does not inflate), peak RSS MB, exit code)."""
    env = {**os.environ, "PYTHONPATH": str(code), "GX_ANALYTICS_ENABLED": "false"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", f"stages.{name}"], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read()  # read before waiting: a full pipe would block the stage
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code_ = os.waitstatus_to_exitcode(status)
    if code_ != 0:
        sys.stderr.write(stderr.decode(errors="replace")[-3000:])
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, code_


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--votes", type=int, default=1_000_000, help="vote rows (4 per pair)")
    parser.add_argument("--batches", type=int, default=None, help="files to deliver them in (default: 125k votes each)")
    parser.add_argument("--compare", action="store_true", help="run each stage with the old code too, interleaved")
    parser.add_argument("--old", default=OLD_REF, help=f"git ref of the old code (default {OLD_REF})")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to run (in order)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the scratch project here (reused if it has batches)")
    parser.add_argument("--engine", choices=["local", "dask"], default="local",
                        help="data.engine of the run (dask: a LocalCluster of --workers processes on this machine)")
    parser.add_argument("--pair-rows", type=int, default=0,
                        help="also deliver this many plain pair rows (prompt, chosen, rejected: a public pairwise set)")
    parser.add_argument("--workers", type=int, default=2, help="Dask workers with --engine dask")
    parser.add_argument("--incremental", action="store_true",
                        help="issue #28: batch alone, full run, 1%% more, from scratch, retraction (bench/incremental.py)")
    parser.add_argument("--new-votes", type=int, default=10_000, help="votes in the new batch with --incremental")
    args = parser.parse_args()
    batches = args.batches or max(1, round(args.votes / 125_000))

    where = Path(tempfile.mkdtemp(prefix="rmpipe-bench-")) if args.keep is None else args.keep
    where.mkdir(parents=True, exist_ok=True)
    codes = [("new", ROOT)] + ([("old", old_code(args.old))] if args.compare else [])
    try:
        start = time.perf_counter()
        if not (where / "data" / "incoming").is_dir():  # a kept project is reused as it is
            # in a process of its own: a child started from this one would report this one's peak RSS
            # as its own (Linux keeps the parent's high-water mark across fork + exec)
            maker = multiprocessing.get_context("spawn").Process(target=make_project,
                                                                  args=(where, args.votes // 4, batches, args.pair_rows))
            maker.start()
            maker.join()
            if maker.exitcode != 0:
                sys.exit(f"generating the batches failed (exit {maker.exitcode})")
        set_engine(where, args.engine, args.workers)
        size_mb = sum(p.stat().st_size for p in (where / "data" / "incoming").iterdir()) / 2**20
        files = len(list((where / "data" / "incoming").iterdir()))
        print(f"{args.votes:,} votes + {args.pair_rows:,} pair rows ({size_mb:,.0f} MB in {files} files) generated or reused "
              f"in {time.perf_counter() - start:.1f}s; load average {os.getloadavg()[0]:.2f}", flush=True)
        if args.incremental:
            sys.path.insert(0, str(ROOT / "bench"))
            import incremental

            sys.exit(incremental.run(where, args.new_votes, run_stage))
        print(f"{'stage':<10} {'code':<5} {'seconds':>8} {'CPU s':>8} {'peak RSS MB':>12}")
        total = {label: 0.0 for label, _ in codes}
        cpu_total = {label: 0.0 for label, _ in codes}
        peak = {label: 0.0 for label, _ in codes}
        for name in args.stages.split(","):
            for label, code in (reversed(codes) if args.compare else codes):  # old first: new reads the same input
                wall, cpu, rss, status = run_stage(name, where, code)
                total[label], peak[label] = total[label] + wall, max(peak[label], rss)
                cpu_total[label] += cpu
                print(f"{name:<10} {label:<5} {wall:>8.1f} {cpu:>8.1f} {rss:>12,.0f}"
                      + ("" if status == 0 else f"   FAILED (exit {status})"), flush=True)
                if status != 0:
                    sys.exit(status)
            if name == "collect":
                totals = json.loads((where / "reports" / "collect.json").read_text())["totals"]
                print(f"{'':<10} {totals['rows_read']:,} vote rows read, {totals['rows_quarantined']:,} quarantined",
                      flush=True)
        for label, _ in codes:
            print(f"{'total':<10} {label:<5} {total[label]:>8.1f} {cpu_total[label]:>8.1f} {peak[label]:>12,.0f}")
        print(f"targets: <= 20 s at 1M votes, <= 3072 MB per stage; load average now {os.getloadavg()[0]:.2f}")
    finally:
        for label, code in codes:
            if label == "old":
                shutil.rmtree(code, ignore_errors=True)
        if args.keep is None:
            shutil.rmtree(where, ignore_errors=True)


if __name__ == "__main__":
    main()
