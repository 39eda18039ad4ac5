"""Logging and progress for long work: a tqdm bar with ETA on a terminal, plain log lines otherwise."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
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
    quiet_progress_bars()
    setup_logging._done = True  # type: ignore[attr-defined]


def quiet_progress_bars() -> None:
    """Hugging Face's bars ("Loading weights", "Writing model shards") on every load and save of a local
    folder: off (in a log each is two lines, on a terminal it says nothing). The environment variable reaches
    child processes and libraries not imported yet; a hub download on a terminal turns its bar back on
    (`download_bars`). Set HF_HUB_DISABLE_PROGRESS_BARS=0 to keep them all."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] != "1":
        return
    if "transformers" in sys.modules:  # imported already: it read the variable at import
        import transformers.utils.logging

        transformers.utils.logging.disable_progress_bar()
    elif "huggingface_hub" in sys.modules:
        import huggingface_hub.utils

        huggingface_hub.utils.disable_progress_bars()


def download_bars(path_or_id: str) -> contextlib.AbstractContextManager:
    """Around a load of `path_or_id`: a download's bar on a terminal (a hub id, not a local folder), else nothing."""
    if not on_terminal() or Path(path_or_id).exists() or os.environ.get("HF_HUB_OFFLINE") == "1":
        return contextlib.nullcontext()
    return _hub_bars()


@contextlib.contextmanager
def _hub_bars() -> Iterator[None]:
    import huggingface_hub.utils

    huggingface_hub.utils.enable_progress_bars()
    try:
        yield
    finally:
        huggingface_hub.utils.disable_progress_bars()


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
