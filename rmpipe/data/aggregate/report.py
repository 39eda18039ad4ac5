"""The aggregate stage's reports: reports/annotators.json (counts, buckets, alpha, per annotator),
reports/annotators.md, and the "too much dropped" check with its reason and fix."""

from __future__ import annotations

import math
from typing import Any

from rmpipe.core.errors import DataError
from rmpipe.data.aggregate.labels import krippendorff_alpha
from rmpipe.data.aggregate.vocab import LABELS, TIE, AggregateSettings

# Why pairs were dropped, in words, and the param a person changes to keep them.
_DROP_REASONS = {
    "min_votes": ("fewer than min_votes={min_votes} votes each",
                  "lower aggregate.min_votes or deliver more votes per pair (a pairwise dataset of already-judged "
                  "prompt/chosen/rejected rows is exempt: check those rows are not delivered as A/B vote rows)"),
    "tie": ("a tie by majority (aggregate.tie_policy=drop)", "set aggregate.tie_policy: soft to keep ties at soft label 0.5"),
    "no_usable_votes": ("no usable vote (malformed, identical responses, duplicate or excluded annotators)",
                        "see the votes buckets in reports/annotators.json"),
    "inconsistent_pair_id": ("a pair_id naming different response pairs in different votes",
                             "fix the pair_id column or leave it out so collect derives it"),
}


def check_dropped(report: dict[str, Any], settings: AggregateSettings) -> None:
    """DataError when aggregation dropped every pair, or more than `max_dropped_share` of them: the stage
    that emptied the data says so, with the reason, the count and the param, instead of a later stage."""
    n_in, n_out = report["n_pairs_in"], report["n_pairs_out"]
    dropped = n_in - n_out
    if n_in == 0 or (n_out > 0 and dropped / n_in <= settings.max_dropped_share):
        return
    causes = sorted(((report["pairs"][key], key) for key in _DROP_REASONS if report["pairs"].get(key)), reverse=True)
    reasons = "; ".join(f"{count:,} {'with ' if key != 'tie' else ''}{_DROP_REASONS[key][0].format(min_votes=settings.min_votes)}"
                        for count, key in causes)
    fix = _DROP_REASONS[causes[0][1]][1] if causes else "see reports/annotators.json"
    over = "" if n_out == 0 else f" (over aggregate.max_dropped_share={settings.max_dropped_share:g})"
    raise DataError(f"aggregate dropped {dropped:,} of {n_in:,} pairs{over}: {reasons}. To keep them: {fix}"
                    + ("" if n_out == 0 else "; or raise aggregate.max_dropped_share"))


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), digits)


def build_report(settings, label, chose_a, vote_buckets, pair_buckets, first, final, pairs, annotators,
                 excluded) -> dict[str, Any]:
    """`label`, `chose_a`: per input vote (its canonical label, and whether it picked position A)."""
    labels = final.label[final.eligible]
    n_tie_pairs = int((labels == TIE).sum())
    choices = label >= 0
    n_choices = max(int(choices.sum()), 1)
    n_a = int(chose_a[choices].sum())
    n_tie_votes = int((label[choices] == TIE).sum())

    def mean_of(column: str) -> float | None:
        return _round(pairs[column].mean()) if len(pairs) else None

    report: dict[str, Any] = {
        "method": settings.method,
        "tie_policy": settings.tie_policy,
        "min_votes": settings.min_votes,
        "n_votes_in": len(label),
        "n_pairs_in": sum(pair_buckets.values()),
        "n_votes_used": vote_buckets["used"],
        "n_pairs_out": len(pairs),
        "n_pairs_prejudged": int(pairs["prejudged"].sum()) if len(pairs) else 0,
        "max_dropped_share": settings.max_dropped_share,
        "n_dropped_min_votes": pair_buckets["min_votes"],
        "n_dropped_tie": pair_buckets["tie"],
        "n_tie_pairs": n_tie_pairs,
        "n_tie_kept_soft": n_tie_pairs if settings.tie_policy == "soft" else 0,
        "votes": vote_buckets,
        "pairs": pair_buckets,
        "labels": {name: int((labels == code).sum()) for code, name in enumerate(LABELS)},
        "vote_choices": {
            "a": _round(n_a / n_choices),
            "b": _round((n_choices - n_a - n_tie_votes) / n_choices),
            "tie": _round(n_tie_votes / n_choices),
        },
        "votes_per_pair": {
            "mean": mean_of("n_votes"),
            "min": int(pairs["n_votes"].min()) if len(pairs) else None,
            "max": int(pairs["n_votes"].max()) if len(pairs) else None,
        },
        "mean_agreement": mean_of("agreement"),
        "mean_soft_label": mean_of("soft_label"),
        "mean_margin": mean_of("margin"),
        "krippendorff_alpha": krippendorff_alpha(first.counts),
        "n_annotators": len(annotators),
        "n_flagged": int(annotators["flagged"].sum()),
        "agreement_floor": settings.agreement_floor,
        "share_ceiling": settings.share_ceiling,
        "exclude_flagged": settings.exclude_flagged,
        "exclude_annotators": list(settings.exclude_annotators),
        "excluded_annotators": excluded,
        "n_votes_excluded": vote_buckets["excluded_annotator"],
    }
    if excluded:
        report["krippendorff_alpha_after_exclusion"] = krippendorff_alpha(final.counts)
    report["annotators"] = _per_annotator(annotators, excluded)
    return report


def _per_annotator(annotators, excluded) -> dict[str, Any]:
    return {
        row.annotator_id: {
            "votes": int(row.votes),
            "share": _round(row.share),
            "agreement": _round(row.agreement),
            "n_compared": int(row.n_compared),
            "choice_a_share": _round(row.choice_a_share),
            "flagged": bool(row.flagged),
            "reason": row.reason,
            "excluded": row.annotator_id in excluded,
        }
        for row in annotators.sort_values(["votes", "annotator_id"], ascending=[False, True]).itertuples()
    }


def _fmt(x: float | None, pattern: str = "{:.2f}") -> str:
    return "-" if x is None else pattern.format(x)


def annotator_markdown(report: dict[str, Any]) -> str:
    """reports/annotators.md: the summary, then one table row per annotator."""
    votes, pairs = report["votes"], report["pairs"]
    dropped_votes = ", ".join(f"{k} {n}" for k, n in votes.items() if k != "used" and n) or "none"
    dropped_pairs = ", ".join(f"{k} {n}" for k, n in pairs.items() if k != "out" and n) or "none"
    choices = report["vote_choices"]
    lines = [
        "# Annotator report",
        "",
        f"Method **{report['method']}**, tie policy **{report['tie_policy']}**, min_votes {report['min_votes']}.",
        "",
        f"- votes: {report['n_votes_in']} in, {votes['used']} used; not used: {dropped_votes}",
        f"- pairs: {report['n_pairs_in']} in, {pairs['out']} out; dropped: {dropped_pairs}",
        f"- ties: {report['n_tie_pairs']} (kept with soft label 0.5: {report['n_tie_kept_soft']})",
        f"- Krippendorff's alpha (nominal): {_fmt(report['krippendorff_alpha'], '{:.3f}')}",
        f"- share of votes picking position A / B / tie: "
        f"{_fmt(choices['a'])} / {_fmt(choices['b'])} / {_fmt(choices['tie'])}",
        f"- flagged: {report['n_flagged']} of {report['n_annotators']} annotators "
        f"(agreement < {report['agreement_floor']:g} or share of votes > {report['share_ceiling']:g})",
    ]
    if report["excluded_annotators"]:
        lines.append(
            f"- excluded (exclude_flagged / exclude_annotators): {', '.join(report['excluded_annotators'])}: "
            f"{report['n_votes_excluded']} votes removed; alpha without them "
            f"{_fmt(report.get('krippendorff_alpha_after_exclusion'), '{:.3f}')}"
        )
    lines += [
        "",
        "Agreement = share of an annotator's votes, on pairs with at least 2 votes, that match the aggregated label.",
        "",
        "| annotator | votes | share | agreement | compared | picks A | flagged | reason |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, a in report["annotators"].items():
        flag = "excluded" if a["excluded"] else ("yes" if a["flagged"] else "")
        lines.append(
            f"| {str(name).replace('|', chr(92) + '|')} | {a['votes']} | {_fmt(a['share'])} | {_fmt(a['agreement'])} | "
            f"{a['n_compared']} | {_fmt(a['choice_a_share'])} | {flag} | {a['reason'] or ''} |"
        )
    return "\n".join(lines) + "\n"
