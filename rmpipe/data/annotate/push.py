"""`rmpipe annotate push`: annotation tasks (from `rmpipe sample-pairs`) into a Label Studio project.

A/B tasks (`response_a`, `response_b`) go to a project with the pairwise interface
(`annotation/pairwise.xml`: choice a / b / tie, optional strength), ranking tasks (`responses`,
from `sample-pairs --groups`) to one with the ranking interface (`annotation/ranking.xml`). The
interface is read from the project's files, reviewed like code; a reused project whose interface
differs is brought in line. Each Label Studio task carries the rmpipe task whole under `rmpipe`
(prompt, responses, `task_id`, `pair_id`, sampling metadata), which is what `pull` maps back from;
a task whose `task_id` the project already holds is not imported twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rmpipe.core.errors import DataError, UserError
from rmpipe.data.annotate.client import Client

CONFIG_DIR = Path("annotation")
INTERFACES = {"pairs": "pairwise.xml", "groups": "ranking.xml"}
DEFAULT_PROJECTS = {"pairs": "rmpipe pairwise", "groups": "rmpipe ranking"}
DESCRIPTION = "rmpipe preference tasks ({kind}); labeling interface from annotation/{config}"


def read_tasks(path: Path) -> tuple[str, list[dict]]:
    """('pairs' | 'groups', the tasks) of a tasks JSONL; one line-numbered error for a bad line."""
    if not path.is_file():
        raise DataError(f"tasks file {path} not found: make one with `rmpipe sample-pairs PROMPTS`")
    tasks, kinds = [], set()
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            task = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
        if not isinstance(task, dict) or "task_id" not in task or "prompt" not in task:
            raise DataError(f"{path}:{line_no}: not an rmpipe task (needs task_id and prompt; "
                            "make tasks with `rmpipe sample-pairs`)")
        kind = "groups" if "responses" in task else "pairs" if {"response_a", "response_b"} <= task.keys() else None
        if kind is None:
            raise DataError(f"{path}:{line_no}: a task needs response_a and response_b, or responses")
        kinds.add(kind)
        tasks.append(task)
    if len(kinds) != 1:
        raise DataError(f"{path} holds {'no tasks' if not kinds else 'both A/B and ranking tasks'}: "
                        "push one kind per file (one project each)")
    return kinds.pop(), tasks


def prompt_text(prompt: Any) -> str:
    """The prompt as an annotator reads it: a lone user turn as its text, a conversation turn by turn."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0].get("role") == "user":
        return str(prompt[0].get("content", ""))
    return "\n\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt)


def ls_task(task: dict, kind: str) -> dict:
    """The Label Studio task: what the interface shows, plus the rmpipe task under `rmpipe`."""
    data: dict[str, Any] = {"task_id": task["task_id"], "prompt_text": prompt_text(task["prompt"]), "rmpipe": task}
    if kind == "pairs":
        data.update(response_a=task["response_a"], response_b=task["response_b"])
    else:
        data["items"] = [{"id": str(i), "title": f"Response {i + 1}", "body": text}
                         for i, text in enumerate(task["responses"])]
    return {"data": data}


def interface(kind: str, root: Path = Path(".")) -> str:
    path = root / CONFIG_DIR / INTERFACES[kind]
    if not path.is_file():
        raise UserError(f"labeling interface {path} not found: run from the project root (where annotation/ is)")
    return path.read_text(encoding="utf-8")


def ensure_project(client: Client, title: str, kind: str, root: Path = Path(".")) -> dict:
    """The project named `title`, created with this kind's interface, or reused (interface brought in line)."""
    config = interface(kind, root)
    project = client.find_project(title)
    if project is None:
        return client.create_project(title, config, DESCRIPTION.format(kind=kind, config=INTERFACES[kind]))
    if project.get("label_config", "").strip() != config.strip():
        project = client.call("PATCH", f"/api/projects/{project['id']}/", json={"label_config": config})
    return project


def push(tasks_path: Path, project_title: str | None, client: Client, root: Path = Path(".")) -> dict:
    """Import the tasks not yet in the project; returns what was done."""
    kind, tasks = read_tasks(Path(tasks_path))
    title = project_title or DEFAULT_PROJECTS[kind]
    project = ensure_project(client, title, kind, root)
    present = {t.get("data", {}).get("task_id") for t in client.project_task_data(project["id"])}
    new = [ls_task(t, kind) for t in tasks if t["task_id"] not in present]
    if new:
        client.import_tasks(project["id"], new)
    return {"project": title, "project_id": project["id"], "kind": kind, "imported": len(new),
            "already_there": len(tasks) - len(new), "url": f"{client.conn.url}/projects/{project['id']}/data"}
