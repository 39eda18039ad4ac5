"""pipeline/locks.py: filelock-based, re-entrant per thread, and no wait without an end (real processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.locks import LockTimeout, pipeline_lock

ROOT = Path(__file__).resolve().parents[1]
HOLD = ("import sys; from pathlib import Path; from pipeline.locks import pipeline_lock\n"
        "with pipeline_lock(Path(sys.argv[1])):\n print('held', flush=True); sys.stdin.readline()")


def test_a_wait_that_runs_out_names_the_holder_and_how_to_clear_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path), "--marker"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockTimeout) as caught:
            with pipeline_lock(tmp_path, timeout_s=0.5):
                pass
        message = str(caught.value)
        assert "\n" not in message and f"PID {holder.pid} (" in message and "python -c import sys" in message
        assert "kill" in message and "RMPIPE_LOCK_TIMEOUT_S" in message
    finally:
        holder.communicate("\n", timeout=30)
    with pipeline_lock(tmp_path, timeout_s=5):  # the holder ended: free again, and re-entrant in one thread
        with pipeline_lock(tmp_path, timeout_s=0):
            pass


def test_the_timeout_comes_from_the_environment_and_a_bad_value_is_one_clear_error(tmp_path, monkeypatch):
    from rmpipe.core.errors import UserError

    monkeypatch.setenv("RMPIPE_LOCK_TIMEOUT_S", "soon")
    with pytest.raises(UserError, match="RMPIPE_LOCK_TIMEOUT_S='soon' is not a number"):
        with pipeline_lock(tmp_path):
            pass


def test_a_holder_note_whose_pid_was_reused_is_not_named_as_a_live_holder(tmp_path):
    """A note left by a dead holder whose PID now runs a process born after the note: 'no longer runs'."""
    import json

    from pipeline.locks import LOCK_FILE, holder

    lock = (tmp_path / LOCK_FILE)
    lock.parent.mkdir(parents=True)
    reused = subprocess.Popen(["sleep", "60"])
    try:
        note = {"pid": reused.pid, "command": "rmpipe rebuild", "since": "2020-01-01T00:00:00+00:00"}
        lock.with_name(lock.name + ".holder.json").write_text(json.dumps(note), encoding="utf-8")
        said = holder(lock)
        assert said == f"PID {reused.pid} (rmpipe rebuild, since 2020-01-01T00:00:00+00:00, which no longer runs)"
    finally:
        reused.kill()
        reused.wait()
