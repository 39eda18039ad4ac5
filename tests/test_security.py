"""Security (issue #7): weights only from safetensors, no remote code by default, servers on loopback,
no secret or environment value in outputs or logs.

Each test drives the real loaders / stages / Prefect on files built to be dangerous: a pickle that
would run code when unpickled, a config whose `auto_map` points at code that would run at import.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from rmpipe.model.backbones import build_tiny_backbone, check_backbone, load_backbone
from rmpipe.core.errors import UserError
from rmpipe.core.settings import ModelSettings

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CODE_DIRS = ("rmpipe", "stages", "pipeline")
TINY_CFG = {"max_length": 32, "tiny": {"vocab_size": 300, "hidden_size": 16, "intermediate_size": 32,
                                       "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                       "seed": 0}}
SECRET = "rmpipe-fake-secret-7f3a9c"


class _Exploit:
    """Unpickling this creates `marker`: proof that a loader ran code from a weights file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    return build_tiny_backbone(["hello world", "a reward model"] * 20, ModelSettings.from_section(TINY_CFG), tmp_path_factory.mktemp("bb") / "bb")


def _pickled_copy(folder: Path, dest: Path, exploit_marker: Path | None = None) -> Path:
    """`folder` with its model.safetensors replaced by a pytorch_model.bin (a plain pickle of the same
    tensors, or an exploit when `exploit_marker` is given)."""
    from safetensors.torch import load_file

    shutil.copytree(folder, dest)
    weights = dest / "model.safetensors"
    if exploit_marker:
        with (dest / "pytorch_model.bin").open("wb") as fh:
            pickle.dump(_Exploit(exploit_marker), fh)
    else:  # the same tensors, as torch.save writes them: what a pickle-accepting loader would take
        torch.save(load_file(str(weights)), dest / "pytorch_model.bin")
    weights.unlink()
    return dest


# --- weights: safetensors only ------------------------------------------------------------------

@pytest.mark.parametrize("exploit", [False, True], ids=["plain-pickle", "exploit-pickle"])
def test_backbone_weights_in_a_pickle_are_refused(backbone, tmp_path, exploit):
    marker = tmp_path / "pwned"
    folder = _pickled_copy(backbone, tmp_path / "pickled", marker if exploit else None)
    for lm_head in (False, True):  # the reward model's backbone, and the causal LM that samples
        with pytest.raises(UserError, match="could not load backbone"):
            load_backbone(folder, lm_head=lm_head)
    assert not marker.exists()


def test_reward_model_and_export_weights_in_a_pickle_are_refused(backbone, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from rmpipe.export.hf import load_exported
    from rmpipe.model.reward_model import BACKBONE_DIR, RewardModel

    model = RewardModel.from_backbone(AutoModel.from_pretrained(backbone), seed=0)
    saved = tmp_path / "rm"
    model.save_pretrained(saved)
    RewardModel.from_pretrained(saved)  # the safetensors folder loads
    shutil.move(saved / BACKBONE_DIR, tmp_path / "orig")
    _pickled_copy(tmp_path / "orig", saved / BACKBONE_DIR)
    with pytest.raises(OSError, match="safetensors"):
        RewardModel.from_pretrained(saved)

    export = tmp_path / "export"
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1)
    hf.save_pretrained(tmp_path / "export-safe")
    AutoTokenizer.from_pretrained(backbone).save_pretrained(tmp_path / "export-safe")
    load_exported(tmp_path / "export-safe")
    _pickled_copy(tmp_path / "export-safe", export)
    with pytest.raises(OSError, match="safetensors"):
        load_exported(export)


def _calls(tree: ast.AST, name: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name:
            yield node


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def test_no_pickle_loads_and_every_model_load_asks_for_safetensors():
    """Source check backing the tests above for loaders they do not reach (sampling, evaluate)."""
    problems = []
    for path in sorted(p for d in CODE_DIRS for p in (ROOT / d).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        where = path.relative_to(ROOT)
        for call in _calls(tree, "load"):
            if isinstance(call.func.value, ast.Name) and call.func.value.id in ("torch", "pickle"):
                only = _keyword(call, "weights_only")
                if call.func.value.id == "pickle" or not (isinstance(only, ast.Constant) and only.value is True):
                    problems.append(f"{where}:{call.lineno}: {call.func.value.id}.load without weights_only=True")
        for call in _calls(tree, "from_pretrained"):
            owner = ast.unparse(call.func.value)
            loads_weights = "Model" in owner and "Config" not in owner and "Tokenizer" not in owner
            safe = _keyword(call, "use_safetensors")
            if owner == "PeftModel":  # no use_safetensors in PEFT: the folder goes through the safetensors-only guard
                folder = call.args[1] if len(call.args) > 1 else _keyword(call, "model_id")
                safe = ast.Constant(isinstance(folder, ast.Call) and ast.unparse(folder.func) == "safetensors_adapter")
            if loads_weights and owner != "RewardModel" and not (isinstance(safe, ast.Constant) and safe.value is True):
                problems.append(f"{where}:{call.lineno}: {owner}.from_pretrained without use_safetensors=True")
            remote = _keyword(call, "trust_remote_code")
            if isinstance(remote, ast.Constant) and remote.value is True:
                problems.append(f"{where}:{call.lineno}: trust_remote_code=True hard-coded")
    assert problems == []


# --- remote code: off unless params turn it on ----------------------------------------------------

def test_remote_code_in_a_backbone_folder_runs_only_when_params_turn_it_on(backbone, tmp_path):
    import json

    marker = tmp_path / "remote-code-ran"
    code = (f"open({str(marker)!r}, 'w').close()\n"
            "from transformers import LlamaConfig, LlamaModel\n"
            "class EvilConfig(LlamaConfig):\n    model_type = 'evil-custom'\n"
            "class EvilModel(LlamaModel):\n    config_class = EvilConfig\n")
    folders = {}
    for model_type in ("llama", "evil-custom"):  # a known architecture, and one only the remote code defines
        folder = folders[model_type] = tmp_path / model_type
        shutil.copytree(backbone, folder)
        config = json.loads((folder / "config.json").read_text())
        config.update(model_type=model_type, auto_map={"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"})
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "evil.py").write_text(code)

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params["model"]["trust_remote_code"] is False  # the shipped default
    check_backbone(folders["llama"], params["model"]["trust_remote_code"])  # built-in class, auto_map ignored
    load_backbone(folders["llama"])  # the default argument is off too
    with pytest.raises(UserError):
        check_backbone(folders["evil-custom"], False)
    assert not marker.exists()
    check_backbone(folders["evil-custom"], True)  # the param is the one switch that runs it
    assert marker.exists()


REMOTE_CODE = """
import sys
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel
from transformers.modeling_layers import GenericForSequenceClassification

with open({marker!r}, "a") as fh:  # runs at import: the stage whose process executed this folder's code
    fh.write(sys.argv[0].rsplit("/", 1)[-1].removesuffix(".py") + "\\n")

class RemoteConfig(LlamaConfig):
    pass

class RemoteModel(LlamaModel):
    config_class = RemoteConfig

class RemoteForCausalLM(LlamaForCausalLM):
    config_class = RemoteConfig

class RemoteForSequenceClassification(GenericForSequenceClassification, LlamaPreTrainedModel):
    config_class = RemoteConfig

    def __init__(self, config):  # builds its own base model, as a remote-code architecture does
        LlamaPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = RemoteModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()
"""
BACKBONE_STAGES = ("backbone", "tokenize", "train", "evaluate", "export")


@pytest.mark.slow
@pytest.mark.parametrize("trust", [True, False], ids=["trusted", "default"])
def test_every_stage_that_loads_the_backbone_runs_its_code_only_when_params_say_so(tmp_path, trust):
    """A backbone folder whose config maps every Auto class to its own code (which records the stage that
    ran it), run through each stage that loads a backbone or the trained model built on it. With
    `model.trust_remote_code: true` every one of them runs that code, as training did; with the default,
    none does and the stages still work on the built-in architecture.
    Mutations tried: `load_checkpoint(MODEL_DIR)` without the setting in stages/evaluate.py (evaluate then
    scores with other code than training used), and `check_backbone(backbone_dir, False)` in
    stages/tokenize.py, each turn the trusted case red."""
    from test_evaluate import BATTERY, TINY_MODEL_CFG, WORDS, make_pairs

    marker = tmp_path / "remote-code-ran"
    corpus = [json.dumps(r) for r in BATTERY.read_text().splitlines()] + [" ".join(WORDS)] * 20
    folder = build_tiny_backbone(corpus, ModelSettings.from_section(TINY_MODEL_CFG), tmp_path / "remote-backbone")
    (folder / "remote.py").write_text(REMOTE_CODE.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "remote.RemoteConfig", "AutoModel": "remote.RemoteModel",
                          "AutoModelForCausalLM": "remote.RemoteForCausalLM",
                          "AutoModelForSequenceClassification": "remote.RemoteForSequenceClassification"}
    (folder / "config.json").write_text(json.dumps(config))

    project = tmp_path / "project"
    (project / "data/split").mkdir(parents=True)
    shutil.copy(BATTERY, project / "data/battery.jsonl")
    for name, n, seed in (("train", 24, 0), ("val", 8, 1), ("test", 8, 2)):
        make_pairs(n, seed).assign(split=name).to_parquet(project / f"data/split/{name}.parquet", index=False)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(backbone=str(folder), max_length=128, trust_remote_code=trust)
    params["train"].update(epochs=1, tokens_per_batch=2048, max_pairs_per_batch=8, checkpoint_every=1000)
    params["export"]["golden_pairs"] = 2
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_MODULES_CACHE": str(tmp_path / "hf-modules")}
    for stage in BACKBONE_STAGES:
        done = subprocess.run([PY, "-m", f"stages.{stage}"], cwd=project, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"{stage}: {done.stderr[-3000:]}"
    ran = marker.read_text().split() if marker.exists() else []
    assert sorted(set(ran)) == (sorted(BACKBONE_STAGES) if trust else [])
    assert (project / "models/export/lineage.json").exists()


# --- servers listen on loopback only ------------------------------------------------------------

def test_prefect_server_settings_bind_loopback_even_if_the_environment_says_otherwise(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PYTHONPATH=str(ROOT), PREFECT_SERVER_API_HOST="0.0.0.0")
    code = ("import pipeline.flows, prefect.settings as s; from pipeline.prefect_env import server_env;"
            "print(s.get_current_settings().server.api.host); print(server_env('h', 4300)['PREFECT_SERVER_API_HOST'])")
    out = subprocess.run([PY, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["127.0.0.1", "127.0.0.1"]


def _wait_for_listeners(proc: subprocess.Popen, timeout_s: float) -> set[tuple[str, int]]:
    from procnet import listening

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        found = listening(proc.pid)
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{proc.args} never listened (exit code {proc.poll()})")


@pytest.mark.slow
def test_a_live_prefect_server_listens_on_loopback_even_when_the_environment_asks_for_all(tmp_path, monkeypatch):
    """The user's environment says PREFECT_SERVER_API_HOST=0.0.0.0; a server started with rmpipe's server
    environment (no --host flag, so the environment decides) listens on loopback only, measured from
    /proc/net/tcp*. Port 0: the kernel picks a free port, read back from the same table (no race).
    Mutation tried: dropping PREFECT_SERVER_API_HOST from prefect_env._ALWAYS turns this red (0.0.0.0)."""
    import httpx

    from pipeline.prefect_env import server_env
    from procnet import LOOPBACK, listening

    monkeypatch.setenv("PREFECT_SERVER_API_HOST", "0.0.0.0")
    env = server_env(tmp_path / "prefect-home", 0)
    log = tmp_path / "server.log"
    proc = subprocess.Popen([PY, "-m", "prefect", "server", "start"], cwd=tmp_path, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        found = _wait_for_listeners(proc, 180)
        port = next(iter(found))[1]
        deadline = time.monotonic() + 120
        while True:  # measured while the server answers, not while it is still starting
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        found |= listening(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    assert {address for address, _ in found} <= LOOPBACK, found


EPHEMERAL_LISTENERS = """
import os
import pipeline.flows  # configures Prefect (ephemeral server, loopback) before Prefect reads its settings
from prefect import flow
from procnet import listening

@flow
def listeners():
    return sorted(listening(os.getpid()))

print("LISTEN", *[address for address, _ in listeners()])
"""


@pytest.mark.slow
def test_the_ephemeral_prefect_server_a_flow_starts_listens_on_loopback_only(tmp_path):
    """Mutation tried: as above (PREFECT_SERVER_API_HOST out of _ALWAYS) — but Prefect's ephemeral server
    binds 127.0.0.1 by itself, so this one stays green; the live-server test is the one that catches it."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text("{}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", RMPIPE_PROJECT=str(tmp_path),
               PREFECT_SERVER_API_HOST="0.0.0.0")
    out = subprocess.run([PY, "-c", EPHEMERAL_LISTENERS], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith("LISTEN"))
    addresses = line.split()[1:]
    assert addresses, "the flow ran without any server listening: nothing was checked"
    assert set(addresses) <= {"127.0.0.1", "::1"}, addresses


@pytest.mark.slow
def test_a_two_rank_training_run_listens_on_loopback_only(tmp_path):
    """Every listener of a live 2-rank gloo run (launcher, both ranks), sampled from /proc/net/tcp* while
    it trains. torch's TCP rendezvous store binds every interface ('::'), so a single-node run meets
    through a file store instead and gloo is pinned to `lo`.
    Mutation tried: relaunch without RMPIPE_RENDEZVOUS_DIR (back to the env:// TCP store) turns this red
    with a listener on '::'."""
    import pandas as pd
    from test_train import TINY, make_pairs, make_project

    from procnet import LOOPBACK, listening

    texts = pd.concat([make_pairs(32, 0).chosen, make_pairs(32, 0).rejected]).tolist()
    bb = build_tiny_backbone(texts, ModelSettings.from_section({"max_length": 64, "tiny": TINY}), tmp_path / "backbone")
    project = make_project(tmp_path / "p", bb, n_train=16, n_val=8, epochs=2, num_procs=2, zero_stage=2)
    env = {k: v for k, v in os.environ.items() if k not in ("GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME")}
    env.update(PYTHONPATH=str(ROOT))
    log = tmp_path / "train.log"
    proc = subprocess.Popen([PY, "-m", "stages.train"], cwd=project, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    seen: set[tuple[str, int]] = set()
    try:
        while proc.poll() is None:
            seen |= listening(proc.pid)
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == 0, log.read_text()[-3000:]
    assert json.loads((project / "models/reward_model/training.json").read_text())["world_size"] == 2
    assert seen, "no listener was seen during the run: nothing was checked"
    assert {address for address, _ in seen} <= LOOPBACK, seen


# --- no secret in outputs or logs ------------------------------------------------------------------

@pytest.mark.slow
def test_no_environment_value_reaches_stage_outputs_lineage_or_logs(tmp_path):
    """Run collect, then evaluate + export (the stage that writes lineage) with fake secrets in the environment."""
    from test_evaluate import save_reward_model
    from test_export import make_project

    from rmpipe.data.sample.batches import write_sample_batches

    project = make_project(tmp_path / "project", save_reward_model(tmp_path / "src"))
    write_sample_batches(project / "data/incoming", {"seed": 1, "n_pairs": 60, "n_batches": 1, "pair_rows": 5})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RMPIPE_FAKE_SECRET": SECRET, "HF_TOKEN": SECRET + "-hf",
           "AWS_SECRET_ACCESS_KEY": SECRET + "-aws", "DVC_REMOTE_PASSWORD": SECRET + "-dvc"}
    logs = []
    for stage in ("collect", "evaluate", "export"):
        done = subprocess.run([PY, "-m", f"stages.{stage}"], cwd=project, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        logs.append(done.stdout + done.stderr)
    assert (project / "models/export/lineage.json").exists() and "collect.json" in os.listdir(project / "reports")
    assert all(SECRET not in log for log in logs)
    leaked = [p.relative_to(project) for p in project.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == []
    # nor the environment in general: the user's PATH is not recorded either
    assert os.environ["PATH"] not in (project / "models/export/lineage.json").read_text()
