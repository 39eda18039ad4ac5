"""Logging and progress for long work: a tqdm bar with ETA on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
log = logging.getLogger("rmpipe")


def setup_logging(level: int = logging.INFO) -> None:
    """One format for every stage: `12:01:02 collect | message`."""
    if getattr(setup_logging, "_done", False):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s | %(message)s", "%H:%M:%S"))
    root = logging.getLogger("rmpipe")
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    setup_logging._done = True  # type: ignore[attr-defined]


def on_terminal() -> bool:
    return sys.stderr.isatty() and os.environ.get("CI") is None


def progress(items: Iterable[T], total: int | None = None, desc: str = "", every_s: float = 10.0) -> Iterator[T]:
    """Iterate with a progress bar (terminal) or a log line every `every_s` seconds (logs, CI)."""
    if on_terminal():
        from tqdm.auto import tqdm

        yield from tqdm(items, total=total, desc=desc, dynamic_ncols=True)
        return
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            rate = done / (now - start)
            eta = f", eta {((total - done) / rate):.0f}s" if total and rate > 0 else ""
            of = f"/{total}" if total else ""
            log.info("%s %d%s (%.1f/s%s)", desc, done, of, rate, eta)
