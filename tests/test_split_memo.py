"""Split and validate a part at a time (issue #28): runs that reuse earlier parts' work from their memos
write the bytes runs from scratch write, whatever pairs parts arrive, leave or change between runs and
whatever settings change; a damaged or deleted entry is never trusted; other code is never served."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rmpipe.core.codedeps import closure
from rmpipe.core.errors import UserError
from rmpipe.core.paths import ProjectPaths, read_splits
from rmpipe.core.schema import canonical_prompt, pair_id, prompt_hash
from stages import split as split_stage
from stages import validate as validate_stage

ROOT = Path(__file__).resolve().parents[1]
SALTS = ("rmpipe-v1", "another-salt")
SHARES = ((0.25, 0.75), (0.45, 0.55))  # the second fails on most parts: failure lines through the memo


def make_part(seed: int, kind: str, n_prompts: int = 12) -> pd.DataFrame:
    """Aggregated pairs (the aggregate stage's columns); `defect`: one agreement out of range; `dup`: also a
    pair of seed 0's part (a pair_id and a prompt in two parts, maybe two splits)."""
    rows = []
    for i in range(n_prompts):
        prompt = f"Question {seed}-{i}: how do I keep a reward model honest?"
        for j in range(2):
            short, long = f"Answer {seed}.{i}.{j}.", f"A longer answer {seed}.{i}.{j} with detail."
            chosen, rejected = (long, short) if (i + j + seed) % 2 else (short, long)
            rows.append({"pair_id": pair_id(prompt, chosen, rejected), "prompt": canonical_prompt(prompt),
                         "chosen": chosen, "rejected": rejected, "n_votes": 3, "n_chosen": 2, "n_rejected": 1,
                         "n_tie": 0, "agreement": 2 / 3, "soft_label": 2 / 3, "margin": 0.0,
                         "prompt_hash": prompt_hash(prompt), "batch_ids": [f"batch-{seed}.jsonl"]})
    frame = pd.DataFrame(rows)
    if kind == "defect":
        frame.loc[1, "agreement"] = 1.3
    elif kind == "dup":
        frame = pd.concat([frame, make_part(0, "clean", 1)], ignore_index=True)
    return frame


def write_params(root: Path, state: dict) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["split"]["salt"] = state["salt"]
    params["validate"]["chosen_longer_share"] = list(state["share"])
    (root / "params.yaml").write_text(yaml.safe_dump({k: params[k] for k in ("aggregate", "split", "validate")}))


def outputs(root: Path) -> dict[str, str]:
    """sha256 of every file the two stages write but the data docs (their pages carry the run's time)."""
    paths = ProjectPaths.at(root)
    files = sorted(p for p in paths.split_dir.rglob("*") if p.is_file())
    files += [p for p in (paths.split_report, paths.validation_report) if p.exists()]
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def run_stages(root: Path, memo: Path) -> tuple[dict[str, str], list[str]]:
    """Split then validate in project `root` with memos under `memo`: (output hashes, the errors they raised)."""
    paths, errors = ProjectPaths.at(root), []
    for stage, name in ((split_stage, "split"), (validate_stage, "validate")):
        try:
            stage.run(root / "params.yaml", paths, memo_dir=memo / name)
        except UserError as exc:  # the same words from both runs, but for where the project is
            errors.append(f"{name}: {exc}".replace(str(root), "<project>"))
    return outputs(root), errors


def scratch_run(root: Path, where: Path) -> tuple[dict[str, str], list[str]]:
    """The same pairs parts and params in a fresh project, no memo: what the incremental run must match."""
    shutil.rmtree(where, ignore_errors=True)
    pairs = ProjectPaths.at(where).pairs
    shutil.copytree(ProjectPaths.at(root).pairs, pairs)
    shutil.copy(root / "params.yaml", where / "params.yaml")
    return run_stages(where, where / "memo")


PARTS = st.tuples(st.integers(1, 6), st.sampled_from(["clean", "clean", "defect", "dup"]))
STEPS = st.lists(st.one_of(
    st.tuples(st.just("add"), PARTS),
    st.tuples(st.just("remove"), st.integers(0, 9)),
    st.tuples(st.just("change"), st.tuples(st.integers(0, 9), PARTS)),
    st.tuples(st.just("salt"), st.sampled_from(SALTS)),
    st.tuples(st.just("share"), st.sampled_from(SHARES)),
    st.tuples(st.just("damage"), st.tuples(st.sampled_from(["split", "validate"]), st.integers(0, 99))),
    st.tuples(st.just("forget"), st.sampled_from(["split", "validate"])),
), min_size=1, max_size=4)


def apply(step: tuple, folder: Path, memo: Path, state: dict) -> None:
    kind, arg = step
    names = sorted(p.name for p in folder.iterdir())
    if kind == "add":
        state["n"] += 1
        make_part(*arg).to_parquet(folder / f"part-{state['n']:03d}.parquet", index=False)
    elif kind in ("salt", "share"):
        state[kind] = arg
    elif kind == "damage":  # a memo file rewritten: noticed by its seal, the entry deleted, the part worked again
        files = sorted(p for p in (memo / arg[0]).glob("entries/*/*") if p.name != "seal.json")
        if files:
            files[arg[1] % len(files)].write_bytes(b"not what was stored")
    elif kind == "forget":  # deleting a memo changes nothing but time
        shutil.rmtree(memo / arg, ignore_errors=True)
    elif names and kind == "remove" and len(names) > 1:
        (folder / names[arg % len(names)]).unlink()
    elif names and kind == "change":  # new bytes under an old name: a retraction or a late vote re-aggregated
        make_part(*arg[1]).to_parquet(folder / names[arg[0] % len(names)], index=False)


@pytest.mark.slow  # ~10 s an example: each step runs both stages twice, GX and its data docs included
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=st.lists(PARTS, min_size=1, max_size=3), steps=STEPS, gx_rows=st.sampled_from([7, 30, 131_072]))
def test_memo_runs_write_what_runs_from_scratch_write(tmp_path_factory, first, steps, gx_rows):
    """`gx_rows`: GX runs cut inside parts (7), groups of a few parts (30), every part in one group."""
    from rmpipe.data.validate import contract

    default, contract.GX_ROWS = contract.GX_ROWS, gx_rows
    try:
        _steps_match_scratch(tmp_path_factory, first, steps)
    finally:
        contract.GX_ROWS = default


def _steps_match_scratch(tmp_path_factory, first, steps):
    root = tmp_path_factory.mktemp("incremental")
    folder = ProjectPaths.at(root).pairs
    folder.mkdir(parents=True)
    memo, state = root / "memo", {"n": 0, "salt": SALTS[0], "share": SHARES[0]}
    for part in first:
        apply(("add", part), folder, memo, state)
    for step in [("none", 0), *steps]:
        apply(step, folder, memo, state)
        write_params(root, state)
        assert run_stages(root, memo) == scratch_run(root, root.parent / f"{root.name}-scratch")


def entries(memo: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in memo.glob("entries/*/seal.json")}


def test_unchanged_parts_are_reused_and_a_change_of_settings_or_code_is_not_served(tmp_path, monkeypatch):
    """A second run reuses every entry (not rewritten); a new part adds entries and leaves the others; a new
    salt or share threshold, or other code, is served nothing, and the stale entries are pruned."""
    folder = ProjectPaths.at(tmp_path).pairs
    folder.mkdir(parents=True)
    for n in range(3):
        make_part(n + 1, "clean").to_parquet(folder / f"part-{n}.parquet", index=False)
    state = {"salt": SALTS[0], "share": SHARES[0]}
    write_params(tmp_path, state)
    memo = tmp_path / "memo"
    first = run_stages(tmp_path, memo)
    split_entries, validate_entries = entries(memo / "split"), entries(memo / "validate")
    assert len(split_entries) == 3  # one per pairs part
    assert len(validate_entries) == 3  # one group of parts per split: small parts share GX runs
    assert run_stages(tmp_path, memo) == first
    assert entries(memo / "split") == split_entries and entries(memo / "validate") == validate_entries
    make_part(9, "clean").to_parquet(folder / "part-3.parquet", index=False)
    run_stages(tmp_path, memo)
    grown = entries(memo / "split")
    assert len(grown) == 4 and {k: grown[k] for k in split_entries} == split_entries
    checked = entries(memo / "validate")  # the old groups reused as they are, the new part's group added
    assert len(checked) == 3 + 3 and {k: checked[k] for k in validate_entries} == validate_entries
    state["salt"] = SALTS[1]
    write_params(tmp_path, state)
    run_stages(tmp_path, memo)
    assert not set(entries(memo / "split")) & set(grown)  # nothing served across a new salt, old entries pruned
    state["share"] = SHARES[1]
    write_params(tmp_path, state)
    before = entries(memo / "validate")
    run_stages(tmp_path, memo)
    assert not set(entries(memo / "validate")) & set(before)
    # other code (what an edit of any module in the stage's import closure gives): nothing served
    monkeypatch.setattr(validate_stage, "stage_code", lambda entry, memo_root: "edited-code")
    before = entries(memo / "validate")
    run_stages(tmp_path, memo)
    assert not set(entries(memo / "validate")) & set(before)


def test_the_memo_keys_follow_the_stage_code_closure():
    """The code hash is over each stage's import closure (what dvc.yaml lists): the memo and the modules that
    make a part's rows or verdicts are in it, so changing any of them invalidates every entry."""
    assert {"rmpipe/data/part_memo.py", "rmpipe/data/split.py"} <= set(closure("stages/split.py"))
    assert {"rmpipe/data/part_memo.py", "rmpipe/data/validate/contract.py", "rmpipe/data/validate/parts.py",
            "rmpipe/data/validate/run.py", "rmpipe/data/validate/runs.py"} <= set(closure("stages/validate.py"))


@pytest.mark.parametrize("stage", ["split", "validate"])
def test_a_damaged_entry_is_deleted_and_worked_again(tmp_path, stage, caplog):
    folder = ProjectPaths.at(tmp_path).pairs
    folder.mkdir(parents=True)
    for n in range(2):
        make_part(n + 1, "defect").to_parquet(folder / f"part-{n}.parquet", index=False)
    write_params(tmp_path, {"salt": SALTS[0], "share": SHARES[0]})
    first = run_stages(tmp_path, tmp_path / "memo")
    damaged = min(p for p in (tmp_path / "memo" / stage).glob("entries/*/*") if p.name != "seal.json")
    damaged.write_bytes(b"damaged")
    assert run_stages(tmp_path, tmp_path / "memo") == first
    assert "is damaged" in caplog.text and damaged.read_bytes() != b"damaged"


def test_readers_take_a_split_of_parts_in_name_order(tmp_path):
    """read_splits: a split's parts' rows in name order, as one frame; a split written by hand as one file too."""
    paths = ProjectPaths.at(tmp_path)
    folder = paths.pairs
    folder.mkdir(parents=True)
    for n in (2, 1, 3):
        make_part(n, "clean").to_parquet(folder / f"part-{n}.parquet", index=False)
    write_params(tmp_path, {"salt": SALTS[0], "share": SHARES[0]})
    split_stage.run(tmp_path / "params.yaml", paths, memo_dir=tmp_path / "memo")
    train = read_splits(paths, ("train",))["train"]
    expected = pd.concat([pd.read_parquet(paths.split("train") / f"part-{n}.parquet") for n in (1, 2, 3)],
                         ignore_index=True)
    pd.testing.assert_frame_equal(train, expected)
    shutil.rmtree(paths.split("train"))
    expected.to_parquet(paths.split_dir / "train.parquet", index=False)
    pd.testing.assert_frame_equal(read_splits(paths, ("train",))["train"], expected)
