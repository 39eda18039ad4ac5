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

`data.scheduler` names a running cluster (`tcp://host:8786`); its workers need the project importable
(same code version) and the data on storage they see at the same absolute paths. Empty: a
LocalCluster of `data.workers` processes on this machine, started and stopped with the stage.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from rmpipe.core.errors import ConfigError
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


@contextlib.contextmanager
def batch_runner(settings: DataSettings, collect_batch: Callable) -> Iterator[BatchRunner | None]:
    """For collect: None (local: one batch after the other) or a function submitting every batch to Dask
    (`collect.batch` is passed in, so this module imports no stage's code and stays out of their deps)."""
    if settings.engine == "local":
        yield None
        return
    with dask_client(settings) as client:

        def submit(files: list[Path], conf: Any, retracted: list[dict], parts: Path, **options: Any) -> list:
            # absolute paths: a worker's working folder is not the stage's (the data sits on shared storage)
            return [client.submit(collect_batch, path.absolute(), conf, retracted=retracted, pure=False,
                                  votes_to=parts.absolute() / f"ahead-{number:06d}.parquet", **options)
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
