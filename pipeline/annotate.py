"""`rmpipe annotate ...`: Label Studio in the loop, and the deployment fired by finished annotations.

    rmpipe annotate server                       # Label Studio on 127.0.0.1:8080 (pipeline.label_studio)
    rmpipe annotate push data/tasks/x.tasks.jsonl [--project NAME]
    rmpipe annotate pull [--project NAME]        # -> data/incoming/label-studio-<project>-e<export>.jsonl
    rmpipe annotate serve [--project NAME] [--every 60]   # the `annotation-pull` flow every 60 s

The `annotation-pull` flow pulls into its own delivery folder (`.rmpipe/annotate/outbox/`) and hands
each new batch to `on-new-batch` (check, queue, rebuild: the same path a watched delivery takes). A
batch is handed over once: delivered names are recorded after `on-new-batch` returned, and a run that
died in between hands it over again next time (on-new-batch's duplicate check makes that harmless).
An export with nothing new starts nothing. Label Studio down: the client retries, then the run fails
with one line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

OUTBOX = Path(".rmpipe") / "annotate" / "outbox"


def _client():
    from rmpipe.data.annotate.client import Client, connection

    return Client(connection())


def _server(args: argparse.Namespace) -> None:
    from pipeline.label_studio import serve

    serve(Path(args.data_dir), args.port)


def _push(args: argparse.Namespace) -> None:
    from rmpipe.data.annotate.push import push

    result = push(Path(args.tasks), args.project, _client())
    print(f"{result['imported']} task(s) imported into Label Studio project {result['project']!r} "
          f"({result['already_there']} already there): {result['url']}")


def _pull(args: argparse.Namespace) -> None:
    from rmpipe.data.annotate.pull import pull

    result = pull(_client(), args.project, Path(args.out))
    left = ", ".join(f"{n} {code}" for code, n in sorted(result["left_out"].items()))
    print(result["batch"] or f"nothing new in Label Studio project {args.project!r} "
                                  f"(export {result['export_id']} checked, not kept)")
    if left:
        print(f"left out with a reason ({left}): see the sidecar / .rmpipe/annotate cursor")


def _serve(args: argparse.Namespace) -> None:
    """Run the `annotation-pull` flow every `--every` seconds until Ctrl-C, each run a flow run on the server.

    The schedule is kept here, not by the server: Prefect 3.8.8's scheduler fails to insert interval runs
    with the pinned SQLAlchemy 2.1 ("Can't evaluate bulk DML statement"), so a served interval deployment
    would never fire. A failed run (Label Studio down) has logged its one line; the next tick tries again.
    """
    import logging
    import time

    from pipeline.orphans import tie_descendants_to_this_process
    from pipeline.service import require_server
    from rmpipe.core.errors import UserError

    require_server()
    tie_descendants_to_this_process()
    from pipeline.annotation_flow import annotation_pull
    from pipeline.prefect_env import find_project_root

    root, log = find_project_root(None), logging.getLogger("rmpipe.annotate")
    log.info("pulling Label Studio project %r every %.0fs into on-new-batch (Ctrl-C stops)", args.project, args.every)
    try:
        while True:
            started = time.monotonic()
            try:
                annotation_pull(label_studio_project=args.project, project=str(root))
            except UserError:
                pass  # the flow run logged its one line and ended Failed; the next tick tries again
            time.sleep(max(0.0, args.every - (time.monotonic() - started)))
    except KeyboardInterrupt:
        log.info("stopped")


def _run_flow(args: argparse.Namespace) -> None:
    from pipeline.annotation_flow import annotation_pull

    print(json.dumps(annotation_pull(label_studio_project=args.project), indent=2, default=str))


def add_commands(sub) -> None:
    """`rmpipe annotate server|push|pull|serve|run`."""
    from rmpipe.data.annotate.push import DEFAULT_PROJECTS

    top = sub.add_parser("annotate", help="Label Studio: serve it, push tasks to it, pull finished judgements")
    cmds = top.add_subparsers(dest="annotate_command", required=True)
    p = cmds.add_parser("server", help="start Label Studio on 127.0.0.1 (initialised once in --data-dir)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--data-dir", default=".label-studio", help="its database and uploads (git-ignored)")
    p.set_defaults(func=_server)

    p = cmds.add_parser("push", help="import a tasks JSONL (rmpipe sample-pairs) into a Label Studio project")
    p.add_argument("tasks", help="data/tasks/<name>.tasks.jsonl")
    p.add_argument("--project", default=None, help=f"project title (default: {' / '.join(DEFAULT_PROJECTS.values())})")
    p.set_defaults(func=_push)

    for name, func, text in (("pull", _pull, "write the judgements finished since the last pull as one batch"),
                             ("run", _run_flow, "pull and hand the batch to on-new-batch, once (the flow)")):
        p = cmds.add_parser(name, help=text)
        p.add_argument("--project", default=DEFAULT_PROJECTS["pairs"], help="project title")
        if name == "pull":
            p.add_argument("--out", default="data/incoming", help="folder for the batch (default: data/incoming)")
        p.set_defaults(func=func)

    p = cmds.add_parser("serve", help="run the annotation-pull flow every --every seconds (needs PREFECT_API_URL)")
    p.add_argument("--project", default=DEFAULT_PROJECTS["pairs"], help="project title")
    p.add_argument("--every", type=float, default=60.0, help="seconds between pulls (default 60)")
    p.set_defaults(func=_serve)
