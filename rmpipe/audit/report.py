"""`rmpipe report`: the audit report, one static HTML page a person opens in a browser, offline.

Plain HTML with inline CSS and inline SVG: no script, no font, no stylesheet from
anywhere, so it renders on an air-gapped cluster. The page is the Jinja2 template
`templates/report.html.j2` (autoescaped); this module only gathers its context. It shows the current model (verdict,
promotion), its lineage graph (batches -> stages -> model, retracted batches struck
out), metrics and the pathology battery, data validation, the annotator table, the
history of built models with their registry version and stage now (GTO: a deprecated or
demoted version never shows as in prod), an accuracy chart, and every retraction.
Links are relative and point only at files that exist when the page is written.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import yaml

from rmpipe.audit import history

from rmpipe.core import io

from rmpipe.data import retractions
from rmpipe.core.params import load_params
from rmpipe.core.settings import ExportSettings

TEMPLATE = "report.html.j2"


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _num(x: Any, digits: int = 4) -> str:
    return "-" if not isinstance(x, (int, float)) or isinstance(x, bool) else f"{x:.{digits}g}"


def _link(out: Path, target: Path, text: str) -> dict[str, str | None]:
    """A relative link when `target` exists, else plain text (the page never links to nothing)."""
    return {"text": text, "href": os.path.relpath(target, out.parent) if target.exists() else None}


# --- SVG geometry (the template draws it) -----------------------------------------------------------
def lineage_graph(batches: list[str], retracted: list[str], stages: list[str]) -> dict[str, Any]:
    """Batches (left) -> the DVC stages in order (middle column) -> the model (right)."""
    rows = max(len(batches) + len(retracted), len(stages), 1)
    step, box_h = 34, 24
    height = rows * step + 20
    stage_y = [10 + i * step for i in range(len(stages))]
    first_y = stage_y[0] + box_h / 2 if stages else height / 2
    return {"width": 760, "height": height, "step": step, "box_h": box_h, "bx": 10, "sx": 330, "mx": 560,
            "first_y": first_y,
            "batches": [{"name": n, "y": 10 + i * step, "gone": n in retracted, "arrow": n not in retracted and bool(stages)}
                        for i, n in enumerate(batches + retracted)],
            "stages": [{"name": n, "y": y} for n, y in zip(stages, stage_y)],
            "model_y": stage_y[-1] + box_h / 2 if stages else None}


def accuracy_chart(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Test accuracy of every recorded model in order; the one in prod now filled."""
    points = [r for r in rows if isinstance(r["acc"], (int, float))]
    width, height, pad = 640, 200, 36
    chart: dict[str, Any] = {"width": width, "height": height, "pad": pad, "ticks": [], "points": [], "polyline": ""}
    if not points:
        return chart
    lo = min(0.5, min(p["acc"] for p in points))

    def y_of(value: float) -> float:
        return height - pad - (value - lo) / max(1 - lo, 1e-9) * (height - pad - 20)

    chart["ticks"] = [{"y": y_of(v), "label": f"{v:.2f}"} for v in (lo, 1.0)]
    for i, p in enumerate(points):
        x = pad + 20 + i * (width - pad - 50) / max(len(points) - 1, 1)
        chart["points"].append({"x": f"{x:.1f}", "label_x": f"{x - 6:.1f}", "y": f"{y_of(p['acc']):.1f}",
                                "seq": p["seq"], "prod": p["prod"],
                                "acc": f"{p['acc']:.4f}"})
    chart["polyline"] = " ".join(f"{p['x']},{p['y']}" for p in chart["points"])
    return chart


def histogram(csv_path: Path) -> dict[str, Any] | None:
    """The reward histogram (chosen vs rejected) from evaluate's plots/eval/reward_hist.csv."""
    try:
        with csv_path.open(encoding="utf-8") as fh:
            rows = [(float(r["reward"]), int(float(r["chosen"])), int(float(r["rejected"]))) for r in csv.DictReader(fh)]
    except (OSError, KeyError, ValueError):
        return None
    width, height, pad = 640, 220, 40
    top = max([max(c, r) for _, c, r in rows] + [1])
    bar = (width - pad - 10) / max(len(rows), 1)
    bars = []
    for i, (reward, chosen, rejected) in enumerate(rows):
        for j, (count, colour, kind) in enumerate(((chosen, "#188038", "chosen"), (rejected, "#c62828", "rejected"))):
            h = count / top * (height - pad - 10)
            bars.append({"x": f"{pad + i * bar + j * bar / 2:.1f}", "y": f"{height - pad - h:.1f}", "w": f"{bar / 2:.1f}",
                         "h": f"{h:.1f}", "colour": colour, "reward": f"{reward:.2f}", "kind": kind, "count": count})
    return {"width": width, "height": height, "pad": pad, "bars": bars, "top": top,
            "first": f"{rows[0][0]:.1f}" if rows else None, "last": f"{rows[-1][0]:.1f}" if rows else None,
            "legend": [{"colour": "#188038", "text": "chosen responses"}, {"colour": "#c62828", "text": "rejected responses"}]}


# --- the page -----------------------------------------------------------------------------------
def build_report(root: Path, out: Path) -> str:
    """The audit page of the project at `root`, to be written at `out` (its links are relative to it)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.get_template(TEMPLATE).render(**context(Path(root), out))


def context(root: Path, out: Path) -> dict[str, Any]:
    """Everything the template shows, as plain values (the template escapes them)."""
    from rmpipe.audit.lineage import MANIFEST_FILE
    from rmpipe.audit.trace import registry_status, registry_view

    export = ExportSettings.parse(load_params(root / "params.yaml"))
    export_dir = root / export.out_dir
    manifest = _json(export_dir / MANIFEST_FILE)
    records = history.read(root)
    register_ = retractions.load(root)
    view, note = registry_view(root)
    standing = [registry_status(r, view, note) for r in records]
    current = next((r for r in reversed(records)
                    if manifest and (r.get("model") or {}).get("created_at") == manifest.get("created_at")), None)
    model = history.model_id(current) if current else "(not recorded)"
    rows = [{"seq": r.get("seq"), "time": r.get("time"), "trigger": r.get("trigger"), "model": history.model_id(r),
             "batches": len(r.get("batches") or {}), "acc": (r.get("metrics") or {}).get("accuracy"),
             "accuracy": _num((r.get("metrics") or {}).get("accuracy")),
             "gate": bool((r.get("promotion") or {}).get("promoted")), "version": st["version"] or "-",
             "prod": st["promoted"] if note is None else False, "deprecated": bool(st["deprecated"]),
             "stage": ", ".join(st["stages"]) or "-"} for r, st in zip(records, standing)]
    return {"model": model, "summary": _summary(root, out, export_dir, manifest, rows, note) if manifest else None,
            "lineage": _lineage(root, manifest, current, register_), "metrics": _metrics(root),
            "validation": _validation(_json(root / "reports/validation.json")),
            "annotators": _annotators(_json(root / "reports/annotators.json")),
            "registry_note": note or "stages from the GTO registry (git tags reward-model@vX.Y.Z, reward-model#prod#N)",
            "chart": accuracy_chart(rows), "history": rows, "retractions": _retractions(root, register_),
            "sources": f"{history.location(root)}, {retractions.REGISTER}, the registry"}


def _summary(root: Path, out: Path, export_dir: Path, manifest: dict, rows: list[dict], note: str | None) -> dict:
    """The table on top: the exported model, its verdicts, the version in prod now, and links to the sources."""
    from rmpipe.audit.lineage import MANIFEST_FILE

    ev, promo, git = manifest.get("evaluation") or {}, manifest.get("promotion") or {}, manifest.get("git") or {}
    prod = [r for r in rows if r["prod"]]
    prod_now = (f"{prod[-1]['version']} (model {prod[-1]['model']}, #{prod[-1]['seq']})" if prod else "none") \
        if note is None else "unknown: " + note
    return {"export_path": str(export_dir.relative_to(root)), "created_at": manifest.get("created_at"),
            "passed": bool(ev.get("passed")), "accuracy": _num(ev.get("accuracy")), "n_pairs": ev.get("n_pairs"),
            "gate_promoted": bool(promo.get("promoted")), "gate_reason": promo.get("reason"),
            "registry": note or "GTO (git tags)", "prod_now": prod_now,
            "git": f"{git.get('commit')}{' (dirty)' if git.get('dirty') else ''}" if git else "not in git",
            "backbone": (manifest.get("model") or {}).get("backbone"),
            "links": [_link(out, export_dir / "README.md", "model card"), _link(out, export_dir / MANIFEST_FILE, "lineage.json"),
                      _link(out, root / retractions.REGISTER, "retractions.jsonl"),
                      _link(out, root / "reports/data_docs/index.html", "GX data docs"),
                      _link(out, root / "dvc_plots/index.html", "DVC plots")]}


def _lineage(root: Path, manifest: dict, current: dict | None, register_: list[dict]) -> dict:
    """The batches behind the model (the retracted ones struck out), as a graph and a table."""
    stages = list((yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}).get("stages") or {})
    batches = sorted({b for ids in (manifest.get("batch_ids") or {}).values() for b in ids})
    retracted = [e["target"] for e in register_ if e.get("kind") == "batch"]
    rows = [{"name": name, "sha": (info.get("sha256") or "-")[:16],
             "pairs": " / ".join(str((info.get("pairs") or {}).get(k, "-")) for k in ("train", "val", "test"))}
            for name, info in sorted(((current or {}).get("batches") or {}).items())]
    return {"batches": batches, "retracted": retracted, "rows": rows,
            "graph": lineage_graph(batches, [b for b in retracted if b not in batches], stages)}


def _metrics(root: Path) -> dict:
    """Evaluation checks and metrics, the unit battery (by sign), and the reward histogram."""
    metrics, pathology = _json(root / "reports/eval.json"), _json(root / "reports/pathology.json")
    battery = pathology.get("battery") or {}
    keys = ("accuracy", "bt_loss", "ece", "length_r2", "accuracy_chosen_shorter", "canary_max_abs_diff",
            "battery_failed", "battery_below_min_margin", "battery_n")
    return {"checks": list((metrics.get("checks") or {}).items()),
            "figures": [(k, _num(metrics.get(k))) for k in keys if k in metrics],
            "battery": {"n": battery.get("n", 0), "right": battery.get("n", 0) - battery.get("n_failed", 0),
                        "min_margin": battery.get("min_margin"), "below": len(battery.get("below_min_margin") or []),
                        "results": [{"name": r["name"], "margin": _num(r.get("margin"), 3), "passed": bool(r.get("passed"))}
                                    for r in battery["results"]]} if battery.get("results") else None,
            "histogram": histogram(root / "plots/eval/reward_hist.csv")}


def _validation(validation: dict) -> dict:
    if not validation:
        return {}
    return {"success": bool(validation.get("success")), "n_expectations": validation.get("n_expectations"),
            "n_failed": validation.get("n_failed"), "rows": _rows_in_words(validation.get("rows")),
            "failures": [json.dumps(f) for f in validation.get("failures") or []]}


def _rows_in_words(rows: Any) -> str:
    """{"train": 2325, "val": 290} -> "train 2,325 pairs, val 290 pairs" (anything else as it is)."""
    if not isinstance(rows, dict):
        return "-" if rows is None else str(rows)
    return ", ".join(f"{split} {n:,} pairs" if isinstance(n, int) else f"{split} {n}" for split, n in rows.items())


def _annotators(annotators: dict) -> dict:
    return {"alpha": _num(annotators.get("krippendorff_alpha"), 3),
            "excluded": ", ".join(annotators.get("excluded_annotators") or []) or "none",
            "rows": [[str(a), str(v.get("votes")), _num(v.get("share"), 3), _num(v.get("agreement"), 3),
                      "yes" if v.get("flagged") else "", "yes" if v.get("excluded") else "", str(v.get("reason") or "")]
                     for a, v in (annotators.get("annotators") or {}).items()]}


def _retractions(root: Path, register_: list[dict]) -> list[dict]:
    """Each retraction: what was removed and why, the model before and after, and what became of the data."""
    rows = []
    for entry in register_:
        # R<n>.json is the retraction's own outcome; a later `--purge` of it writes R<n>.<time>.json
        outcome = _json(root / retractions.OUTCOMES / f"{entry['id']}.json")
        later = [_json(p) for p in sorted((root / retractions.OUTCOMES).glob(f"{entry['id']}.*.json"))]
        before, after = outcome.get("before") or {}, outcome.get("after") or {}
        purge = next((o["purge"] for o in [outcome, *later] if o.get("purge")), {})
        deprecated = outcome.get("deprecated")
        rows.append({"id": entry["id"], "time": entry["time"], "removed": f"{entry['kind']} {entry['target']}",
                     "reason": entry["reason"], "by": str(entry.get("by")),
                     "change": f"{before.get('model', '-')} (acc {_num((before.get('metrics') or {}).get('accuracy'))}) "
                               f"→ {after.get('model', '-')} (acc {_num((after.get('metrics') or {}).get('accuracy'))})",
                     "rebuilt": bool((outcome.get("promotion") or {}).get("promoted")) if outcome.get("promotion") else None,
                     "deprecated": ", ".join(deprecated) if isinstance(deprecated, list) and deprecated else
                                   (deprecated if isinstance(deprecated, str) else "-"),
                     "data": f"purged ({len(purge.get('cache_objects_removed') or [])} cache objects)" if purge else
                             (entry.get("kept_at") or "params")})
    return rows


def write_report(root: Path, out: Path) -> Path:
    out = Path(root) / out if not Path(out).is_absolute() else Path(out)
    io.write_text(out, build_report(Path(root), out))
    return out
