"""The audit trail end to end under real DVC, a real Prefect server and real stages.

One project is built once (module fixture) and taken through what an auditor does:
a vendor batch arrives through on-new-batch, `trace` finds the model it reached and the
pairs it decided, `retract` takes it out (and an annotator), a re-delivery is refused,
a plain `dvc repro` records too, `--purge` wipes it from the DVC cache, and `rmpipe
report` writes the page. Each test checks one promise against what the fixture saw.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from browser import page_dom
from test_dvc_pipeline import BIN, FAST_PARAMS, ROOT, copy_project, ran_stages, run

from rmpipe.core.paths import ProjectPaths, read_splits

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600),  # one fixture builds four models
              pytest.mark.prefect_server]  # its five flow commands talk to one server, not five ephemeral ones

VENDOR = "vendor-2026-11-03.jsonl"
MARKER = "Zyxquollian"  # appears only in the vendor batch: its trace in the DVC cache is searchable
# Gates loose enough that the tiny model passes: promotion (and demotion by a retraction) happen.
PARAMS = {**FAST_PARAMS, ("sample_data", "n_pairs"): 400, ("sample_data", "pair_rows"): 30,
          ("evaluate", "min_accuracy"): 0.5, ("evaluate", "max_battery_failures"): 12}


def _sample_votes(incoming: Path) -> pd.DataFrame:
    frames = [pd.read_json(p, lines=True) for p in incoming.glob("*.jsonl")] + \
             [pd.read_csv(p) for p in incoming.glob("*.csv")]
    votes = pd.concat(frames, ignore_index=True)
    return votes[votes["prompt"].map(lambda p: isinstance(p, str) and not p.startswith("["))]


def write_vendor_batch(incoming: Path, dest: Path) -> dict:
    """A batch that decides known pairs: 12 new pairs only it votes on (they drop out without it), and
    8 sample pairs with 3 unanimous votes that its 4 opposite votes flip."""
    votes = _sample_votes(incoming)
    votes = votes.assign(winner=votes.apply(lambda r: r.response_a if r.choice == "a" else
                                            (r.response_b if r.choice == "b" else None), axis=1),
                         key=votes.apply(lambda r: (r.prompt, frozenset((r.response_a, r.response_b))), axis=1))
    flips = []
    for key, group in votes.groupby("key", sort=True):
        if len(group) == 3 and group["winner"].notna().all() and group["winner"].nunique() == 1:
            prompt, pair = key
            winner = group["winner"].iloc[0]
            flips.append({"prompt": prompt, "winner": winner, "loser": next(iter(pair - {winner}))})
        if len(flips) == 8:
            break
    assert len(flips) == 8, "the sample has too few unanimous 3-vote pairs for this test"
    rows = []
    for f in flips:
        for ann in ("vendor-a", "vendor-b", "vendor-c", "vendor-d"):
            rows.append({"prompt": f["prompt"], "response_a": f["loser"], "response_b": f["winner"],
                         "annotator_id": ann, "choice": "a"})
    new = []
    for i in range(12):
        prompt = f"{MARKER} question {i}: how do I keep a sourdough starter alive while travelling for {i + 2} days?"
        good = (f"Feed it, then refrigerate it: a cold starter slows down and survives {i + 2} days. "
                "Take it out a day before baking and feed it twice." + (" It will bubble again." if i % 2 else ""))
        bad = "Just leave it on the counter, it will be fine." + (" Probably. Maybe add flour later." if i % 2 == 0 else "")
        new.append({"prompt": prompt, "chosen": good, "rejected": bad})
        for ann in ("vendor-a", "vendor-b"):
            rows.append({"prompt": prompt, "response_a": good, "response_b": bad, "annotator_id": ann, "choice": "a"})
    dest.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_json(dest, orient="records", lines=True)
    return {"flips": flips, "new": new}


def expected_decided(train: pd.DataFrame, vendor: dict) -> set[str]:
    from rmpipe.core.schema import canonical_prompt  # how the splits store a prompt

    new_prompts = {canonical_prompt(n["prompt"]) for n in vendor["new"]}
    flip_keys = {(canonical_prompt(f["prompt"]), frozenset((f["winner"], f["loser"]))) for f in vendor["flips"]}
    keys = zip(train["prompt"], train["chosen"], train["rejected"], train["pair_id"])
    return {pid for prompt, c, r, pid in keys if prompt in new_prompts or (prompt, frozenset((c, r))) in flip_keys}


def chain_records(proj: Path) -> list[dict]:
    """Every record of the project's history chain (models, retractions, outcomes), oldest first."""
    from rmpipe.audit import history

    return history.records(proj)


def cache_holds(proj: Path, marker: str, folder: str = ".dvc/cache") -> list[str]:
    """Files under `folder` whose bytes, or whose parquet text cells, contain `marker`."""
    found = []
    for path in (proj / folder).rglob("*"):
        if not path.is_file() or {".git", "tests"} & set(path.relative_to(proj).parts):  # tests/ holds the marker
            continue
        data = path.read_bytes()
        if marker.encode() in data:
            found.append(str(path))
        elif data[:4] == b"PAR1":
            table = pq.read_table(path)
            for column in table.column_names:
                values = table.column(column).to_pylist()
                if any(marker in str(v) for v in values if v is not None):
                    found.append(f"{path}:{column}")
                    break
    return found


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    """The whole scenario, once; every step's output is kept for the tests."""
    tmp = tmp_path_factory.mktemp("audit")
    proj = copy_project(tmp / "proj", PARAMS)
    shutil.rmtree(proj / "audit", ignore_errors=True)  # a working copy's own audit trail is not this project's
    (proj / "audit").mkdir()
    shutil.copy(ROOT / "audit/retractions.jsonl", proj / "audit/retractions.jsonl")  # the header alone
    run(["git", "init", "-q"], proj)
    run(["git", "add", "-A"], proj)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qm", "init"], proj)
    run([str(BIN / "rmpipe"), "sample-data"], proj)
    delivery = tmp / "delivery" / VENDOR
    vendor = write_vendor_batch(proj / "data/incoming", delivery)
    seen: dict = {"proj": proj, "vendor": vendor, "history": [], "head": run(["git", "rev-parse", "HEAD"], proj).stdout}
    from rmpipe.audit import registry

    def snap(step: str) -> None:
        seen["history"].append((step, chain_records(proj)))

    rm, dvc = str(BIN / "rmpipe"), str(BIN / "dvc")
    # 1. the vendor batch arrives through the on-new-batch flow: the first build
    seen["delivered"] = run([rm, "on-new-batch", str(delivery)], proj)
    snap("on-new-batch")
    seen["versions_after_delivery"] = registry.versions(proj)
    seen["noop"] = run([dvc, "repro"], proj)
    snap("no-op dvc repro")
    seen["train_with_vendor"] = read_splits(ProjectPaths.at(proj), ("train",))["train"]  # the split's parts
    seen["trace_batch"] = json.loads(run([rm, "trace", "--batch", VENDOR, "--json"], proj).stdout)
    seen["trace_batch_run"] = run([rm, "trace", "--batch", VENDOR], proj)
    seen["trace_batch_text"] = seen["trace_batch_run"].stdout
    seen["trace_typos"] = [run([rm, "trace", flag, name], proj, check=False)
                           for flag, name in (("--batch", VENDOR.replace(".jsonl", ".json")), ("--annotator", "vendor-aa"))]
    seen["trace_vendor_a"] = json.loads(run([rm, "trace", "--annotator", "vendor-a", "--json"], proj).stdout)

    # 2. retract it; a re-delivery and a copy put back into data/incoming are refused
    retracted = run([rm, "retract", "--batch", VENDOR, "--reason", "mislabeled by the vendor", "--by", "audit-team",
                     "--json"], proj)
    seen["retract_batch"], seen["retract_batch_log"] = json.loads(retracted.stdout), retracted.stderr
    snap("retract batch")
    seen["versions_after_batch"] = registry.versions(proj)
    seen["lineage_after_batch"] = json.loads((proj / "models/export/lineage.json").read_text())
    seen["head_after_batch"] = run(["git", "log", "-1", "--format=%s"], proj).stdout.strip()
    again = tmp / "again" / "vendor-resent.jsonl"
    again.parent.mkdir()
    shutil.copy(delivery, again)
    seen["redelivered"] = run([rm, "on-new-batch", str(again)], proj, check=False)
    shutil.copy(delivery, proj / "data/incoming" / "vendor-copy.jsonl")
    seen["put_back"] = run([dvc, "repro", "collect"], proj, check=False)
    (proj / "data/incoming" / "vendor-copy.jsonl").unlink()
    run([dvc, "repro", "collect"], proj)

    # 3. retract an annotator (through params), 4. a plain `dvc repro` after a param change
    params_file = proj / "params.yaml"  # copy_project wrote it without comments: give it one to keep
    params_file.write_text(params_file.read_text().replace("aggregate:\n", "aggregate:  # votes -> pairs\n", 1))
    run(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qam", "params comment"], proj)
    seen["retract_annotator"] = json.loads(run([rm, "retract", "--annotator", "ann-11", "--reason", "spam votes",
                                                "--json"], proj).stdout)
    snap("retract annotator")
    seen["lineage_after_annotator"] = json.loads((proj / "models/export/lineage.json").read_text())
    seen["versions_after_annotator"] = registry.versions(proj)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    seen["params_after_annotator"] = params
    seen["params_text_after_annotator"] = (proj / "params.yaml").read_text()
    seen["annotators_after"] = json.loads((proj / "reports/annotators.json").read_text())
    params["evaluate"]["batch_size"] = 8
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    seen["plain_repro"] = run([dvc, "repro"], proj)
    snap("dvc repro")
    seen["trace_ann"] = json.loads(run([rm, "trace", "--annotator", "ann-11", "--json"], proj).stdout)

    # 5. purge the retracted batch; the pipeline stays up to date
    seen["cache_before_purge"] = cache_holds(proj, MARKER)
    seen["purge"] = json.loads(run([rm, "retract", "--batch", VENDOR, "--reason", "deletion request", "--purge",
                                    "--json"], proj).stdout)
    seen["cache_after_purge"] = cache_holds(proj, MARKER)
    seen["project_after_purge"] = cache_holds(proj, MARKER, ".")
    seen["repro_after_purge"] = run([dvc, "repro"], proj)
    seen["trace_after_purge"] = json.loads(run([rm, "trace", "--batch", VENDOR, "--json"], proj).stdout)
    snap("purge")
    seen["verify_history"] = run([rm, "history", "--verify"], proj, check=False)
    seen["versions_at_end"] = registry.versions(proj)
    seen["gto_show"] = json.loads(run([str(BIN / "gto"), "show", "reward-model", "--json"], proj).stdout)
    return seen


def records(proj: Path) -> list[dict]:
    return [r for r in chain_records(proj) if r["kind"] == "model"]


def test_every_kind_of_rebuild_appends_one_record_and_none_is_rewritten(audit):
    triggers = [r["trigger"] for r in records(audit["proj"])]
    assert triggers[0] == f"on-new-batch {VENDOR}"
    assert triggers[1].startswith(f"rmpipe retract batch {VENDOR} (R1)")
    assert triggers[2].startswith("rmpipe retract annotator ann-11 (R2)")
    assert triggers[3] == "dvc repro"
    assert len(triggers) == 4  # the no-op repro, the refused deliveries and the purge built nothing
    assert ran_stages(audit["noop"]) == [] and ran_stages(audit["repro_after_purge"]) == []
    steps = audit["history"]
    for (_, before), (step, after) in zip(steps, steps[1:]):
        assert after[:len(before)] == before, f"{step} rewrote earlier history"
    # one chain: models, and each retraction before its rebuild with its outcome after; numbers unique
    kinds = [(r["seq"], r["kind"]) for r in chain_records(audit["proj"])]
    assert kinds == list(enumerate(["model", "retraction", "model", "retraction-outcome", "retraction", "model",
                                    "retraction-outcome", "model", "retraction-outcome"], 1))
    assert audit["verify_history"].returncode == 0, audit["verify_history"].stderr
    assert "ok: 9 record(s) in git ref refs/rmpipe/audit" in audit["verify_history"].stdout
    first = records(audit["proj"])[0]
    assert first["batches"][VENDOR]["sha256"] == audit["purge"]["purge"]["sha256"]
    assert first["annotators"]["vendor-a"]["votes"] == 20
    assert first["git"]["commit"] and first["model"]["md5"].endswith(".dir")


def stages_of(versions: list[dict]) -> list[tuple[str, list[str], bool]]:
    return [(v["version"], v["stages"], v["deprecated"]) for v in versions]


def test_service_built_models_are_versions_with_stages_and_retractions_deprecate_them(audit):
    """The delivery (on-new-batch) and each retraction's rebuild made a GTO version, prod when the gate promoted
    it; a retraction deprecated the versions built with what it took out; the user's branch never moved."""
    proj = audit["proj"]
    assert stages_of(audit["versions_after_delivery"]) == [("v0.0.1", ["prod"], False)]
    first = audit["versions_after_delivery"][0]["body"]
    assert first["trigger"] == f"on-new-batch {VENDOR}" and VENDOR in first["batches"]
    assert first["gate"]["promoted"] and first["metrics"]["accuracy"] > 0.5
    assert first["manifest_sha256"] == records(proj)[0]["model"]["manifest_sha256"]
    # R1 took the vendor batch out: v0.0.1 (built with it) deprecated, the rebuilt model judged alone, in prod
    assert stages_of(audit["versions_after_batch"]) == [("v0.0.1", [], True), ("v0.0.2", ["prod"], False)]
    assert audit["retract_batch"]["deprecated"] == ["reward-model@v0.0.1!"]
    # R2 took ann-11 out: v0.0.2 used their votes
    assert stages_of(audit["versions_after_annotator"]) == [("v0.0.1", [], True), ("v0.0.2", [], True),
                                                            ("v0.0.3", ["prod"], False)]
    assert stages_of(audit["versions_at_end"]) == stages_of(audit["versions_after_annotator"])  # plain repro: none
    assert [v["version"] for v in audit["gto_show"] if v["stages"]] == ["v0.0.3"]  # what `gto show` says
    # versions live on rmpipe/models: the user's branch moved only by `rmpipe retract`'s commits of its own register
    # (and the params it edited), which keep the retraction's model clean (tests/test_lineage.py)
    head = audit["head"].strip()
    log = [line.split("\t", 1) for line in run(["git", "log", "--format=%H%x09%s", f"{head}..HEAD"], proj).stdout.splitlines()]
    own = [sha for sha, subject in log if subject != "params comment"]  # the scenario's own commit (step 4)
    assert len(own) >= 2 and all(subject.startswith("rmpipe retract ") for sha, subject in log if sha in own), log
    for sha in own:
        assert set(run(["git", "show", "--name-only", "--format=", sha], proj).stdout.split()) <= {
            "audit/retractions.jsonl", "params.yaml"}
    assert run(["git", "symbolic-ref", "--short", "HEAD"], proj).stdout.strip() != "rmpipe/models"
    tips = run(["git", "log", "--format=%s", "rmpipe/models"], proj).stdout
    assert tips.count("reward-model: model") == 3
    # a deprecated version never shows as promoted: trace reads the registry
    assert [(m["version"], m["promoted"], m["deprecated"]) for m in audit["trace_ann"]["models"]] == [
        ("v0.0.1", False, True), ("v0.0.2", False, True)]


def test_the_audit_page_shows_stages_from_the_registry(audit, tmp_path):
    import re

    from rmpipe.audit.report import build_report

    page = build_report(audit["proj"], tmp_path / "audit.html")
    rows = re.findall(r"<tr><td>(\d+)</td>.*?</tr>", re.search(r'<table class="history">.*?</table>', page, re.S).group(0))
    assert rows == [str(r["seq"]) for r in records(audit["proj"])] and len(rows) == 4  # the models' chain numbers
    table = re.search(r'<table class="history">.*?</table>', page, re.S).group(0)
    assert table.count(">deprecated<") == 2 and table.count(">prod<") == 1
    assert "v0.0.3 (model" in page  # in prod now
    assert "reward-model@v0.0.1!" in re.search(r'<table class="retractions">.*?</table>', page, re.S).group(0)


def test_trace_finds_the_one_model_a_batch_reached_and_the_pairs_it_decided(audit):
    trace = audit["trace_batch"]
    assert [m["seq"] for m in trace["models"]] == [1]
    model = trace["models"][0]
    expected = expected_decided(audit["train_with_vendor"], audit["vendor"])
    assert len(expected) >= 10
    assert set(model["decided_pair_ids"]) == expected
    assert model["contributed"] == len(expected)  # it voted on nothing else
    assert model["votes"] == 8 * 4 + 12 * 2
    assert model["current_export"] is True and model["promoted"] is True and trace["n_promoted"] == 1
    assert model["version"] == "v0.0.1" and model["stages"] == ["prod"] and trace["registry"] == "gto"
    assert "reached 1 of 1 recorded models" in audit["trace_batch_text"]
    # One of its annotators decided the same pairs: without vendor-a a flipped pair ties 3-3, a new pair has 1 vote.
    assert set(audit["trace_vendor_a"]["models"][0]["decided_pair_ids"]) == expected


def test_retracting_a_batch_rebuilds_without_it_and_records_why(audit):
    proj, outcome = audit["proj"], audit["retract_batch"]
    assert VENDOR not in {b for ids in audit["lineage_after_batch"]["batch_ids"].values() for b in ids}
    assert (proj / "data/retracted" / VENDOR).exists() is False  # purged at the end; the record stays:
    kept = json.loads((proj / "data/retracted" / f"{VENDOR}.retraction.json").read_text())
    assert kept["reason"] == "mislabeled by the vendor" and kept["by"] == "audit-team"
    assert outcome["before"]["seq"] == 1 and outcome["after"]["seq"] == 3  # #2 is the retraction itself
    assert VENDOR in outcome["before"]["batches"] and VENDOR not in outcome["after"]["batches"]
    assert "accuracy" in outcome["after"]["metrics"] and "promoted" in outcome["promotion"]
    # the promoted model was trained on the batch: it stops being the yardstick, the rebuilt one is judged alone
    assert outcome["demoted"]["seq"] == 1
    assert outcome["promotion"]["reason"].startswith("passed; no previously promoted model")
    assert json.loads((proj / "audit/retractions/R1.json").read_text())["retraction"]["reason"] == "mislabeled by the vendor"


def test_a_model_a_retraction_built_is_not_dirty_by_what_rmpipe_wrote(audit):
    """rmpipe retract commits the register (and the params it edited) before it rebuilds: the rebuilt
    models name that commit, clean. Mutation tried: not committing leaves the annotator's model dirty
    (params.yaml)."""
    for key in ("lineage_after_batch", "lineage_after_annotator"):
        git = audit[key]["git"]
        assert git["dirty"] is False and not git.get("own_changed"), (key, git)
    assert audit["head_after_batch"].startswith(f"rmpipe retract R1: batch {VENDOR}")
    committed = run(["git", "show", "--name-only", "--format=", "HEAD"], audit["proj"]).stdout.split()
    assert committed == ["audit/retractions.jsonl", "params.yaml"]  # the annotator's retraction, last commit


def test_a_retracted_batch_is_refused_on_redelivery_and_in_data_incoming(audit):
    redelivered = audit["redelivered"]
    assert redelivered.returncode != 0
    assert "retracted" in redelivered.stderr and "mislabeled by the vendor" in redelivered.stderr
    assert "Traceback" not in redelivered.stderr
    put_back = audit["put_back"]
    assert put_back.returncode != 0
    assert "mislabeled by the vendor" in put_back.stdout + put_back.stderr


def test_retracting_an_annotator_goes_through_params_and_rebuilds(audit):
    assert audit["params_after_annotator"]["aggregate"]["exclude_annotators"] == ["ann-11"]
    assert "aggregate:  # votes -> pairs" in audit["params_text_after_annotator"]  # comments kept (round-trip YAML)
    assert audit["annotators_after"]["excluded_annotators"] == ["ann-11"]
    outcome = audit["retract_annotator"]
    assert outcome["removed"]["annotator"] == "ann-11" and outcome["after"]["seq"] == 6
    # trace: the models built before the retraction used ann-11's votes; the ones after do not
    assert [m["seq"] for m in audit["trace_ann"]["models"]] == [1, 3]


def test_trace_of_a_name_no_model_used_fails_naming_the_closest_known_ones(audit):
    """A typo is not "reached 0 models": non-zero, one line, the closest recorded names in it."""
    batch_typo, annotator_typo = audit["trace_typos"]
    for proc, closest in ((batch_typo, VENDOR), (annotator_typo, "vendor-a")):
        assert proc.returncode != 0 and proc.stdout == "" and "Traceback" not in proc.stderr
        (line,) = proc.stderr.strip().splitlines()
        assert line.startswith("error: ") and "no recorded model used it" in line and closest in line, line
    # the re-aggregation trace runs per model is its own business: none of its log lines reach the user
    assert "rmpipe.aggregate" not in audit["trace_batch_run"].stderr
    # (no Prefect doc link in a CLI flow's output: checked where the ephemeral server really starts,
    # tests/test_repro_guarantees.py; this module's flows run on the session's shared server)
    assert "docs.prefect.io" not in audit["retract_batch_log"]


def test_purge_leaves_no_trace_of_the_batch_in_the_dvc_cache(audit):
    assert audit["cache_before_purge"], "the marker should be findable in the cache before the purge"
    assert audit["cache_after_purge"] == []
    assert audit["project_after_purge"] == []  # nor anywhere in the workspace (the refused re-delivery went too)
    purge = audit["purge"]["purge"]
    assert purge["file_removed"] and purge["cache_objects_removed"]
    # data/incoming is a dep (DVC caches no copy of it): what held the content are the outputs built from it
    assert purge["sha256"] == records(audit["proj"])[0]["batches"][VENDOR]["sha256"]
    assert purge["models_affected"] == [audit["trace_batch"]["models"][0]["model"]]
    assert purge["copies_removed"] == ["data/rejected/vendor-resent.jsonl"]
    # the models built with it are still listed, without their (purged) pairs
    models = audit["trace_after_purge"]["models"]
    assert [m["seq"] for m in models] == [1] and models[0]["decided"] is None


# --- pages in a real browser, network off -----------------------------------------------------------
def shot(tmp: Path, name: str) -> Path:
    """Where a screenshot goes: $RMPIPE_SCREENSHOTS (to look at them) or the test's temp folder."""
    import os

    folder = Path(os.environ.get("RMPIPE_SCREENSHOTS") or tmp)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


@pytest.fixture(scope="module")
def report_page(audit, tmp_path_factory):
    proj = audit["proj"]
    run([str(BIN / "dvc"), "plots", "show"], proj)  # dvc_plots/index.html: the page links to it once it exists
    out = run([str(BIN / "rmpipe"), "report"], proj).stdout.strip()
    tmp = tmp_path_factory.mktemp("report")
    path = Path(out if Path(out).is_absolute() else proj / out)
    return path, page_dom(path.as_uri(), tmp, shot(tmp, "audit.png"))


def test_the_audit_report_renders_offline_with_its_graph_plots_history_and_retractions(report_page, audit):
    import re

    from rmpipe.audit.offline import external_resources

    path, dom = report_page
    html_text = path.read_text()
    assert external_resources(html_text) == [] and "<script" not in html_text
    assert "Reward model audit report" in dom
    graph = re.search(r'<svg id="lineage-graph".*?</svg>', dom, re.S).group(0)
    assert graph.count('class="batch"') == 3 and graph.count('class="batch retracted"') == 1 and VENDOR in graph
    assert graph.count('class="stage"') == 9 and 'class="model"' in graph
    assert re.search(r'<svg id="accuracy-chart".*?</svg>', dom, re.S).group(0).count("<circle") == 4
    histogram = re.search(r'<svg id="reward-histogram".*?</svg>', dom, re.DOTALL).group(0)
    assert histogram.count('class="bar"') > 10 and histogram.count('class="legend"') == 2
    assert "chosen responses" in histogram and "reward (bin centre)" in histogram and ">responses<" in histogram
    validation = re.search(r"<h2 id=.validation.>.*?</p>", dom, re.DOTALL).group(0)
    assert re.search(r"rows checked: train [\d,]+ pairs, val [\d,]+ pairs, test [\d,]+ pairs", validation), validation
    history_rows = re.search(r'<table class="history">.*?</table>', dom, re.S).group(0).count("<tr>") - 1
    assert history_rows == 4
    retractions = re.search(r'<table class="retractions">.*?</table>', dom, re.S).group(0)
    assert "mislabeled by the vendor" in retractions and "ann-11" in retractions and "purged" in retractions
    assert "ann-11" in re.search(r'<table class="annotators">.*?</table>', dom, re.S).group(0)
    links = re.findall(r'href="([^"#][^"]*)"', html_text)
    assert len(links) >= 5  # model card, lineage, retractions, data docs, DVC plots (the history is a git ref)
    assert "../dvc_plots/index.html" in links
    for link in links:
        assert (path.parent / link).exists(), f"broken link {link}"


def test_the_dvc_plots_page_renders_offline(audit, tmp_path):
    proj = audit["proj"]
    run([str(BIN / "dvc"), "plots", "show", "-o", str(tmp_path / "plots")], proj)
    page = tmp_path / "plots" / "index.html"
    assert "cdn.jsdelivr" not in page.read_text()
    dom = page_dom(page.as_uri(), tmp_path, shot(tmp_path, "plots.png"))
    n_plots = dom.count('class="vega-embed')
    assert n_plots == len(yaml.safe_load((proj / "dvc.yaml").read_text())["plots"])  # each declared plot, no other
    spec = json.loads(run([str(BIN / "dvc"), "plots", "show", "--json"], proj).stdout)["data"]
    for plot_id, (entry, *_) in spec.items():  # a title a person reads (not a file path) and both axes named
        content = entry["content"]
        assert "/" not in plot_id and content["title"]["text"][0].isupper(), plot_id
        y_titles = [part.get("encoding", {}).get("y", {}).get("title") for part in [content, *content.get("layer", [])]]
        assert content["encoding"]["x"]["title"] and any(y_titles), plot_id  # a line chart's y sits in its layers
    assert dom.count('<canvas') == n_plots  # vega-embed drew every plot (a failed load leaves an empty div)


def test_the_data_docs_render_offline_with_filled_validation_tables(audit, tmp_path):
    from rmpipe.audit.offline import external_resources

    site = audit["proj"] / "reports/data_docs"
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 5
    for page in pages:
        assert external_resources(page.read_text()) == [], page
    validation = next(p for p in pages if "validations" in p.parts and "train_schema" in str(p))
    dom = page_dom(validation.as_uri(), tmp_path, shot(tmp_path, "data_docs.png"))
    assert dom.count("data-index=") > 10  # bootstrap-table filled the tables from the page's data
    index = page_dom((site / "index.html").as_uri(), tmp_path)
    assert index.count("data-index=") > 0
