"""`rmpipe annotate` against a real Label Studio server (its own venv, made by `make label-studio-env`).

One server per module, on 127.0.0.1, from a copy of the data folder `make` initialised (two annotators,
each with an API token): tasks are pushed, annotated through Label Studio's API as each annotator,
pulled, and the batch is read by rmpipe's collect; one test takes a batch through `on-new-batch` into a real
(tiny) model and reads its lineage.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import label_studio as ls
from rmpipe.core.schema import canonical_prompt
from rmpipe.data.annotate.client import Client, Connection
from rmpipe.data.annotate.pull import pull
from rmpipe.data.annotate.push import push
from rmpipe.data.collect.run import collect_dir
from rmpipe.model.sampling import group_task, pair_tasks

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / ls.VENV / "test-data"
TOKENS = {"admin@rmpipe.local": "rmpipe-test-token-admin", "annotator2@rmpipe.local": "rmpipe-test-token-annotator2"}
ADMIN, ANN2 = TOKENS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server(str):
    """The server's URL, plus what it takes to stop it and start it again (same data folder and port)."""

    def stop(self) -> None:
        _kill(self.proc)

    def start(self) -> None:
        self.proc = ls.start(self.data, self.port, self.data.parent / "server.log", venv=ROOT / ls.VENV)
        ls.wait_up(str(self), self.proc, timeout_s=120)


def _kill(proc) -> None:
    import os
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # a throwaway copy: no need for Label Studio's graceful stop
    proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not (TEMPLATE / "label_studio.sqlite3").is_file():
        pytest.skip(f"Label Studio test data {TEMPLATE} missing: run `make label-studio-env`")
    data = tmp_path_factory.mktemp("ls") / "data"
    shutil.copytree(TEMPLATE, data)
    port = _free_port()
    url = _Server(f"http://127.0.0.1:{port}")
    url.data, url.port = data, port
    try:
        url.start()
        yield url
    finally:
        _kill(url.proc)


def _client(url: str, who: str = ADMIN) -> Client:
    return Client(Connection(url, TOKENS[who]))


def _annotate(url: str, who: str, task: int, result: list, cancelled: bool = False, lead_time: float = 4.5) -> int:
    body = {"result": result, "was_cancelled": cancelled, "lead_time": lead_time}
    return _client(url, who).call("POST", f"/api/tasks/{task}/annotations/", json=body)["id"]


def _choice(value: str, strength: str | None = None) -> list:
    result = [{"from_name": "choice", "to_name": "prompt", "type": "choices", "value": {"choices": [value]}}]
    if strength:
        result.append({"from_name": "strength", "to_name": "prompt", "type": "choices", "value": {"choices": [strength]}})
    return result


def _ls_tasks(url: str, project_id: int) -> dict[str, int]:
    return {t["data"]["task_id"]: t["id"] for t in _client(url).project_task_data(project_id)}


def _pair_tasks_file(path: Path) -> Path:
    tasks, _ = pair_tasks(canonical_prompt("Name a colour of the sky."), ["Blue.", "Grey, on a rainy day.", "Orange at dusk."],
                          {"backbone": "tiny", "seed": 0})
    path.write_text("".join(json.dumps(t) + "\n" for t in tasks))
    return path


def test_push_pull_collect_round_trip(server, tmp_path):
    tasks_file = _pair_tasks_file(tmp_path / "sky.tasks.jsonl")
    first = push(tasks_file, "sky pairs", _client(server), ROOT)
    assert (first["imported"], first["already_there"], first["kind"]) == (3, 0, "pairs")
    assert push(tasks_file, "sky pairs", _client(server), ROOT)["imported"] == 0  # reused, nothing twice
    ids = list(_ls_tasks(server, first["project_id"]).values())
    _annotate(server, ADMIN, ids[0], _choice("a", "strong"), lead_time=12.0)
    _annotate(server, ANN2, ids[0], _choice("b"))
    _annotate(server, ADMIN, ids[1], _choice("tie"))
    _annotate(server, ANN2, ids[1], [], cancelled=True)  # skipped
    _annotate(server, ANN2, ids[2], _choice("a"))  # one person, one task, two different judgements
    _annotate(server, ANN2, ids[2], _choice("b"))
    _annotate(server, ADMIN, ids[2], [])  # submitted with no choice

    incoming = tmp_path / "incoming"
    result = pull(_client(server), "sky pairs", incoming, tmp_path)
    assert result["rows"] == 3
    assert result["left_out"] == {"skipped": 1, "conflicting_annotations": 2, "empty_choice": 1}
    batch = Path(result["batch"])
    rows = [json.loads(line) for line in batch.read_text().splitlines()]
    judged = sorted((r["annotator_id"], r["label_studio_task"], r["choice"], r.get("strength")) for r in rows)
    assert judged == sorted([(ADMIN, ids[0], "a", "strong"), (ANN2, ids[0], "b", None), (ADMIN, ids[1], "tie", None)])
    assert {r["lead_time_s"] for r in rows if r["label_studio_task"] == ids[0] and r["annotator_id"] == ADMIN} == {12.0}
    source = json.loads(batch.with_name(batch.name + ".source.json").read_text())
    assert (source["tool"], source["project_title"], source["export_id"]) == ("label-studio", "sky pairs",
                                                                              result["export_id"])
    assert source["label_studio_version"] == "1.23.2" and len(source["left_out"]) == 4

    votes, quarantine, report = collect_dir(incoming, {"incoming_dir": str(incoming), "max_bad_share": 0.2,
                                                       "max_field_chars": 100_000, "max_file_mb": 512,
                                                       "on_rejected_batch": "fail"})
    assert len(votes) == 3 and quarantine == []
    assert sorted(votes["annotator_id"]) == sorted([ADMIN, ANN2, ADMIN])
    assert report["batches"][0]["source"]["export_id"] == result["export_id"]  # the lineage's record

    again = pull(_client(server), "sky pairs", incoming, tmp_path)
    assert again["batch"] is None and again["rows"] == 0 and again["left_out"] == {}
    kept = {e["id"] for e in _client(server).call("GET", f"/api/projects/{first['project_id']}/exports/")}
    assert result["export_id"] in kept and again["export_id"] not in kept  # an export with nothing new is not kept

    _annotate(server, ANN2, ids[1], _choice("a", "slight"))  # came back to the skipped task
    _annotate(server, ADMIN, ids[0], _choice("b"))  # changes their mind: a second, different judgement
    third = pull(_client(server), "sky pairs", incoming, tmp_path)
    assert third["rows"] == 1 and third["left_out"] == {"conflicting_annotations": 1}
    assert Path(third["batch"]).name != batch.name
    votes, _, _ = collect_dir(incoming, {"incoming_dir": str(incoming), "max_bad_share": 0.2,
                                         "max_field_chars": 100_000, "max_file_mb": 512, "on_rejected_batch": "fail"})
    assert len(votes) == 4


def test_a_pull_killed_before_its_cursor_moved_is_not_repeated(server, tmp_path):
    tasks_file = _pair_tasks_file(tmp_path / "sky.tasks.jsonl")
    pushed = push(tasks_file, "sky crash", _client(server), ROOT)
    task = next(iter(_ls_tasks(server, pushed["project_id"]).values()))
    _annotate(server, ADMIN, task, _choice("a"))
    incoming = tmp_path / "incoming"
    first = pull(_client(server), "sky crash", incoming, tmp_path)
    (tmp_path / ".rmpipe" / "annotate" / "sky-crash.json").unlink()  # as if killed after the batch, before the cursor
    again = pull(_client(server), "sky crash", incoming, tmp_path)
    assert first["rows"] == 1 and again["batch"] is None and again["rows"] == 0


def test_ranking_tasks_become_ranked_rows(server, tmp_path):
    tasks, _ = group_task(canonical_prompt("Name a fruit."), ["Apple.", "Pear.", "A banana."], {"backbone": "tiny"})
    tasks_file = tmp_path / "fruit.tasks.jsonl"
    tasks_file.write_text(json.dumps(tasks[0]) + "\n")
    pushed = push(tasks_file, "fruit ranking", _client(server), ROOT)
    assert pushed["kind"] == "groups"
    project = _client(server).call("GET", f"/api/projects/{pushed['project_id']}/")
    assert "<Ranker" in project["label_config"]  # the interface from annotation/ranking.xml
    task = next(iter(_ls_tasks(server, pushed["project_id"]).values()))
    _annotate(server, ANN2, task, [{"from_name": "rank", "to_name": "responses", "type": "ranker",
                                    "value": {"ranker": {"rank": ["2", "0", "1"]}}}])
    incoming = tmp_path / "incoming"
    result = pull(_client(server), "fruit ranking", incoming, tmp_path)
    row = json.loads(Path(result["batch"]).read_text())
    assert row["ranking"] == [2, 0, 1] and row["responses"] == ["Apple.", "Pear.", "A banana."]
    votes, quarantine, _ = collect_dir(incoming, {"incoming_dir": str(incoming), "max_bad_share": 0.2,
                                                  "max_field_chars": 100_000, "max_file_mb": 512,
                                                  "on_rejected_batch": "fail"})
    assert len(votes) == 3 and quarantine == []  # 3 responses ranked: 3 pairwise votes


def test_label_studio_down_is_one_line_and_writes_nothing(tmp_path):
    env = {**__import__("os").environ, "LABEL_STUDIO_URL": f"http://127.0.0.1:{_free_port()}",
           "LABEL_STUDIO_API_KEY": "x" * 40, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "annotate", "pull", "--project", "p",
                          "--out", str(tmp_path / "incoming")], check=False, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode != 0 and len(lines) == 1, out.stderr
    assert "unreachable" in lines[0] and "rmpipe annotate server" in lines[0]
    assert not (tmp_path / "incoming").exists() and not (tmp_path / ".rmpipe").exists()


@pytest.mark.slow  # the module's one build: a tiny project, ~80 s of `dvc repro` (~90 s in all)
def test_judgements_made_in_label_studio_become_a_model_whose_lineage_names_the_project(server, tmp_path,
                                                                                        monkeypatch):
    """The loop end to end: tasks pushed, judged by two annotators in Label Studio, pulled by the
    `annotation-pull` flow and handed to `on-new-batch`, which rebuilds the real pipeline (`dvc repro`, tiny
    backbone); `rmpipe lineage` of the exported model then names the Label Studio project and export. A second
    run of the flow with nothing new hands nothing over: one export, one on-new-batch run."""
    from test_dvc_pipeline import BIN, run
    from test_service import fast_project

    from pipeline.annotation_flow import annotation_pull

    project = fast_project(tmp_path / "project")
    run([str(BIN / "rmpipe"), "sample-data", "--out", "data/incoming", "--n-pairs", "80"], project)  # earlier votes
    pushed = push(_pair_tasks_file(tmp_path / "sky.tasks.jsonl"), "sky model", _client(server), ROOT)
    for who in (ADMIN, ANN2):  # two votes a pair: each pair survives aggregation's min_votes
        for task in _ls_tasks(server, pushed["project_id"]).values():
            _annotate(server, who, task, _choice("a", "moderate"))
    monkeypatch.setenv("LABEL_STUDIO_URL", server)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKENS[ADMIN])

    ran = annotation_pull(label_studio_project="sky model", project=str(project))
    (name, outcome), = ran["handed_over"].items()
    assert outcome == "accepted" and ran["rows"] == 6 and ran["left_out"] == {}
    manifest = json.loads((project / "models/export/lineage.json").read_text())
    assert name in {b for ids in manifest["batch_ids"].values() for b in ids}  # its pairs reached the model
    source = manifest["data"]["batches"][name]["source"]
    assert (source["tool"], source["project_title"], source["project_id"], source["export_id"]) == (
        "label-studio", "sky model", pushed["project_id"], ran["export_id"])
    described = run([str(BIN / "rmpipe"), "lineage", "models/export"], project).stdout
    assert (f"{name} [jsonl]" in described and f"Label Studio 1.23.2 at {server} project 'sky model' "
            f"(id {pushed['project_id']}) export {ran['export_id']}" in described), described
    assert {name, name + ".source.json"} <= {p.name for p in (project / "data/incoming").iterdir()}  # it travelled

    records = sorted((project / "reports/runs").glob("*.json"))
    idle = annotation_pull(label_studio_project="sky model", project=str(project))
    assert idle["batch"] is None and idle["handed_over"] == {}  # nothing new: nothing starts
    assert sorted((project / "reports/runs").glob("*.json")) == records
    assert len([r for r in records if r.name.endswith(f"-{name}.json")]) == 1  # one on-new-batch run for it


def test_the_lineage_names_the_label_studio_project_and_export():
    from rmpipe.audit.lineage import _data_lines

    source = {"tool": "label-studio", "label_studio_version": "1.23.2", "url": "http://127.0.0.1:8080",
              "project_title": "sky pairs", "project_id": 3, "export_id": 7}
    (line,) = _data_lines({"batches": {"label-studio-sky-pairs-e7.jsonl": {"format": "jsonl", "sha256": "ab" * 32,
                                                                            "source": source}}})
    assert "Label Studio 1.23.2 at http://127.0.0.1:8080 project 'sky pairs' (id 3) export 7" in line


def test_a_pushed_pair_renders_its_two_responses_in_label_studios_ui(server, tmp_path):
    from ls_browser import screenshot_when_shown, session_cookie

    tasks, _ = pair_tasks(canonical_prompt("Name a colour of the sky."), ["Blue, mostly.", "Grey on a rainy day."], {})
    tasks_file = tmp_path / "ui.tasks.jsonl"
    tasks_file.write_text(json.dumps(tasks[0]) + "\n")
    pushed = push(tasks_file, "sky ui", _client(server), ROOT)
    task = next(iter(_ls_tasks(server, pushed["project_id"]).values()))
    wanted = ["Which response is better?", "Response A", "Blue, mostly.", "Response B", "Grey on a rainy day.", "Tie"]
    png = tmp_path / "label-studio-task.png"
    text = screenshot_when_shown(server, f"/projects/{pushed['project_id']}/data?task={task}",
                                 session_cookie(server, ADMIN, "rmpipe-admin"), wanted, tmp_path, png)
    assert all(w in text for w in wanted), text[:2000]  # the labeling interface from annotation/pairwise.xml
    assert png.stat().st_size > 10_000


def test_the_server_stopping_mid_pull_is_one_line_and_loses_nothing(server, tmp_path):
    from rmpipe.data.annotate.client import LabelStudioUnavailable

    pushed = push(_pair_tasks_file(tmp_path / "sky.tasks.jsonl"), "sky outage", _client(server), ROOT)
    task = next(iter(_ls_tasks(server, pushed["project_id"]).values()))
    _annotate(server, ANN2, task, _choice("a"))

    class StopsBeforeTheDownload(Client):  # the real server, stopped between the export and its download
        def _download(self, path):
            server.stop()
            return super()._download(path)

    incoming = tmp_path / "incoming"
    client = StopsBeforeTheDownload(Connection(server, TOKENS[ADMIN]), backoff_s=0.05)
    try:
        with pytest.raises(LabelStudioUnavailable) as failed:
            pull(client, "sky outage", incoming, tmp_path)
    finally:
        server.start()
    assert "stopped answering during the export download" in str(failed.value) and "\n" not in str(failed.value)
    assert not incoming.exists() and not (tmp_path / ".rmpipe/annotate/sky-outage.json").exists()  # nothing moved
    after = pull(_client(server), "sky outage", incoming, tmp_path)
    assert after["rows"] == 1  # the judgement was not lost


def test_a_bad_tasks_file_is_one_line_naming_the_line_and_the_fix(tmp_path):
    from rmpipe.core.errors import DataError
    from rmpipe.data.annotate.push import read_tasks

    mixed = tmp_path / "mixed.tasks.jsonl"
    mixed.write_text(json.dumps({"task_id": "1", "prompt": "p", "response_a": "a", "response_b": "b"}) + "\n"
                     + json.dumps({"task_id": "2", "prompt": "p", "responses": ["a", "b"]}) + "\n")
    broken = tmp_path / "broken.tasks.jsonl"
    broken.write_text(json.dumps({"task_id": "1", "prompt": "p", "response_a": "a", "response_b": "b"}) + "\n{oops\n")
    for path, words in ((mixed, "both A/B and ranking tasks"), (broken, "broken.tasks.jsonl:2: not valid JSON"),
                        (tmp_path / "none.jsonl", "rmpipe sample-pairs")):
        with pytest.raises(DataError, match=words):
            read_tasks(path)
