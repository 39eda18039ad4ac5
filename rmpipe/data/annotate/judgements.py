"""Label Studio annotations -> rmpipe rows: vote rows (pairwise) or ranked rows (ranking), or a reason.

One annotation is one annotator's judgement of one task. It becomes a row of the data contract
(`choice` / `strength`, or `ranking`) with the annotator's email as `annotator_id`, and metadata:
`label_studio_project`, `label_studio_task`, `label_studio_annotation`, `annotated_at`, `updated_at`,
`lead_time_s` (Label Studio's time spent on it). What cannot be a row is left out with a reason code,
like a quarantined row: `skipped` (the annotator skipped / cancelled the task), `empty_choice`,
`conflicting_annotations` (one person judged one task more than once, differently: all of them out),
`duplicate_annotation` (the same judgement again: the first kept), `not_an_rmpipe_task`.
"""

from __future__ import annotations

from typing import Any

from rmpipe.core.schema import STRENGTHS

CHOICES = ("a", "b", "tie")


def _result(annotation: dict, from_name: str) -> dict | None:
    return next((r for r in annotation.get("result") or [] if r.get("from_name") == from_name), None)


def pair_judgement(annotation: dict) -> tuple[dict | None, str | None]:
    """({choice, strength?}, None) or (None, why)."""
    result = _result(annotation, "choice")
    choices = ((result or {}).get("value") or {}).get("choices") or []
    if len(choices) != 1 or choices[0] not in CHOICES:
        return None, f"no single choice among {', '.join(CHOICES)} (got {choices or 'none'})"
    judgement = {"choice": choices[0]}
    strength = ((_result(annotation, "strength") or {}).get("value") or {}).get("choices") or []
    if strength and choices[0] != "tie":  # a tie has no strength
        if strength[0] not in STRENGTHS:
            return None, f"strength {strength[0]!r} is not one of {', '.join(STRENGTHS)}"
        judgement["strength"] = strength[0]
    return judgement, None


def group_judgement(annotation: dict, n_responses: int) -> tuple[dict | None, str | None]:
    """({ranking}, None) or (None, why). Label Studio's Ranker saves {tag name: [item ids in order]}."""
    result = _result(annotation, "rank")
    ranked = ((result or {}).get("value") or {}).get("ranker") or {}
    orders = [v for v in ranked.values() if isinstance(v, list)] if isinstance(ranked, dict) else []
    if len(orders) != 1 or not orders[0]:
        return None, "no ranking"
    try:
        ranking = [int(item) for item in orders[0]]
    except (TypeError, ValueError):
        return None, f"ranking {orders[0]} holds ids that are not response indices"
    if sorted(ranking) != list(range(n_responses)):
        return None, f"ranking {ranking} does not order each of the {n_responses} responses once"
    return {"ranking": ranking}, None


def task_row(task: dict, judgement: dict, annotator: str, annotation: dict, project: str) -> dict:
    """The row for one judgement: the rmpipe task's fields, the judgement, who and when."""
    source = dict(task["data"]["rmpipe"])
    return {**source, "annotator_id": annotator, **judgement,
            "label_studio_project": project, "label_studio_task": task["id"],
            "label_studio_annotation": annotation["id"], "annotated_at": annotation.get("created_at"),
            "updated_at": annotation.get("updated_at"), "lead_time_s": annotation.get("lead_time")}


def left_out(task: dict, annotation: dict, annotator: str, code: str, reason: str) -> dict:
    return {"reason_code": code, "reason": reason, "label_studio_task": task.get("id"),
            "label_studio_annotation": annotation.get("id"), "annotator_id": annotator,
            "task_id": (task.get("data") or {}).get("task_id"), "raw": annotation.get("result")}


def judge(task: dict, annotation: dict, annotator: str) -> tuple[dict | None, tuple[str, str] | None]:
    """(judgement, None) or (None, (reason code, reason)) for one annotation."""
    data = task.get("data") or {}
    if not isinstance(data.get("rmpipe"), dict):
        return None, ("not_an_rmpipe_task", "the task was not pushed by rmpipe (no `rmpipe` field)")
    if annotation.get("was_cancelled"):
        return None, ("skipped", "the annotator skipped the task")
    if "responses" in data["rmpipe"]:
        judgement, why = group_judgement(annotation, len(data["rmpipe"]["responses"]))
    else:
        judgement, why = pair_judgement(annotation)
    return (judgement, None) if judgement is not None else (None, ("empty_choice", why or "no judgement"))


def rows_of(tasks: list[dict], new_ids: set[int], users: dict[int, str], project: str,
            earlier: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """Rows and left-out entries for the annotations in `new_ids`. `earlier`: (task, annotator) -> judgement
    of what earlier pulls exported, so a second, different judgement by one person is a conflict too."""
    rows, out = [], []
    for task in tasks:
        by_person: dict[str, list[tuple[dict, dict]]] = {}
        for annotation in task.get("annotations") or []:
            if annotation["id"] not in new_ids:
                continue
            who = users.get(annotation.get("completed_by"), f"label-studio-user-{annotation.get('completed_by')}")
            judgement, why = judge(task, annotation, who)
            if why is not None:
                out.append(left_out(task, annotation, who, *why))
            else:
                by_person.setdefault(who, []).append((annotation, judgement))
        for who, judged in by_person.items():
            before = earlier.get(f"{task['id']}|{who}")
            distinct = {repr(sorted(j.items())) for _, j in judged} | ({repr(sorted(before.items()))} if before else set())
            if len(distinct) > 1:
                out.extend(left_out(task, a, who, "conflicting_annotations",
                                    f"{who} judged this task {len(judged) + bool(before)} times, differently")
                           for a, _ in judged)
                continue
            first, *again = judged
            if before is None:
                rows.append(task_row(task, first[1], who, first[0], project))
            else:
                again = judged
            out.extend(left_out(task, a, who, "duplicate_annotation", f"{who} gave this judgement already")
                       for a, _ in again)
    return rows, out
