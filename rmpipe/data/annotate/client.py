"""Label Studio's REST API, through `requests` (already pinned in the project's venv).

Why not `label-studio-sdk`: 2.1.2 needs opencv-python-headless, which caps numpy below 2.3, and the
project's lock pins numpy 2.4.6 (pip's resolver: ResolutionImpossible). The few endpoints rmpipe needs
are plain JSON over HTTP with a `Token <key>` header.

Where the server is: LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY, else what `rmpipe annotate server`
wrote to `.label-studio/rmpipe.json`. An unreachable server is retried (`RETRIES` times, backing off)
and then reported in one line: `LabelStudioUnavailable`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from rmpipe.core.errors import UserError

CONNECTION_FILE = Path(".label-studio") / "rmpipe.json"
RETRIES = 3
BACKOFF_S = 0.5
TIMEOUT_S = 30.0


class LabelStudioUnavailable(UserError):
    """The server did not answer (down, wrong URL) after the retries."""

    exit_code = 4


class LabelStudioError(UserError):
    """The server answered with an error (bad token, refused config, missing project)."""


@dataclass(frozen=True)
class Connection:
    url: str
    token: str


def connection(root: Path = Path(".")) -> Connection:
    url, token = os.environ.get("LABEL_STUDIO_URL"), os.environ.get("LABEL_STUDIO_API_KEY")
    if url and token:
        return Connection(url.rstrip("/"), token)
    path = root / CONNECTION_FILE
    if not path.is_file():
        raise UserError("no Label Studio configured: start one with `rmpipe annotate server` (it writes "
                        f"{CONNECTION_FILE}), or set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
    saved = json.loads(path.read_text())
    return Connection((url or saved["url"]).rstrip("/"), token or saved["token"])


class Client:
    def __init__(self, conn: Connection, retries: int = RETRIES, backoff_s: float = BACKOFF_S):
        self.conn, self.retries, self.backoff_s = conn, retries, backoff_s
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {conn.token}"

    def call(self, method: str, path: str, **kwargs) -> Any:
        """One API call; connection failures and 5xx are retried, then `LabelStudioUnavailable` in one line."""
        url = f"{self.conn.url}{path}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = self.session.request(method, url, timeout=TIMEOUT_S, **kwargs)
            except requests.RequestException as exc:
                last = type(exc).__name__
                continue
            if response.status_code >= 500:
                last = f"HTTP {response.status_code}"
                continue
            if response.status_code in (401, 403):
                raise LabelStudioError(f"Label Studio at {self.conn.url} refused the API token (HTTP "
                                       f"{response.status_code}): check LABEL_STUDIO_API_KEY or {CONNECTION_FILE}")
            if not response.ok:
                raise LabelStudioError(f"Label Studio {method} {path}: HTTP {response.status_code}: "
                                       f"{' '.join(response.text.split())[:300]}")  # one line, even for a page
            return response.json() if response.content else None
        raise LabelStudioUnavailable(f"Label Studio at {self.conn.url} is unreachable ({last} after "
                                     f"{self.retries + 1} tries): start it (`rmpipe annotate server`) and run "
                                     "again; nothing was changed")

    # --- the endpoints rmpipe uses ---------------------------------------------------------
    def version(self) -> str:
        return str((self.call("GET", "/api/version") or {}).get("release", "unknown"))

    def find_project(self, title: str) -> dict | None:
        page = self.call("GET", "/api/projects/", params={"title": title, "page_size": 1000})
        projects = page.get("results", page) if isinstance(page, dict) else page
        return next((p for p in projects if p.get("title") == title), None)

    def create_project(self, title: str, label_config: str, description: str) -> dict:
        return self.call("POST", "/api/projects/", json={"title": title, "label_config": label_config,
                                                         "description": description})

    def project_task_data(self, project_id: int) -> list[dict]:
        """Every task's data (for skipping tasks already imported)."""
        tasks, page = [], 1
        while True:
            batch = self.call("GET", "/api/tasks/", params={"project": project_id, "page": page, "page_size": 500})
            tasks.extend(batch.get("tasks", []))
            if len(tasks) >= batch.get("total", 0) or not batch.get("tasks"):
                return tasks
            page += 1

    def import_tasks(self, project_id: int, tasks: list[dict]) -> dict:
        return self.call("POST", f"/api/projects/{project_id}/import", json=tasks)

    def snapshot_export(self, project_id: int) -> tuple[dict, bytes]:
        """A new export snapshot (its id, time, md5) and its JSON bytes."""
        export = self.call("POST", f"/api/projects/{project_id}/exports/", json={})
        if export.get("status") not in (None, "completed"):
            raise LabelStudioError(f"Label Studio export {export.get('id')} of project {project_id} is "
                                   f"{export.get('status')!r}, not completed: pull again later")
        raw = self._download(f"/api/projects/{project_id}/exports/{export['id']}/download")
        return export, raw

    def _download(self, path: str) -> bytes:
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = self.session.get(f"{self.conn.url}{path}", params={"exportType": "JSON"}, timeout=TIMEOUT_S)
            except requests.RequestException:
                continue
            if response.ok:
                return response.content
        raise LabelStudioUnavailable(f"Label Studio at {self.conn.url} stopped answering during the export "
                                     "download: run the pull again (nothing was written, the cursor did not move)")

    def users(self) -> dict[int, str]:
        """user id -> email (the annotator id rmpipe records)."""
        return {u["id"]: u.get("email") or f"label-studio-user-{u['id']}" for u in self.call("GET", "/api/users/")}
