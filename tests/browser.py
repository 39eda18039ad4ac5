"""Pages in a real browser with the network off: headless Chromium (Debian's package, `make browser`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def page_dom(url: str, tmp: Path, screenshot: Path | None = None) -> str:
    """The DOM after scripts ran, from headless Chromium in a network namespace with no network."""
    import os

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("SKIPPED LOUDLY: no chromium here; `make test` installs Debian's chromium (apt-get install -y chromium) "
                    "and could not on this machine, so the pages were not checked in a browser")
    base = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp / 'chromium-profile'}", "--virtual-time-budget=5000", "--window-size=1200,1600"]
    # Network off: a fresh network namespace has no interface but loopback. Without the right to make one,
    # route everything to a closed port instead (same effect for a page: nothing loads from outside).
    offline = ["unshare", "-n"] if shutil.which("unshare") and os.geteuid() == 0 else []
    if not offline:
        base += ["--proxy-server=http://127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND"]
    if screenshot is not None:
        subprocess.run([*offline, *base, f"--screenshot={screenshot}", url], capture_output=True, timeout=120)
    proc = subprocess.run([*offline, *base, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "<html" in proc.stdout, proc.stderr[-2000:]
    return proc.stdout
