"""The one command line every stage has: `python -m stages.<name> [--params params.yaml]`.

    main = stage_main("evaluate", run, __doc__)   # in stages/evaluate.py
    if __name__ == "__main__":
        main(sys.argv[1:])

`main` sets up logging, parses `--params` and calls `run(params_file)`; a `UserError` becomes one
`error: ...` line and its exit code (`exits_cleanly`). Prefect flows call `main.__wrapped__`, the
same body without the clean exit, so the error becomes the flow's failure. A fault of the machine (a full
disk, a read-only folder, a name too long: `errors.environment_fault`) is raised as a `UserError` here, so it
ends every stage, from the command line or a flow, in one line naming the path, the cause and the fix.

While an rmpipe rebuild (the service, `rmpipe rebuild`) runs its `dvc repro`, it names that process in
`REBUILD_MARKER`. A stage started by any other DVC run (a manual `dvc repro`) stops before it reads or
writes anything, in one line naming the rebuild: two runs never work on one project's stages at once.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Callable

import psutil

from rmpipe.core import holders
from rmpipe.core.errors import UserError, environment_fault, exits_cleanly
from rmpipe.core.params import PARAMS_FILE, naming
from rmpipe.core.progress import setup_logging

REBUILD_MARKER = Path(".rmpipe") / "rebuild-dvc.json"  # {pid, command, since} of rmpipe's running `dvc repro`


def rebuild_running_beside(root: Path = Path(".")) -> str | None:
    """'PID n (command, since ...)' of an rmpipe rebuild's `dvc repro` that is not this stage's own, or None."""
    try:
        note = json.loads((root / REBUILD_MARKER).read_text(encoding="utf-8"))
        pid, since = int(note["pid"]), datetime.fromisoformat(str(note["since"])).timestamp()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not holders.is_holder(pid, since):
        return None  # its rebuild ended without removing the note (killed), or the PID was reused
    try:
        mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    except psutil.Error:
        mine = {os.getpid()}
    if pid in mine:
        return None  # this stage runs under that very `dvc repro`
    return f"PID {pid} ({holders.command_line(pid) or note.get('command')}, since {note['since']})"


def _refuse_beside_a_rebuild(name: str) -> None:
    if busy := rebuild_running_beside():
        raise UserError(f"an rmpipe rebuild is running DVC in this project ({busy}): stage {name} stops before "
                        "reading or writing anything; run `dvc repro` again once it ends, or `rmpipe rebuild`, "
                        "which waits its turn")


def stage_main(name: str, run: Callable[[str], object], description: str | None,
               launched: bool = False) -> Callable[[list[str] | None], None]:
    """The `main(argv)` of stage `name`. `launched`: also accept the DeepSpeed launcher's `--local_rank`."""

    def main(argv: list[str] | None = None) -> None:
        setup_logging()
        parser = argparse.ArgumentParser(prog=f"python -m stages.{name}", description=description,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--params", default=PARAMS_FILE, help=f"params file (default: {PARAMS_FILE})")
        if launched:
            parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
        args = parser.parse_args(argv)
        _refuse_beside_a_rebuild(name)
        with naming(args.params):  # a message about the params names the file given, not params.yaml
            try:
                run(args.params)
            except UserError:
                raise
            except Exception as exc:  # a full disk, a too-long name: one line, here and in a Prefect flow alike
                fault = environment_fault(exc)
                if fault is None:
                    raise
                raise fault from None

    main.__name__ = main.__qualname__ = "main"
    main.__module__ = getattr(run, "__module__", __name__)
    return exits_cleanly(main)
