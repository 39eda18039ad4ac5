"""Label Studio, the annotation server, run beside the project: its own virtual environment, 127.0.0.1 only.

Label Studio pins Django and ~150 packages of its own, so it lives in `.venv-ls` (made by `make
label-studio-env` from `annotation/requirements-label-studio.txt`), never in the project's pinned venv.
rmpipe talks to it over its REST API. Its data (SQLite database, uploads) sits in `.label-studio/`
(git-ignored). Every start runs with telemetry off: no Sentry, no usage analytics, no version check.

    rmpipe annotate server            # terminal 1: initialises .label-studio/ once, then serves on 127.0.0.1:8080
    python -m pipeline.label_studio init DIR --user EMAIL:PASSWORD:TOKEN ...   # what `make` runs for the tests

A fresh data folder takes ~90 s of database migrations on two cores; a copy of an initialised one
starts in ~7 s (the tests copy the one `make` prepared).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pipeline.orphans import stop_process_group
from rmpipe.core.errors import UserError

VENV = Path(os.environ.get("RMPIPE_LABEL_STUDIO_VENV", ".venv-ls"))
DATA_DIR = Path(".label-studio")
CONNECTION = "rmpipe.json"  # in the data folder: the URL and the API token `rmpipe annotate` uses
ADMIN = "admin@rmpipe.local"
NO_TELEMETRY = {
    "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "",  # empty: Sentry is never initialised
    "COLLECT_ANALYTICS": "false", "LATEST_VERSION_CHECK": "false",
    "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",  # the `Token <key>` header, with the key made at set-up
}


def executable(venv: Path = VENV) -> Path:
    exe = Path(venv) / "bin" / "label-studio"
    if not exe.is_file():
        raise UserError(f"Label Studio is not installed ({exe} missing): run `make label-studio-env` "
                        "(its own virtual environment, ~3 min once)")
    return exe


def server_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "HEARTEX_"))}
    for name in ("USERNAME", "PASSWORD", "USER_TOKEN"):  # Label Studio reads these bare names too
        env.pop(name, None)
    return {**env, **NO_TELEMETRY, "LABEL_STUDIO_BASE_DATA_DIR": str(Path(data_dir).resolve())}


def init(data_dir: Path, users: list[tuple[str, str, str]], venv: Path = VENV) -> None:
    """Create the database in `data_dir` and each (email, password, token) user, non-interactively."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    exe = executable(venv)
    for email, password, token in users:
        result = subprocess.run([str(exe), "init", "--data-dir", str(data_dir.resolve()), "--username", email,
                                 "--password", password, "--user-token", token, "--enable-legacy-api-token",
                                 "--no-browser", "--quiet"],
                                check=False, env=server_env(data_dir), capture_output=True, text=True)
        if result.returncode != 0:
            tail = (result.stdout + result.stderr).strip().splitlines()[-1:] or ["no output"]
            raise UserError(f"label-studio init for {email} failed (exit {result.returncode}): {tail[0]}")


def start(data_dir: Path, port: int, log_path: Path | None = None, venv: Path = VENV) -> subprocess.Popen:
    """The server on 127.0.0.1:`port`, in its own process group (stopped whole by `orphans.stop_process_group`)."""
    out = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115 (the server's, for its life)
    return subprocess.Popen([str(executable(venv)), "start", "--data-dir", str(Path(data_dir).resolve()),
                             "--internal-host", "127.0.0.1", "--port", str(port), "--no-browser"],
                            env=server_env(data_dir), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_up(url: str, proc: subprocess.Popen | None = None, timeout_s: float = 120.0) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise UserError(f"Label Studio exited with {proc.returncode} before it answered on {url}")
        try:
            if requests.get(f"{url}/health", timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise UserError(f"Label Studio did not answer on {url} within {timeout_s:.0f}s")




def write_connection(data_dir: Path, url: str, token: str) -> Path:
    path = Path(data_dir) / CONNECTION
    path.write_text(json.dumps({"url": url, "token": token, "username": ADMIN}, indent=2) + "\n")
    path.chmod(0o600)
    return path


def serve(data_dir: Path = DATA_DIR, port: int = 8080) -> None:
    """`rmpipe annotate server`: initialise `data_dir` once (admin user, random token), then serve until Ctrl-C."""
    data_dir = Path(data_dir)
    url = f"http://127.0.0.1:{port}"
    if not (data_dir / "label_studio.sqlite3").exists():
        token, password = secrets.token_hex(20), secrets.token_urlsafe(12)
        print(f"initialising Label Studio in {data_dir}/ (database migrations, ~90 s once) ...", flush=True)
        init(data_dir, [(ADMIN, password, token)])
        (data_dir / "admin-password.txt").write_text(password + "\n")
        (data_dir / "admin-password.txt").chmod(0o600)
        write_connection(data_dir, url, token)
    if not (data_dir / CONNECTION).is_file():
        raise UserError(f"{data_dir}/{CONNECTION} is missing (it holds the API token made at set-up): restore it, "
                        f"or move {data_dir}/ away to start afresh")
    write_connection(data_dir, url, json.loads((data_dir / CONNECTION).read_text())["token"])  # this port
    import signal

    from pipeline.orphans import tie_descendants_to_this_process

    tie_descendants_to_this_process()  # the server dies with this command, even by kill -9
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops it as Ctrl-C does
    proc = start(data_dir, port, data_dir / "server.log")
    try:
        wait_up(url, proc)
        print(f"Label Studio on {url} (log in as {ADMIN}, password in {data_dir}/admin-password.txt); "
              f"rmpipe reads the API token from {data_dir}/{CONNECTION}. Ctrl-C stops it.", flush=True)
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_process_group(proc)


def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.label_studio")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("init", help="create a Label Studio data folder with these users (email:password:token)")
    p.add_argument("data_dir")
    p.add_argument("--user", action="append", required=True)
    args = parser.parse_args(argv)
    target = Path(args.data_dir)
    tmp = target.with_name(target.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    init(tmp, [tuple(spec.split(":", 2)) for spec in args.user])
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # a half-initialised folder never takes the name
    print(f"initialised {target}")


if __name__ == "__main__":
    _main(sys.argv[1:])
