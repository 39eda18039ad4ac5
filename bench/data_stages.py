"""Benchmark: the four data stages (collect -> aggregate -> split -> validate) on ~1,000,000 vote rows.

Usage:  .venv/bin/python bench/data_stages.py [--pairs 250000] [--keep DIR]

Generates realistic batches (prompts of a few hundred to a few thousand characters, responses of a
few hundred; ~4 votes per pair) into a scratch project, then runs each stage exactly as `dvc repro`
does (`python -m stages.<name>` in that folder) and prints wall seconds and peak RSS per stage,
measured on the stage's own process (os.wait4). Target on a 2-core machine: <= 60 s and <= 4 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["collect", "aggregate", "split", "validate"]


def make_project(where: Path, n_pairs: int, n_batches: int) -> None:
    """A scratch project: this repo's params.yaml plus generated batches."""
    from rmpipe.sample_data import write_sample_batches

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["sample_data"].update(n_pairs=n_pairs, n_batches=n_batches, long_texts=True, pair_rows=0,
                                 votes_per_pair={4: 1.0})  # exactly 4 votes per pair: 250k pairs -> 1M rows
    (where / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_sample_batches(where / "data" / "incoming", params["sample_data"])


def run_stage(name: str, cwd: Path) -> tuple[float, float, int]:
    """Run `python -m stages.<name>` in `cwd`; return (wall seconds, peak RSS in MB, exit code)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GX_ANALYTICS_ENABLED": "false"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", f"stages.{name}"], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.stderr.write(proc.stderr.read().decode(errors="replace")[-3000:])
    return wall, usage.ru_maxrss / 1024, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=250_000, help="distinct comparisons (~4 votes each)")
    parser.add_argument("--batches", type=int, default=8, help="delivered as this many files (~290 MB each)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the scratch project here")
    args = parser.parse_args()

    where = Path(tempfile.mkdtemp(prefix="rmpipe-bench-")) if args.keep is None else args.keep
    where.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        make_project(where, args.pairs, args.batches)
        size_mb = sum(p.stat().st_size for p in (where / "data" / "incoming").iterdir()) / 2**20
        print(f"generated {args.pairs:,} pairs ({size_mb:,.0f} MB in {args.batches} files) "
              f"in {time.perf_counter() - start:.1f}s", flush=True)
        print(f"{'stage':<10} {'seconds':>8} {'peak RSS MB':>12}")
        total, peak = 0.0, 0.0
        for name in STAGES:
            wall, rss, code = run_stage(name, where)
            total, peak = total + wall, max(peak, rss)
            print(f"{name:<10} {wall:>8.1f} {rss:>12,.0f}" + ("" if code == 0 else f"   FAILED (exit {code})"), flush=True)
            if code != 0:
                sys.exit(code)
            if name == "collect":
                totals = json.loads((where / "reports" / "collect.json").read_text())["totals"]
                print(f"{'':<10} {totals['rows_read']:,} vote rows read, {totals['rows_quarantined']:,} quarantined",
                      flush=True)
        print(f"{'total':<10} {total:>8.1f} {peak:>12,.0f}   (target: <= 60 s, <= 4096 MB)")
    finally:
        if args.keep is None:
            shutil.rmtree(where, ignore_errors=True)


if __name__ == "__main__":
    main()
