"""Where the data stages' parallel work runs: `data.engine: local` (this process) or `dask` (a Dask cluster).

The engine is an execution choice, never a result: outputs are byte-identical either way (tested on a
real two-worker cluster). With `dask`, aggregate's group-by on the pair code (votes per pair and label)
runs as partial counts on the workers, summed here; collect checks every batch file at once, one task per file on
the cluster's workers, each knowing no earlier batch (`collect.batch` is a function of one file). The
stage then walks the batches in file-name order, as the local path does, and keeps a batch's result
only where knowing the earlier batches could not have changed it: accepted, bytes not seen before,
no vote already in the table. Any other batch (a duplicate file, a duplicate vote across batches,
a rejected batch, whose counts would include those duplicates) is collected again here, in order,
exactly as the local path does.

Nothing a worker says is taken on its word: each task first checks that the worker runs the stage's code
(the rmpipe package, by content) and library versions, and refuses in one line otherwise; the
stage compares the sha256 a worker read with its own hash of the file; each attempt writes its own part
(`ahead-N.<attempt>.parquet`) and the one whose result the stage takes is renamed to `ahead-N.parquet`.

`data.scheduler` names a running cluster (`tcp://host:8786`); its workers need the project importable
(same code version) and the data on storage they see at the same absolute paths. Empty: a
LocalCluster of `data.workers` processes on this machine, started and stopped with the stage.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import logging
import os
import platform
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from rmpipe.core.errors import ConfigError, DataError
from rmpipe.core.io import folder_sha256, sha256_file
from rmpipe.core.settings import DataSettings

log = logging.getLogger("rmpipe.engine")



@contextlib.contextmanager
def dask_client(settings: DataSettings) -> Iterator[Any]:
    """A distributed.Client on `settings.scheduler`, or on a LocalCluster that lives as long as the block."""
    from distributed import Client, LocalCluster

    if settings.scheduler:
        try:
            client = Client(settings.scheduler, timeout="30s")
        except OSError as exc:
            raise ConfigError(f"data.scheduler {settings.scheduler!r} cannot be reached ({exc}): start the Dask "
                              "scheduler, fix the address, or set data.scheduler: '' for a local cluster") from None
        with client:
            _announce(client)
            yield client
        return
    with LocalCluster(n_workers=settings.workers or None, processes=True, threads_per_worker=1,
                      dashboard_address=None, host="127.0.0.1") as cluster, Client(cluster) as client:
        _announce(client)
        yield client


def _announce(client: Any) -> None:
    info = client.scheduler_info()
    log.info("data.engine=dask: scheduler %s, %d workers", info["address"], len(info["workers"]))


BatchRunner = Callable[..., list]
# What a worker must run exactly as the stage does for its result to be the stage's: the code (the rmpipe
# package, by content) and the libraries that read, hash and write the data.
LIBRARIES = ("pyarrow", "numpy", "pandas", "orjson", "xxhash", "datasets")


class WorkerMismatch(DataError):
    """A Dask worker runs other code or library versions than the stage, or saw other bytes of a batch."""


PACKAGE = Path(__file__).resolve().parents[1]  # rmpipe/: the code a worker runs for any task


@functools.lru_cache(maxsize=1)
def _stack() -> tuple[tuple[str, str], ...]:
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "absent"

    code = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):  # the whole package by content: one code version, as documented
        code.update(f"{path.relative_to(PACKAGE).as_posix()}\x1f{sha256_file(path)}\n".encode())
    return (("code", code.hexdigest()), ("python", platform.python_version()),
            *((name, version(name)) for name in LIBRARIES))


def stack_fingerprint() -> dict[str, str]:
    """{'code': sha256 of every module of the rmpipe package, 'python': ..., library: version} in this process."""
    return dict(_stack())


def collect_on_worker(collect_batch: Callable, expected: dict[str, str], path: Path, conf: Any, parts: Path,
                      number: int, **options: Any) -> Any:
    """The Dask task of one batch: refuse (one line) on a worker whose code or libraries are not the stage's,
    else collect it into a part named for this attempt alone (`ahead-N.<attempt>.parquet`), so a retried
    task never writes over a first attempt that is still running."""
    here = stack_fingerprint()
    if here != expected:
        differ = [f"{key} {here.get(key)} (stage: {value})" for key, value in expected.items() if here.get(key) != value]
        raise WorkerMismatch(f"Dask worker on {platform.node()} (pid {os.getpid()}) runs other code or libraries than "
                             f"the collect stage: {'; '.join(differ)}: install the project's code and "
                             "requirements.lock on every worker (or set data.engine: local)")
    return collect_batch(path, conf, votes_to=parts / f"ahead-{number:06d}.{uuid.uuid4().hex}.parquet", **options)


class Checked:
    """A batch's Dask future whose `result()` the stage trusts only after checking it: the sha256 the worker
    read must be the one of the file as this process sees it (else the workers see other data: one line), and
    the attempt's part is renamed atomically to `ahead-N.parquet`, the one name the merge reads."""

    def __init__(self, future: Any, path: Path, part: Path):
        self.future, self.path, self.part = future, path, part

    def result(self) -> Any:
        result = self.future.result()
        reported = result.report.get("sha256")
        if reported is not None:
            mine = folder_sha256(self.path) if self.path.is_dir() else sha256_file(self.path)
            if mine != reported:
                raise WorkerMismatch(f"{self.path}: the Dask worker read sha256 {reported[:16]}..., this process reads "
                                     f"{mine[:16]}...: the workers must see the batches at the same absolute path, "
                                     "unchanged while collect runs (shared storage), or set data.engine: local")
        if result.part is not None:
            os.replace(result.part, self.part)  # the winner's part; a late attempt's own part is never this name
            result.part = self.part
        return result


@contextlib.contextmanager
def batch_runner(settings: DataSettings, collect_batch: Callable) -> Iterator[BatchRunner | None]:
    """For collect: None (local: one batch after the other) or a function submitting every batch to Dask
    (`collect.batch` is passed in, so this module imports no stage's code and stays out of their deps)."""
    if settings.engine == "local":
        yield None
        return
    with dask_client(settings) as client:

        expected = stack_fingerprint()

        def submit(files: list[Path], conf: Any, retracted: list[dict], parts: Path, **options: Any) -> list:
            # absolute paths: a worker's working folder is not the stage's (the data sits on shared storage)
            return [Checked(client.submit(collect_on_worker, collect_batch, expected, path.absolute(), conf,
                                          parts.absolute(), number, retracted=retracted, pure=False, **options),
                            path.absolute(), parts.absolute() / f"ahead-{number:06d}.parquet")
                    for number, path in enumerate(files)]

        yield submit


@contextlib.contextmanager
def pair_counter(settings: DataSettings, count_pairs: Callable) -> Iterator[Callable | None]:
    """For aggregate: None (local) or the group-by on the pair code (`count_pairs`) as partial counts on the
    cluster's workers, one slice of the votes each, summed here (integer sums: the same arrays in any split)."""
    if settings.engine == "local":
        yield None
        return
    with dask_client(settings) as client:
        def count(pair: Any, label: Any, weight: Any, prejudged: Any, n_pairs: int) -> tuple:
            n = max(len(client.scheduler_info()["workers"]), 1)
            cuts = [len(pair) * k // n for k in range(n + 1)]
            parts = client.gather([client.submit(count_pairs, pair[a:b], label[a:b], weight[a:b], prejudged[a:b],
                                                 n_pairs, pure=False) for a, b in zip(cuts, cuts[1:])])
            return tuple(np.sum([part[i] for part in parts], axis=0) for i in range(3))

        yield count
