"""`rmpipe report`: the audit report, one static HTML page a person opens in a browser, offline.

Plain HTML with inline CSS and inline SVG: no script, no font, no stylesheet from
anywhere, so it renders on an air-gapped cluster. It shows the current model (verdict,
promotion), its lineage graph (batches -> stages -> model, retracted batches struck
out), metrics and the pathology battery, data validation, the annotator table, the
history of built and promoted models with an accuracy chart, and every retraction.
Links are relative and point only at files that exist when the page is written.
"""

from __future__ import annotations

import csv
import html
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

E = html.escape


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _num(x: Any, digits: int = 4) -> str:
    return "-" if not isinstance(x, (int, float)) or isinstance(x, bool) else f"{x:.{digits}g}"


def _link(out: Path, target: Path, text: str) -> str:
    """A relative link when `target` exists, else plain text (the page never links to nothing)."""
    if not target.exists():
        return E(text)
    return f'<a href="{E(os.path.relpath(target, out.parent))}">{E(text)}</a>'


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    """`rows` hold ready HTML (escape plain text before)."""
    head = "".join(f"<th>{E(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    thead = f"<thead><tr>{head}</tr></thead>" if any(header) else ""
    return f'<table class="{cls}">{thead}<tbody>{body}</tbody></table>'


# --- SVG pieces ---------------------------------------------------------------------------------
def lineage_svg(batches: list[str], retracted: list[str], stages: list[str], model: str) -> str:
    """Batches (left) -> the DVC stages in order (middle column) -> the model (right)."""
    rows = max(len(batches) + len(retracted), len(stages), 1)
    step, box_h = 34, 24
    height = rows * step + 20
    bx, sx, mx, width = 10, 330, 560, 760
    parts = [f'<svg id="lineage-graph" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="lineage graph">',
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" '
             'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#555"/></marker></defs>']
    stage_y = {s: 10 + i * step for i, s in enumerate(stages)}
    first_y = stage_y[stages[0]] + box_h / 2 if stages else height / 2
    for i, name in enumerate(batches + retracted):
        y = 10 + i * step
        gone = name in retracted
        dash = ' stroke-dasharray="4 3"' if gone else ""
        strike = ' text-decoration="line-through"' if gone else ""
        parts.append(f'<g class="{"batch retracted" if gone else "batch"}"><rect x="{bx}" y="{y}" width="260" '
                     f'height="{box_h}" rx="4" fill="{"#fde8e8" if gone else "#e8f0fe"}" '
                     f'stroke="{"#c62828" if gone else "#3367d6"}"{dash}/>'
                     f'<text x="{bx + 8}" y="{y + 16}" font-size="12"{strike}>{E(name[:38])}</text></g>')
        if not gone and stages:
            parts.append(f'<line x1="{bx + 260}" y1="{y + box_h / 2}" x2="{sx}" y2="{first_y}" stroke="#555" '
                         'marker-end="url(#arrow)"/>')
    for i, stage in enumerate(stages):
        y = stage_y[stage]
        parts.append(f'<g class="stage"><rect x="{sx}" y="{y}" width="150" height="{box_h}" rx="4" fill="#f1f3f4" '
                     f'stroke="#5f6368"/><text x="{sx + 8}" y="{y + 16}" font-size="12">{E(stage)}</text></g>')
        if i:
            parts.append(f'<line x1="{sx + 75}" y1="{y - step + box_h}" x2="{sx + 75}" y2="{y}" stroke="#555" '
                         'marker-end="url(#arrow)"/>')
    if stages:
        ly = stage_y[stages[-1]] + box_h / 2
        parts.append(f'<line x1="{sx + 150}" y1="{ly}" x2="{mx}" y2="{ly}" stroke="#555" marker-end="url(#arrow)"/>'
                     f'<g class="model"><rect x="{mx}" y="{ly - box_h / 2}" width="190" height="{box_h}" rx="4" '
                     f'fill="#e6f4ea" stroke="#188038"/><text x="{mx + 8}" y="{ly + 4}" font-size="12">'
                     f'model {E(model)}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def accuracy_svg(records: list[dict[str, Any]]) -> str:
    """Test accuracy of every recorded model in order; promoted ones filled."""
    points = [(r.get("seq"), (r.get("metrics") or {}).get("accuracy"), bool((r.get("promotion") or {}).get("promoted")))
              for r in records]
    points = [p for p in points if isinstance(p[1], (int, float))]
    width, height, pad = 640, 200, 36
    parts = [f'<svg id="accuracy-chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="accuracy per model">',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - 10}" y2="{height - pad}" stroke="#999"/>',
             f'<line x1="{pad}" y1="10" x2="{pad}" y2="{height - pad}" stroke="#999"/>']
    if points:
        lo = min(0.5, min(p[1] for p in points))
        xs = [pad + 20 + i * (width - pad - 50) / max(len(points) - 1, 1) for i in range(len(points))]
        ys = [height - pad - (acc - lo) / max(1 - lo, 1e-9) * (height - pad - 20) for _, acc, _ in points]
        for value in (lo, 1.0):
            y = height - pad - (value - lo) / max(1 - lo, 1e-9) * (height - pad - 20)
            parts.append(f'<text x="4" y="{y + 4}" font-size="10">{value:.2f}</text>')
        parts.append('<polyline fill="none" stroke="#3367d6" points="'
                     + " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys)) + '"/>')
        for (seq, acc, promoted), x, y in zip(points, xs, ys):
            parts.append(f'<circle class="point{" promoted" if promoted else ""}" cx="{x:.1f}" cy="{y:.1f}" r="5" '
                         f'fill="{"#188038" if promoted else "#fff"}" stroke="#188038"><title>#{seq}: accuracy '
                         f'{acc:.4f}{" (promoted)" if promoted else ""}</title></circle>'
                         f'<text x="{x - 6:.1f}" y="{height - pad + 14}" font-size="10">#{seq}</text>')
    parts.append("</svg>")
    return "".join(parts)


def histogram_svg(csv_path: Path) -> str:
    """The reward histogram (chosen vs rejected) from evaluate's plots/eval/reward_hist.csv."""
    try:
        with csv_path.open(encoding="utf-8") as fh:
            rows = [(float(r["reward"]), int(float(r["chosen"])), int(float(r["rejected"]))) for r in csv.DictReader(fh)]
    except (OSError, KeyError, ValueError):
        return "<p>no reward histogram (plots/eval/reward_hist.csv)</p>"
    width, height, pad = 640, 200, 30
    top = max([max(c, r) for _, c, r in rows] + [1])
    bar = (width - pad - 10) / max(len(rows), 1)
    parts = [f'<svg id="reward-histogram" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="reward histogram">',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - 10}" y2="{height - pad}" stroke="#999"/>']
    for i, (reward, chosen, rejected) in enumerate(rows):
        x = pad + i * bar
        for j, (count, colour) in enumerate(((chosen, "#188038"), (rejected, "#c62828"))):
            h = count / top * (height - pad - 10)
            parts.append(f'<rect class="bar" x="{x + j * bar / 2:.1f}" y="{height - pad - h:.1f}" width="{bar / 2:.1f}" '
                         f'height="{h:.1f}" fill="{colour}" opacity="0.8"><title>reward {reward:.2f}: '
                         f'{"chosen" if j == 0 else "rejected"} {count}</title></rect>')
    if rows:
        parts.append(f'<text x="{pad}" y="{height - 8}" font-size="10">{rows[0][0]:.1f}</text>'
                     f'<text x="{width - 50}" y="{height - 8}" font-size="10">{rows[-1][0]:.1f}</text>')
    parts.append("</svg>")
    return "".join(parts)


# --- the page -----------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#202124}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left}
th{background:#f1f3f4}.ok{color:#188038;font-weight:600}.bad{color:#c62828;font-weight:600}
.note{color:#5f6368;font-size:.9em}code{background:#f1f3f4;padding:0 .2em}
"""


def _verdict(ok: bool, yes: str = "passed", no: str = "FAILED") -> str:
    return f'<span class="{"ok" if ok else "bad"}">{E(yes if ok else no)}</span>'


def build_report(root: Path, out: Path) -> str:
    """The audit page of the project at `root`, to be written at `out` (its links are relative to it)."""
    from rmpipe.audit.lineage import MANIFEST_FILE

    root = Path(root)
    export = ExportSettings.parse(load_params(root / "params.yaml"))
    export_dir = root / export.out_dir
    manifest = _json(export_dir / MANIFEST_FILE)
    records = history.read(root)
    register_ = retractions.load(root)
    current = next((r for r in reversed(records)
                    if manifest and (r.get("model") or {}).get("created_at") == manifest.get("created_at")), None)
    model = history.model_id(current) if current else "(not recorded)"

    s: list[str] = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
                    '<meta name="viewport" content="width=device-width, initial-scale=1">',
                    "<title>rmpipe audit report</title>", f"<style>{CSS}</style></head><body>",
                    "<h1>Reward model audit report</h1>"]
    if not manifest:
        s.append('<p class="bad">No exported model yet: run <code>dvc repro</code>.</p>')
    else:
        promoted = _json(root / export.promoted_dir / MANIFEST_FILE)
        s.append(_summary(root, out, export_dir, manifest, promoted, records, model))
    s += _lineage(root, manifest, current, register_, model)
    s += _metrics(root)
    s += _validation(_json(root / "reports/validation.json"))
    s += _annotators(_json(root / "reports/annotators.json"))
    s += _history(records)
    s += _retractions(root, register_)
    s.append(f'<p class="note">Written by <code>rmpipe report</code> from {E(history.location(root))}, '
             f"{E(str(retractions.REGISTER))} and the current outputs. Self-contained: no network needed.</p>")
    s.append("</body></html>")
    return "\n".join(s)


def _summary(root: Path, out: Path, export_dir: Path, manifest: dict, promoted: dict, records: list[dict],
             model: str) -> str:
    """The table on top: the exported model, its verdicts, the promoted model now, and links to the sources."""
    from rmpipe.audit.lineage import MANIFEST_FILE

    ev, promo = manifest.get("evaluation") or {}, manifest.get("promotion") or {}
    git = manifest.get("git") or {}
    promoted_now = promoted.get("created_at") and next(
        (history.model_id(r) for r in records if (r.get("model") or {}).get("created_at") == promoted.get("created_at")),
        "(not recorded)")
    return _table(["", ""], [
        ["model", E(model) + f' <span class="note">({E(str(export_dir.relative_to(root)))}, created '
                             f'{E(str(manifest.get("created_at")))})</span>'],
        ["evaluation", _verdict(bool(ev.get("passed"))) + f" accuracy {_num(ev.get('accuracy'))} on "
                       f"{E(str(ev.get('n_pairs')))} held-out pairs"],
        ["promotion", _verdict(bool(promo.get("promoted")), "promoted", "not promoted") + " " + E(str(promo.get("reason")))],
        ["promoted model now", E(promoted_now or "none")],
        ["git", E(f"{git.get('commit')}{' (dirty)' if git.get('dirty') else ''}" if git else "not in git")],
        ["backbone", E(str((manifest.get("model") or {}).get("backbone")))],
        ["files", " · ".join([_link(out, export_dir / "README.md", "model card"),
                              _link(out, export_dir / MANIFEST_FILE, "lineage.json"),
                              _link(out, root / retractions.REGISTER, "retractions.jsonl"),
                              _link(out, root / "reports/data_docs/index.html", "GX data docs"),
                              _link(out, root / "reports/plots/index.html", "DVC plots")])],
    ], "summary")


def _lineage(root: Path, manifest: dict, current: dict | None, register_: list[dict], model: str) -> list[str]:
    """The batches behind the model (the retracted ones struck out), as a graph and a table."""
    stages = list((yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}).get("stages") or {})
    batches = sorted({b for ids in (manifest.get("batch_ids") or {}).values() for b in ids})
    retracted = [e["target"] for e in register_ if e.get("kind") == "batch"]
    s = ["<h2 id='lineage'>Lineage</h2>",
         f"<p>{len(batches)} batches feed the DVC stages that made model {E(model)}"
         + (f"; retracted (struck out, no longer an input): {E(', '.join(retracted))}" if retracted else "") + ".</p>",
         lineage_svg(batches, [b for b in retracted if b not in batches], stages, model)]
    if current:
        s.append(_table(["batch", "sha256", "train / val / test pairs"], [
            [E(name), f"<code>{E((info.get('sha256') or '-')[:16])}</code>",
             E(" / ".join(str((info.get("pairs") or {}).get(k, "-")) for k in ("train", "val", "test")))]
            for name, info in sorted((current.get("batches") or {}).items())]))
    return s


def _metrics(root: Path) -> list[str]:
    """Evaluation checks and metrics, the unit battery, and the reward histogram."""
    metrics, pathology = _json(root / "metrics/eval.json"), _json(root / "reports/pathology.json")
    s = ["<h2 id='metrics'>Metrics and pathology checks</h2>",
         _table(["check", "result"], [[E(k), _verdict(bool(v))] for k, v in (metrics.get("checks") or {}).items()]),
         _table(["metric", "value"], [[E(k), _num(metrics.get(k))] for k in
                                      ("accuracy", "bt_loss", "ece", "length_r2", "accuracy_chosen_shorter",
                                       "canary_max_abs_diff", "battery_failed", "battery_n") if k in metrics])]
    battery = pathology.get("battery") or {}
    if battery.get("results"):
        s.append(f"<p>Unit battery: {battery.get('n', 0) - battery.get('n_failed', 0)}/{battery.get('n', 0)} pairs with "
                 f"margin &ge; {E(str(battery.get('min_margin')))}</p>")
        s.append(_table(["pair", "margin", "result"], [[E(r["name"]), _num(r.get("margin"), 3), _verdict(bool(r.get("passed")))]
                                                        for r in battery["results"]], "battery"))
    s.append("<h3>Reward histogram (test split)</h3>" + histogram_svg(root / "plots/eval/reward_hist.csv"))
    return s


def _validation(validation: dict) -> list[str]:
    s = ["<h2 id='validation'>Data validation (Great Expectations)</h2>"]
    if not validation:
        return s + ["<p>no validation results (reports/validation.json)</p>"]
    s.append(f"<p>{_verdict(bool(validation.get('success')))}: {E(str(validation.get('n_expectations')))} expectations, "
             f"{E(str(validation.get('n_failed')))} failed; rows {E(json.dumps(validation.get('rows')))}</p>")
    if validation.get("failures"):
        s.append(_table(["failure"], [[E(json.dumps(f))] for f in validation["failures"]]))
    return s


def _annotators(annotators: dict) -> list[str]:
    table = annotators.get("annotators") or {}
    return ["<h2 id='annotators'>Annotators</h2>",
            f"<p>Krippendorff's alpha {_num(annotators.get('krippendorff_alpha'), 3)}; excluded: "
            f"{E(', '.join(annotators.get('excluded_annotators') or []) or 'none')}</p>",
            _table(["annotator", "votes", "share", "agreement", "flagged", "excluded", "reason"], [
                [E(str(a)), E(str(v.get("votes"))), _num(v.get("share"), 3), _num(v.get("agreement"), 3),
                 "yes" if v.get("flagged") else "", "yes" if v.get("excluded") else "", E(str(v.get("reason") or ""))]
                for a, v in table.items()], "annotators")]


def _history(records: list[dict]) -> list[str]:
    return ["<h2 id='history'>History of built and promoted models</h2>", accuracy_svg(records),
            _table(["#", "time", "trigger", "model", "batches", "accuracy", "promotion"], [
                [E(str(r.get("seq"))), E(str(r.get("time"))), E(str(r.get("trigger"))),
                 f"<code>{E(history.model_id(r))}</code>", E(str(len(r.get("batches") or {}))),
                 _num((r.get("metrics") or {}).get("accuracy")),
                 _verdict(bool((r.get("promotion") or {}).get("promoted")), "promoted", "not promoted")]
                for r in records], "history")]


def _retractions(root: Path, register_: list[dict]) -> list[str]:
    """Each retraction: what was removed and why, the model before and after, and what became of the data."""
    s = ["<h2 id='retractions'>Retractions</h2>"]
    if not register_:
        return s + ["<p>none</p>"]
    rows = []
    for entry in register_:
        # R<n>.json is the retraction's own outcome; a later `--purge` of it writes R<n>.<time>.json
        outcome = _json(root / retractions.OUTCOMES / f"{entry['id']}.json")
        later = [_json(p) for p in sorted((root / retractions.OUTCOMES).glob(f"{entry['id']}.*.json"))]
        before, after = outcome.get("before") or {}, outcome.get("after") or {}
        purge = next((o["purge"] for o in [outcome, *later] if o.get("purge")), {})
        change = (f"{E(str(before.get('model', '-')))} (acc {_num((before.get('metrics') or {}).get('accuracy'))}) &rarr; "
                  f"{E(str(after.get('model', '-')))} (acc {_num((after.get('metrics') or {}).get('accuracy'))})")
        rows.append([E(entry["id"]), E(entry["time"]), E(f"{entry['kind']} {entry['target']}"), E(entry["reason"]),
                     E(str(entry.get("by"))), change,
                     _verdict(bool((outcome.get("promotion") or {}).get("promoted")), "promoted", "not promoted")
                     if outcome.get("promotion") else "-",
                     E(f"purged ({len(purge.get('cache_objects_removed') or [])} cache objects)" if purge else
                       (entry.get("kept_at") or "params"))])
    return s + [_table(["id", "time", "removed", "reason", "by", "model before → after", "rebuilt model", "data"],
                       rows, "retractions")]


def write_report(root: Path, out: Path) -> Path:
    out = Path(root) / out if not Path(out).is_absolute() else Path(out)
    io.write_text(out, build_report(Path(root), out))
    return out
