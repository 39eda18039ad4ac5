"""The service: batch watcher, event trigger, prefect.yaml, and the end-to-end run on a real Prefect server."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prefect_server import start, start_server, stop, wait_for
from test_dvc_pipeline import project_files

from pipeline import service
from pipeline.watch import BatchWatcher, is_batch_name, watch

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


# --- the watcher ---------------------------------------------------------------------------------

def test_a_file_still_being_written_does_not_fire(tmp_path):
    watcher = BatchWatcher(tmp_path)
    batch = tmp_path / "b1.jsonl"
    batch.write_text("{}\n")
    assert watcher.poll() == []  # first sight: not yet known to be stable
    with batch.open("a") as fh:  # the writer is still appending
        fh.write("{}\n")
    assert watcher.poll() == []
    assert watcher.poll() == [batch]  # unchanged across two polls: complete
    watcher.mark_fired(batch)
    assert watcher.poll() == [] and watcher.poll() == []  # fires once


def test_in_progress_names_and_dotfiles_never_fire_but_a_rename_into_place_does(tmp_path):
    assert not is_batch_name("b.jsonl.part") and not is_batch_name(".b.jsonl") and not is_batch_name("b.csv.tmp")
    assert not is_batch_name("notes.txt") and is_batch_name("B.JSONL") and is_batch_name("x.parquet")
    watcher = BatchWatcher(tmp_path)
    part = tmp_path / "b2.csv.part"
    part.write_text("prompt,response_a\n")
    (tmp_path / ".hidden.jsonl").write_text("{}\n")
    assert watcher.poll() == [] and watcher.poll() == []
    part.rename(tmp_path / "b2.csv")
    assert watcher.poll() == []
    assert watcher.poll() == [tmp_path / "b2.csv"]


def test_restart_remembers_fired_files_and_memory_is_bounded(tmp_path):
    state = tmp_path / "state.json"
    drop = tmp_path / "drop"
    drop.mkdir()
    announced: list[str] = []
    for i in range(4):
        (drop / f"b{i}.jsonl").write_text(f"{i}\n")
    watch(drop, lambda p: announced.append(p.name), interval_s=0.01, state_file=state, polls=3)
    assert sorted(announced) == ["b0.jsonl", "b1.jsonl", "b2.jsonl", "b3.jsonl"]

    watch(drop, lambda p: announced.append(p.name), interval_s=0.01, state_file=state, polls=3)
    assert len(announced) == 4  # a restarted watcher does not announce them again

    time.sleep(0.01)
    (drop / "b0.jsonl").write_text("changed content\n")  # a re-delivery is announced; the flow judges it
    watch(drop, lambda p: announced.append(p.name), interval_s=0.01, state_file=state, polls=3)
    assert announced[4:] == ["b0.jsonl"]

    small = BatchWatcher(drop, state, max_remembered=2)
    small.mark_fired(drop / "b1.jsonl")
    assert len(json.loads(state.read_text())["fired"]) == 2


def test_a_failed_announcement_is_retried(tmp_path):
    (tmp_path / "b.jsonl").write_text("{}\n")
    calls: list[str] = []

    def flaky(path):
        calls.append(path.name)
        if len(calls) == 1:
            raise ConnectionError("server down")

    watch(tmp_path, flaky, interval_s=0.01, polls=4)
    assert calls == ["b.jsonl", "b.jsonl"]


# --- trigger, event and prefect.yaml -----------------------------------------------------------------

def test_the_trigger_maps_the_event_payload_to_the_flow_parameter(tmp_path):
    batch = tmp_path / "b.jsonl"
    batch.write_text("{}\n")
    event = service.batch_event(batch)
    trigger = service.batch_trigger()
    assert event.event == service.BATCH_EVENT and trigger.expect == {service.BATCH_EVENT}
    assert event.payload["batch_path"] == str(batch.resolve())
    assert trigger.parameters == {"batch_path": "{{ event.payload.batch_path }}"}
    assert event.resource.id.startswith(service.BATCH_RESOURCE_PREFIX)
    assert service.one_at_a_time().limit == 1 and service.one_at_a_time().collision_strategy.value == "ENQUEUE"


def test_prefect_yaml_deploys_the_same_flows_with_the_same_trigger():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    batch = by_name[service.DEPLOYMENT]
    assert batch["entrypoint"] == "pipeline/flows.py:on_new_batch"
    assert batch["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    # Parsed the way `prefect deploy` parses it, the trigger equals the one `rmpipe serve` uses.
    from prefect.events import DeploymentTriggerTypes
    from pydantic import TypeAdapter

    (spec_trigger,) = batch["triggers"]
    parsed = TypeAdapter(DeploymentTriggerTypes).validate_python(spec_trigger)
    served = service.batch_trigger()
    for field in ("expect", "match", "parameters", "posture", "threshold", "within"):
        assert getattr(parsed, field) == getattr(served, field), field
    assert by_name["rebuild"]["entrypoint"] == "pipeline/flows.py:rebuild"
    from pipeline import flows

    for deployment in spec["deployments"]:
        module, name = deployment["entrypoint"].split(":")
        assert module == "pipeline/flows.py" and hasattr(getattr(flows, name), "serve")


def test_watch_needs_a_server(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    out = subprocess.run([PY, "-m", "pipeline.cli", "watch", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no Prefect server configured" in out.stderr
    assert "Traceback" not in out.stderr


# --- end to end on a real Prefect server -------------------------------------------------------------

# Small enough that two full rebuilds fit the test's time budget on two CPU cores.
FAST = {
    ("sample_data", "pair_rows"): 0,
    ("sample_data", "n_batches"): 1,
    ("train", "epochs"): 1,
    ("evaluate", "min_accuracy"): 0.0,
    ("validate", "chosen_longer_share"): [0.0, 1.0],  # a 10-pair val split cannot show a meaningful band
    ("model", "max_length"): 64,
    ("model", "tiny", "hidden_size"): 32,
    ("model", "tiny", "intermediate_size"): 64,
    ("model", "tiny", "num_hidden_layers"): 1,
    ("model", "tiny", "num_attention_heads"): 2,
    ("model", "tiny", "num_key_value_heads"): 1,
}


def fast_project(dest: Path) -> Path:
    """A copy of this project's (non-ignored) files with tiny training params, DVC without git."""
    for rel in project_files():
        if not rel.startswith(("data/incoming/", "tests/", "bench/")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    (dest / "data/incoming").mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    for keys, value in FAST.items():
        node = params
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        if keys[-1] in node or keys[0] == "sample_data":
            node[keys[-1]] = value
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if not (dest / ".dvc").is_dir():
        subprocess.run([PY, "-m", "dvc", "init", "--no-scm", "-q"], cwd=dest, check=True)
    subprocess.run([PY, "-m", "dvc", "config", "--local", "core.no_scm", "true"], cwd=dest, check=True)
    return dest


def flow_runs(api: str, flow_name: str) -> list[dict]:
    import httpx

    try:
        resp = httpx.post(f"{api}/flow_runs/filter", json={"flows": {"name": {"any_": [flow_name]}}}, timeout=10)
        resp.raise_for_status()
    except httpx.HTTPError:
        return []
    return resp.json()


BURST = 4  # batches landing at once: each is one full rebuild of the real pipeline, one after another


def burst_batches(project: Path, staging: Path, env: dict, n: int = BURST) -> list[Path]:
    """The sample votes cut into `n` batches by prompt (each batch carries every vote of its pairs, so a batch
    alone aggregates with the default `min_votes`), delivered as .jsonl files."""
    sample = staging / "sample"
    subprocess.run([PY, "-m", "pipeline.cli", "sample-data", "--out", str(sample), "--n-pairs", str(80 * n)],
                   cwd=project, env=env, check=True, capture_output=True)
    (votes,) = sample.glob("*.jsonl")
    by_prompt: dict[str, list[str]] = {}
    for line in votes.read_text().splitlines():
        by_prompt.setdefault(json.dumps(json.loads(line)["prompt"]), []).append(line + "\n")
    paths = [staging / f"burst-{i}.jsonl" for i in range(n)]
    for i, lines in enumerate(by_prompt.values()):
        with paths[i % n].open("a") as fh:
            fh.writelines(lines)
    return paths


def finished_runs(api: str, n: int):
    runs = [r for r in flow_runs(api, "on-new-batch") if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED")]
    return runs if len(runs) == n else None


def assert_a_malformed_batch_is_rejected_and_changes_nothing(project: Path, staging: Path, drop: Path, api: str,
                                                             procs: list[subprocess.Popen], n_runs: int) -> None:
    """After `n_runs` finished runs: one more batch, malformed, is rejected with reasons and changes nothing."""
    lock_before = (project / "dvc.lock").read_bytes()
    manifest_before = (project / "models/export/lineage.json").read_bytes()
    bad = staging / "broken-batch.jsonl"
    bad.write_text("\n".join(["{not json"] * 8 + ['{"prompt": "p", "response_a": "x"}'] * 4) + "\n")
    bad.rename(drop / bad.name)
    runs = wait_for("the malformed batch's run", lambda: finished_runs(api, n_runs + 1), 120, procs, every_s=2)
    (rejected_run,) = [r for r in runs if r["parameters"]["batch_path"].endswith(bad.name)]
    assert rejected_run["state_type"] == "FAILED" and "rejected" in rejected_run["state"]["message"]
    rejected = json.loads((project / "reports/runs").glob(f"*-{bad.name}.json").__next__().read_text())
    assert rejected["outcome"] == "rejected" and rejected["reasons"]
    assert (project / "data/rejected" / bad.name).exists() and not (drop / bad.name).exists()
    assert (project / "dvc.lock").read_bytes() == lock_before
    assert (project / "models/export/lineage.json").read_bytes() == manifest_before
    assert bad.name not in {p.name for p in (project / "data/incoming").iterdir()}


@pytest.mark.slow
@pytest.mark.timeout(2400)  # four full rebuilds, one after another: ~8 min quiet, 15 on a busy 2-core box
def test_batches_arriving_in_a_burst_are_each_processed_once_one_run_at_a_time_on_a_real_server(tmp_path):
    """Four batches land in the watched folder at once; `rmpipe watch` announces them to a real Prefect server
    on 127.0.0.1 and `rmpipe serve` runs the real pipeline (`dvc repro`, tiny backbone) for each. Each batch is
    processed exactly once (one flow run, one accepted record, one model build that took it in), the runs never
    overlap (the deployment's ENQUEUE limit of 1), and the final export's lineage lists every batch. Then a
    malformed batch is rejected with reasons and changes nothing.
    Mutations tried: without the concurrency limits (`concurrency_limit=None` on the deployments and `limit=None`
    for the runner in `service.serve`) the runs overlap and this fails; the export stage dropping the last batch
    id from the lineage fails it too."""
    import psutil

    from rmpipe.audit import history

    project = fast_project(tmp_path / "project")
    drop, staging, logs = tmp_path / "drop", tmp_path / "staging", tmp_path / "logs"
    for folder in (drop, staging, logs):
        folder.mkdir()
    procs: list[subprocess.Popen] = []
    peak_rss = 0
    try:
        server, env = start_server(tmp_path, logs / "server.log", PREFECT_RUNNER_POLL_FREQUENCY="2",
                                   PREFECT_LOGGING_LEVEL="INFO", PYTHONUNBUFFERED="1")
        procs.append(server)
        api = env["PREFECT_API_URL"]
        batches = burst_batches(project, staging, env)
        names = sorted(b.name for b in batches)
        serve = start([PY, "-m", "pipeline.cli", "serve"], project, env, logs / "serve.log")
        procs.append(serve)
        wait_for("the served deployment", lambda: "being served" in (logs / "serve.log").read_text(), 120, procs)
        procs.append(start([PY, "-m", "pipeline.cli", "watch", str(drop), "--interval", "1"], project, env,
                           logs / "watch.log"))

        for batch in batches:  # all arrive at once (rename: each file appears complete)
            batch.rename(drop / batch.name)

        def all_done():
            nonlocal peak_rss
            with contextlib.suppress(psutil.Error):  # what the service holds while runs wait and run
                tree = [psutil.Process(serve.pid), *psutil.Process(serve.pid).children(recursive=True)]
                peak_rss = max(peak_rss, sum(p.memory_info().rss for p in tree))
            return finished_runs(api, BURST)

        runs = wait_for(f"{BURST} on-new-batch runs to finish", all_done, 300 * BURST, procs, every_s=3)
        assert all(r["state_type"] == "COMPLETED" for r in runs), [r["state"]["message"] for r in runs]
        # exactly once: one run per batch, one accepted record each, admitted once, in data/incoming once
        assert sorted(Path(r["parameters"]["batch_path"]).name for r in runs) == names
        summaries = [json.loads(p.read_text()) for p in sorted((project / "reports/runs").glob("*.json"))]
        assert sorted(s["batch_id"] for s in summaries) == names
        assert [s["outcome"] for s in summaries] == ["accepted"] * BURST
        admissions = {tuple(s["admitted_with"]) for s in summaries}
        assert sorted(b for group in admissions for b in group) == names
        assert all(s["batch_id"] in s["promotion"]["batch_ids"] for s in summaries)
        assert sorted(p.name for p in (project / "data/incoming").iterdir()) == names
        assert not [p for p in (project / ".rmpipe/queue").iterdir() if not p.name.startswith(".")]
        # one at a time: each run ended before the next began
        ordered = sorted(runs, key=lambda r: r["start_time"])
        assert all(a["end_time"] <= b["start_time"] for a, b in zip(ordered, ordered[1:])), "runs overlapped"
        # one model build per run, each taking in exactly the batch that triggered it
        built = history.read(project)
        assert [r["trigger"] for r in built] == [f"on-new-batch {Path(r['parameters']['batch_path']).name}"
                                                 for r in ordered]
        taken = [set(r["batches"]) for r in built]
        assert [len(t) for t in taken] == list(range(1, BURST + 1))
        assert all(a < b for a, b in zip(taken, taken[1:]))
        # the final model's lineage lists every batch (and nothing else)
        manifest = json.loads((project / "models/export/lineage.json").read_text())
        assert {b for ids in manifest["batch_ids"].values() for b in ids} == set(names)
        assert peak_rss < 3 * 2**30, peak_rss  # the service, its flow run and its stages

        assert_a_malformed_batch_is_rejected_and_changes_nothing(project, staging, drop, api, procs, BURST)
    finally:
        for proc in reversed(procs):
            stop(proc)
        for log in sorted(logs.glob("*.log")):  # shown by pytest only when the test fails
            print(f"----- {log.name}\n{log.read_text()[-60000:]}")


@pytest.mark.slow
def test_a_rejected_batch_and_a_stopped_service_log_one_clear_line_each(tmp_path):
    """On a real server: a served run that rejects a batch logs its reason, not Prefect's traceback of it,
    and `rmpipe serve` stopped with SIGTERM shuts down like Ctrl-C (no un-awaited coroutine)."""
    from test_flows import batch_project, vote_lines

    project = batch_project(tmp_path)  # the real check and registration, a seconds-long rebuild
    server, env = start_server(tmp_path, tmp_path / "server.log", PREFECT_RUNNER_POLL_FREQUENCY="2",
                               PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    api = env["PREFECT_API_URL"]
    procs = [server]
    try:
        serve = start([PY, "-m", "pipeline.cli", "serve"], project, env, tmp_path / "serve.log")
        procs.append(serve)
        wait_for("rmpipe serve", lambda: "on-new-batch" in (tmp_path / "serve.log").read_text(), 150, procs)
        bad = tmp_path / "b-bad.jsonl"
        bad.write_text("{not json\n" * 6 + vote_lines(2))
        subprocess.run([PY, "-c", f"from pathlib import Path; from pipeline.service import announce_batch; "
                                  f"announce_batch(Path({str(bad)!r}))"], env=env, check=True, timeout=120)
        (run,) = wait_for("the rejected run", lambda: [r for r in flow_runs(api, "on-new-batch")
                                                       if r["state_type"] in ("FAILED", "CRASHED", "COMPLETED")],
                          240, procs)
        assert run["state_type"] == "FAILED"
        wait_for("the run's last log line", lambda: "Finished in state Failed" in (tmp_path / "serve.log").read_text(),
                 60, procs)
        time.sleep(3)  # the engine's own exit logging comes after the state change
        os.killpg(serve.pid, signal.SIGTERM)
        assert serve.wait(timeout=60) == 0
    finally:
        for proc in procs:
            stop(proc)
    log = (tmp_path / "serve.log").read_text()
    assert "batch b-bad.jsonl rejected" in log and "line is not valid JSON" in log
    assert "Traceback" not in log and "Engine execution exited" not in log
    assert "never awaited" not in log and "shutting down" in log


def test_the_readmes_server_command_sends_no_telemetry_and_listens_locally():
    (line,) = [line for line in (ROOT / "README.md").read_text().splitlines()
               if "prefect server start" in line and not line.lstrip().startswith("#")]
    assert "PREFECT_SERVER_ANALYTICS_ENABLED=false" in line and "--host 127.0.0.1" in line


def test_serve_stops_promptly_on_ctrl_c_and_sigterm_even_when_the_server_is_gone(tmp_path):
    """After a server outage, stopping `rmpipe serve` used to hang (`Pausing all deployments`) until kill -9."""
    import psutil

    project = fast_project(tmp_path / "project")
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            server, env = start_server(tmp_path, logs / f"server-{signum}.log", PREFECT_RUNNER_POLL_FREQUENCY="2",
                                       PYTHONUNBUFFERED="1")
            procs.append(server)
            log = logs / f"serve-{signum}.log"
            serve = start([PY, "-m", "pipeline.cli", "serve"], project, env, log)
            procs.append(serve)
            wait_for("the served deployments", lambda: "being served" in log.read_text(), 120, [serve])
            children = psutil.Process(serve.pid).children(recursive=True)
            stop(server)  # the outage
            serve.send_signal(signum)  # to serve alone, as Ctrl-C in its terminal or `kill PID` would
            try:
                serve.wait(timeout=60)  # a hang, not a speed: the grace period is 10 s
            except subprocess.TimeoutExpired:
                pytest.fail(f"rmpipe serve did not stop on {signal.Signals(signum).name} with the server gone")
            _, alive = psutil.wait_procs(children, timeout=30)
            assert not alive, [" ".join(p.cmdline())[:160] for p in alive]
    finally:
        for proc in reversed(procs):
            stop(proc)
        for log in sorted(logs.glob("*.log")):
            print(f"----- {log.name}\n{log.read_text()[-20000:]}")
