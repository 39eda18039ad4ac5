"""The one command line every stage has: `python -m stages.<name> [--params params.yaml]`.

    main = stage_main("evaluate", run, __doc__)   # in stages/evaluate.py
    if __name__ == "__main__":
        main(sys.argv[1:])

`main` sets up logging, parses `--params` and calls `run(params_file)`; a `UserError` becomes one
`error: ...` line and its exit code (`exits_cleanly`). Prefect flows call `main.__wrapped__`, the
same body without the clean exit, so the error becomes the flow's failure. A fault of the machine (a full
disk, a read-only folder, a name too long: `errors.environment_fault`) is raised as a `UserError` here, so it
ends every stage, from the command line or a flow, in one line naming the path, the cause and the fix.
"""

from __future__ import annotations

import argparse
from typing import Callable

from rmpipe.core.errors import UserError, environment_fault, exits_cleanly
from rmpipe.core.params import PARAMS_FILE
from rmpipe.core.progress import setup_logging


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
