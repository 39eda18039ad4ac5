"""Benchmark: what the data stages cannot go below on this machine, with no Python work around it.

Usage:  .venv/bin/python bench/data_floor.py DIR
        (DIR: a project kept by `bench/data_stages.py --keep DIR`, collected at least once)

Times, each alone: pyarrow's own JSON/CSV readers on the batches, sha256 of the batch files (collect's
duplicate-file check), reading the votes parts, writing them again with zstd (collect's output), one
sha256 per distinct response (what pair ids are made of), and importing the stages' heavy libraries.
Their sum is a lower bound for collect -> validate as four processes under today's data contract.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from rmpipe.core.paths import parts_in


def timed(label: str, work, total: list[float]):
    start = time.perf_counter()
    result = work()
    took = time.perf_counter() - start
    total.append(took)
    print(f"{label:<58} {took:6.1f} s", flush=True)
    return result


def parse(files: list[Path]) -> None:
    for path in files:
        if path.suffix == ".jsonl":
            try:
                pa_json.read_json(path)
            except pa.ArrowInvalid:  # a prompt column of strings and lists: split the lines at least
                pa.array(path.read_bytes().splitlines())
        else:
            pa_csv.read_csv(path, parse_options=pa_csv.ParseOptions(newlines_in_values=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("project", type=Path)
    root = parser.parse_args().project
    files = sorted(p for p in (root / "data" / "incoming").iterdir() if p.suffix in (".jsonl", ".csv"))
    total: list[float] = []
    timed(f"parse the {len(files)} batches (pyarrow JSON/CSV readers)", lambda: parse(files), total)
    timed("sha256 of the batch files", lambda: [hashlib.file_digest(p.open("rb"), "sha256") for p in files], total)
    parts = parts_in(root / "data" / "collected" / "votes")
    votes = timed(f"read the {len(parts)} votes parts", lambda: pa.concat_tables([pq.read_table(p) for p in parts]), total)
    with tempfile.TemporaryDirectory() as tmp:
        timed("write it again (zstd, 50k-row groups)",
              lambda: pq.write_table(votes, Path(tmp) / "v.parquet", compression="zstd", row_group_size=50_000), total)
    texts = pa.concat_arrays([votes[c].combine_chunks() for c in ("response_a", "response_b")]).unique().to_pylist()
    timed(f"sha256 of each of the {len(texts):,} distinct responses",
          lambda: [hashlib.sha256(t.encode()).hexdigest() for t in texts], total)
    for module in ("pandas", "great_expectations"):
        timed(f"python -c 'import {module}'", lambda: subprocess.run([sys.executable, "-c", f"import {module}"],
                                                                     check=True, capture_output=True), total)
    print(f"{'sum':<58} {sum(total):6.1f} s")


if __name__ == "__main__":
    main()
