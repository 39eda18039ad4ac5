"""A Label Studio page in headless Chromium, logged in: the Chrome DevTools protocol over `websockets`.

Label Studio's UI needs a session, so the page cannot be opened with `--dump-dom` alone: log in with
`requests` (Django's CSRF form), give Chromium the session cookie, open the page, wait until the text
shows, and take a screenshot. Everything stays on 127.0.0.1 (nothing else is reachable here).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests


def session_cookie(url: str, email: str, password: str) -> str:
    s = requests.Session()
    s.get(f"{url}/user/login/", timeout=30)
    response = s.post(f"{url}/user/login/", data={"email": email, "password": password,
                                                  "csrfmiddlewaretoken": s.cookies.get("csrftoken", "")},
                      headers={"Referer": f"{url}/user/login/"}, timeout=30, allow_redirects=False)
    assert response.status_code in (200, 302) and "sessionid" in s.cookies, f"login failed: {response.status_code}"
    return s.cookies["sessionid"]


class _Tab:
    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == self.next_id:
                return message.get("result", {})

    def text(self) -> str:
        result = self.call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''")
        return result.get("result", {}).get("value", "")


def screenshot_when_shown(url: str, page: str, cookie: str, wanted: list[str], tmp: Path, png: Path,
                          timeout_s: float = 90) -> str:
    """Open `page` logged in; once every text in `wanted` shows, save a screenshot. Returns the page text."""
    from websockets.sync.client import connect

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("SKIPPED LOUDLY: no chromium here; `make test` installs Debian's chromium")
    profile = tmp / "chromium-profile"
    proc = subprocess.Popen([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--disable-background-networking", "--disable-component-update", "--disable-sync",
                             "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1400,1400",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port = _devtools_port(profile, proc)
        target = next(t for t in requests.get(f"http://127.0.0.1:{port}/json", timeout=10).json() if t["type"] == "page")
        with connect(target["webSocketDebuggerUrl"], max_size=None) as ws:
            tab = _Tab(ws)
            tab.call("Network.enable")
            tab.call("Network.setCookie", name="sessionid", value=cookie, url=url)
            tab.call("Page.navigate", url=f"{url}{page}")
            deadline, text = time.monotonic() + timeout_s, ""
            while time.monotonic() < deadline and not all(w in text for w in wanted):
                time.sleep(1)
                text = tab.text()
            time.sleep(1)  # let the layout settle for the picture
            png.write_bytes(base64.b64decode(tab.call("Page.captureScreenshot", format="png")["data"]))
            return text
    finally:
        proc.kill()
        proc.wait()


def _devtools_port(profile: Path, proc: subprocess.Popen) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        active = profile / "DevToolsActivePort"
        if active.is_file() and active.read_text().strip():
            return int(active.read_text().split()[0])
        assert proc.poll() is None, f"chromium exited with {proc.returncode}"
        time.sleep(0.2)
    raise AssertionError("chromium did not open its DevTools port within 30s")
