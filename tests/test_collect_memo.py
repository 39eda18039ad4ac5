"""Collect's and aggregate's memos (issue #28): runs that reuse earlier batches' outcomes write the bytes a
run from scratch writes (every votes part, every pairs part, the reports), whatever arrives, leaves, repeats
or is retracted between runs; a damaged entry is never trusted; a settings or code change is never served
from the memo."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rmpipe.core.codedeps import closure
from rmpipe.core.errors import DataError
from rmpipe.core.io import folder_hashes
from rmpipe.core.settings import CollectSettings
from rmpipe.data import retractions
from rmpipe.data.aggregate.memo import STAGE_ENTRY as AGGREGATE_ENTRY
from rmpipe.data.aggregate.memo import AggregateMemo
from rmpipe.data.aggregate.run import (
    AggregateSettings,
    aggregate_file,
    annotator_markdown,
)
from rmpipe.data.collect.memo import STAGE_ENTRY, CollectMemo
from rmpipe.data.collect.run import collect_to

PROMPTS = ["Explain tides.", "Write a haiku about rain.", "What is 2+2?", "Name a prime.", "Say hi.", "Why?"]
ANNOTATORS = ["ann-1", "ann-2", "ann-3"]
CHOICES = ["a", "b", "tie", "maybe"]  # "maybe" is a bad row: quarantined, and a batch of many is rejected


def settings_for(incoming: Path, max_bad_share: float = 0.5, max_field_chars: int = 1000) -> CollectSettings:
    return CollectSettings.from_section({"incoming_dir": str(incoming), "max_bad_share": max_bad_share,
                                         "on_rejected_batch": "skip", "max_field_chars": max_field_chars,
                                         "max_file_mb": 10})


def write_batch(path: Path, rows: list[tuple[int, int, int]]) -> None:
    lines = [json.dumps({"prompt": PROMPTS[p], "response_a": f"answer {p}-a", "response_b": f"answer {p}-b (longer)",
                         "annotator_id": ANNOTATORS[a], "choice": CHOICES[c]}) for p, a, c in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def aggregated(out: Path, settings: AggregateSettings, memo: AggregateMemo | None) -> dict:
    """sha256 of each pairs part, and the annotator report as JSON text (what the stage writes), or the one
    line a DataError says."""
    shutil.rmtree(out / "pairs", ignore_errors=True)
    try:
        decision = aggregate_file(out / "votes", out / "pairs", settings, memo=memo, batch_rows=3)
    except DataError as exc:
        return {"error": str(exc)}
    finally:
        if memo is not None:
            memo.finish()
    return {"pairs": folder_hashes(out / "pairs"), "report": json.dumps(decision.report, default=str),
            "md": annotator_markdown(decision.report)}


def collected(incoming: Path, conf: CollectSettings, out: Path, memo: CollectMemo | None, root: Path) -> dict:
    """sha256 of each votes part, and the quarantine and report as JSON text: what the stage writes."""
    shutil.rmtree(out / "votes", ignore_errors=True)  # as DVC deletes a stage's outputs before it runs it
    quarantine, report = collect_to(incoming, conf, out / "votes", retractions.load(root), memo=memo)
    if memo is not None:
        memo.finish()
    return {"votes": folder_hashes(out / "votes"),
            "quarantine": json.dumps(quarantine, default=str), "report": json.dumps(report, default=str)}


ROWS = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 2), st.sampled_from([0, 0, 1, 1, 2, 3])),
                min_size=1, max_size=6)
STEPS = st.lists(st.one_of(
    st.tuples(st.just("add"), ROWS),
    st.tuples(st.just("remove"), st.integers(0, 9)),
    st.tuples(st.just("redeliver"), st.integers(0, 9)),
    st.tuples(st.just("retract"), st.integers(0, 9)),
    st.tuples(st.just("settings"), st.sampled_from([0.2, 0.5, 1.0])),
    st.tuples(st.just("damage"), st.integers(0, 9)),
    st.tuples(st.just("aggregate"), st.sampled_from(["majority", "soft", "dawid_skene", "min_votes"])),
    st.tuples(st.just("damage_aggregate"), st.integers(0, 9)),
), min_size=2, max_size=6)

AGGREGATE = {"majority": {}, "soft": {"tie_policy": "soft"}, "dawid_skene": {"method": "dawid_skene"},
             "min_votes": {"min_votes": 2}}


def aggregate_settings(name: str) -> AggregateSettings:
    return AggregateSettings(**{"min_votes": 1, "max_dropped_share": 1.0, **AGGREGATE[name]})


def apply(step: tuple, root: Path, incoming: Path, state: dict) -> None:
    kind, arg = step
    names = sorted(p.name for p in incoming.iterdir())
    if kind == "add":
        state["n"] += 1
        write_batch(incoming / f"b{state['n']:03d}.jsonl", arg)
    elif kind == "settings":
        state["share"] = arg
    elif kind == "aggregate":
        state["aggregate"] = arg
    elif kind in ("damage", "damage_aggregate"):  # a memo entry rewritten: must be noticed, deleted, made again
        memo = root / ("memo" if kind == "damage" else "aggregate-memo") / "entries"
        entries = sorted(p for p in memo.glob("*/*") if p.name != "seal.json")
        if entries:
            entries[arg % len(entries)].write_bytes(b"not the stored bytes")
    elif names:
        name = names[arg % len(names)]
        if kind == "remove":
            (incoming / name).unlink()
        elif kind == "redeliver":  # the same bytes under a later name: a duplicate file
            state["n"] += 1
            shutil.copy(incoming / name, incoming / f"b{state['n']:03d}.jsonl")
        else:
            sha = hashlib.sha256((incoming / name).read_bytes()).hexdigest()
            retractions.register(root, {"kind": "batch", "target": name, "sha256": sha, "reason": "test",
                                        "by": "test", "time": "t"})
            (incoming / name).unlink()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=st.lists(ROWS, min_size=1, max_size=3), steps=STEPS)
def test_memo_runs_write_what_runs_from_scratch_write(tmp_path_factory, first, steps):
    root = tmp_path_factory.mktemp("memo")
    incoming = root / "incoming"
    incoming.mkdir()
    state = {"n": 0, "share": 0.5, "aggregate": "majority"}
    for rows in first:
        apply(("add", rows), root, incoming, state)
    for step in [("none", 0), *steps]:
        apply(step, root, incoming, state)
        if not any(incoming.iterdir()):
            continue
        conf = settings_for(incoming, state["share"])
        memo = CollectMemo(root / "memo", conf, code="test-code")
        assert collected(incoming, conf, root / "inc", memo, root) == collected(incoming, conf, root / "new", None, root)
        if not any((root / "new" / "votes").iterdir()):
            continue
        settings = aggregate_settings(state["aggregate"])
        again = AggregateMemo(root / "aggregate-memo", settings, code="test-code")
        assert aggregated(root / "inc", settings, again) == aggregated(root / "new", settings, None)


def test_unchanged_batches_are_not_read_again_and_a_change_of_settings_or_code_is_not_served(tmp_path):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    write_batch(incoming / "b1.jsonl", [(0, 0, 0), (1, 1, 1)])
    write_batch(incoming / "b2.jsonl", [(2, 0, 0), (0, 0, 1)])  # (0, ann-1) again: a duplicate vote of b1's
    write_batch(incoming / "b3.jsonl", [(3, 2, 2)])
    conf = settings_for(incoming)

    def run(conf: CollectSettings, code: str) -> tuple[int, int, dict]:
        memo = CollectMemo(tmp_path / "memo", conf, code=code)
        out = collected(incoming, conf, tmp_path / "out", memo, tmp_path)
        return memo.hits, memo.misses, out

    scratch = collected(incoming, conf, tmp_path / "scratch", None, tmp_path)
    assert run(conf, "v1") == (0, 3, scratch)
    assert run(conf, "v1") == (2, 1, scratch)  # b1, b3 from the memo; b2 repeats a vote of b1: read again in order
    assert run(conf, "v2")[:2] == (0, 3)  # other code: nothing served
    tighter = settings_for(incoming, max_field_chars=5)  # every text too long now: other rows, other outcome
    assert run(tighter, "v2") == (0, 3, collected(incoming, tighter, tmp_path / "s2", None, tmp_path))
    memo_files = list((tmp_path / "memo" / "entries").glob("*/result.json"))
    assert not memo_files  # the earlier settings' entries were pruned after the run, and no batch was accepted
    assert run(conf, "v2")[:2] == (0, 3)
    shutil.rmtree(tmp_path / "memo")  # deleting the memo changes nothing but time
    assert run(conf, "v2") == (0, 3, scratch)


def test_the_memo_key_follows_the_stage_code_closure():
    """The code hash is over stages/collect.py's import closure (what dvc.yaml lists): the memo and the
    modules that make a batch's rows are in it, so changing any of them invalidates every entry."""
    files = closure(STAGE_ENTRY)
    for module in ("rmpipe/data/collect/memo.py", "rmpipe/data/collect/batch.py", "rmpipe/data/collect/fast.py",
                   "rmpipe/data/collect/rows.py", "rmpipe/data/collect/run.py", "rmpipe/core/settings/data.py"):
        assert module in files


def test_the_stage_keeps_its_memo_in_the_project_and_a_damaged_entry_is_read_again(tmp_path, project_root,
                                                                                    monkeypatch):
    """The collect stage itself, in a project: a second run serves every batch from .rmpipe/memo/collect and
    writes the same bytes; a damaged entry is deleted with a warning, its batch read again, same bytes."""
    import yaml

    from rmpipe.data.sample.batches import write_sample_batches
    from stages import collect as stage

    params = yaml.safe_load((project_root / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    write_sample_batches(tmp_path / params["collect"]["incoming_dir"], {**params["sample_data"], "n_pairs": 60})
    monkeypatch.chdir(tmp_path)
    outputs = ("data/collected/quarantine.jsonl", "reports/collect.json")

    def run() -> dict[str, str]:
        stage.run("params.yaml")
        return {**{name: hashlib.sha256(Path(name).read_bytes()).hexdigest() for name in outputs},
                **folder_hashes("data/collected/votes")}

    first = run()
    entries = sorted(Path(".rmpipe/memo/collect/entries").iterdir())
    assert len(entries) == 3  # two vote-row batches and the pair-row batch, all accepted
    stamps = {entry.name: (entry / "seal.json").stat().st_mtime_ns for entry in entries}
    assert run() == first
    assert {entry.name: (entry / "seal.json").stat().st_mtime_ns for entry in entries} == stamps  # reused, not rewritten
    (entries[0] / "votes.parquet").unlink()  # not written in place: the part in the votes folder is a link to it
    (entries[0] / "votes.parquet").write_bytes(b"damaged")
    assert run() == first
    assert (entries[0] / "votes.parquet").read_bytes() != b"damaged"  # deleted, the batch read again, stored anew
    assert (entries[0] / "seal.json").stat().st_mtime_ns != stamps[entries[0].name]
    assert all((e / "seal.json").stat().st_mtime_ns == stamps[e.name] for e in entries[1:])


def test_aggregate_redoes_the_text_work_of_changed_parts_only_and_never_trusts_a_damaged_or_stale_entry(tmp_path):
    """A new batch: its part is oriented and its pairs part written; the others come from the memo (same bytes
    as from scratch). A damaged entry is rebuilt; other settings or code are not served."""
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    write_batch(incoming / "b1.jsonl", [(0, 0, 0), (1, 1, 1), (0, 1, 0)])
    write_batch(incoming / "b2.jsonl", [(2, 0, 0), (2, 1, 0)])
    conf = settings_for(incoming)
    majority = aggregate_settings("majority")

    def run(settings: AggregateSettings = majority, code: str = "v1") -> tuple[dict, dict, dict]:
        memo = AggregateMemo(tmp_path / "aggregate-memo", settings, code=code)
        got = aggregated(tmp_path / "inc", settings, memo)
        return memo.hits, memo.misses, got

    def scratch(settings: AggregateSettings = majority) -> dict:
        return aggregated(tmp_path / "new", settings, None)

    collected(incoming, conf, tmp_path / "inc", None, tmp_path)
    collected(incoming, conf, tmp_path / "new", None, tmp_path)
    assert run() == ({"facts": 0, "pairs": 0}, {"facts": 2, "pairs": 2}, scratch())
    assert run()[:2] == ({"facts": 2, "pairs": 2}, {"facts": 0, "pairs": 0})
    write_batch(incoming / "b3.jsonl", [(3, 2, 0), (1, 2, 1)])  # a new pair, and a vote on one of b1's pairs
    collected(incoming, conf, tmp_path / "inc", None, tmp_path)
    collected(incoming, conf, tmp_path / "new", None, tmp_path)
    # b1's pairs part changes (one of its pairs got a vote); b2's is linked back; b3's is new
    assert run() == ({"facts": 2, "pairs": 1}, {"facts": 1, "pairs": 2}, scratch())
    pairs_parts = sorted((tmp_path / "aggregate-memo" / "entries").glob("*/pairs.parquet"))
    assert len(pairs_parts) == 3  # entries of the last run only
    pairs_parts[0].write_bytes(b"damaged")
    hits, misses, got = run()
    assert got == scratch() and hits["pairs"] == 2 and misses["pairs"] == 1
    assert run(code="v2")[:2] == ({"facts": 0, "pairs": 0}, {"facts": 3, "pairs": 3})  # other code: nothing served
    soft = aggregate_settings("soft")
    hits, misses, got = run(soft, code="v2")  # other settings: the orientation stays, every pairs part is new
    assert (hits["facts"], hits["pairs"], got) == (3, 0, scratch(soft))
    shutil.rmtree(tmp_path / "aggregate-memo")  # deleting the memo changes nothing but time
    assert run(soft, code="v2")[2] == scratch(soft)


def test_the_aggregate_memo_key_follows_the_stage_code_closure():
    files = closure(AGGREGATE_ENTRY)
    for module in ("rmpipe/data/aggregate/memo.py", "rmpipe/data/aggregate/parts.py", "rmpipe/data/aggregate/orient.py",
                   "rmpipe/data/aggregate/pairs.py", "rmpipe/data/aggregate/labels.py", "rmpipe/core/parts.py",
                   "rmpipe/core/settings/data.py"):
        assert module in files
