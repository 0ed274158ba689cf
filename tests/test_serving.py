"""Registered models answer: a policy loaded with `mlflow.pyfunc.load_model` generates, the PM
scores with the very function `cai evaluate` uses, and `mlflow models serve` serves both on a
loopback port in MLflow's documented JSON formats. The real default model, no training: the
checkpoint itself is registered as the policy, and a PM with a seeded head on it."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pandas as pd
import pytest

QUESTIONS = ["How do I kill a stuck process on Linux?", "What is the capital of France?"]
GREEDY = {"max_new_tokens": 10, "temperature": 0.0}
ROWS = [{"prompt": QUESTIONS[0], "response": "Find its PID with `ps aux`, then run `kill PID`."},
        {"prompt": QUESTIONS[0], "response": "I can't help with that."},
        {"prompt": QUESTIONS[1], "response": "Paris."}]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A registry holding cai-rl v1 (alias champion) and cai-pm v1."""
    import mlflow
    import torch

    from cai_lib.backends.models import resolve_model
    from cai_lib.registry.models import register_folder, set_alias
    from cai_lib.registry.tracking import configure
    from cai_lib.training.pm_model import PreferenceModel
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{root}/mlflow.db"
    configure(uri, str(root / "artifacts"), "cai")
    policy = root / "policy"
    shutil.copytree(resolve_model("default"), policy)
    PreferenceModel.from_backbone(policy, seed=0, max_length=256).save(root / "pm")
    with mlflow.start_run():
        assert register_folder(policy, "cai-rl", "rl") == "1"
        assert register_folder(root / "pm", "cai-pm", "pm") == "1"
    set_alias("cai-rl", "champion", "1")
    return root, uri


@pytest.fixture(scope="module")
def answers(store):
    """What the backend every job uses answers, greedy: the policy must answer the same."""
    from cai_lib.backends.base import Sampling
    from cai_lib.backends.transformers_backend import TransformersBackend
    backend = TransformersBackend(str(store[0] / "policy"))
    out = backend.generate([[{"role": "user", "content": q}] for q in QUESTIONS],
                           Sampling(temperature=0.0, max_new_tokens=10), [0, 1])
    return [g.text for g in out]


@pytest.fixture(scope="module")
def rewards(store):
    """The PM's rewards as `cai evaluate` computes them (PreferenceModel.load + score_pairs)."""
    import torch

    from cai_lib.training.pm_model import PreferenceModel
    pm = PreferenceModel.load(store[0] / "pm")
    with torch.no_grad():
        return pm.score_pairs([r["prompt"] for r in ROWS], [r["response"] for r in ROWS]).tolist()


def test_the_champion_policy_answers_prompts_and_chats(store, answers):
    import mlflow

    from cai_lib.registry.models import chat_template
    model = mlflow.pyfunc.load_model("models:/cai-rl@champion")
    assert model.predict(pd.DataFrame({"prompt": QUESTIONS}), params=GREEDY) == answers
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    assert model.predict(pd.DataFrame({"messages": chats}), params=GREEDY) == answers
    assert answers[0] and answers[0] != answers[1]
    sampled = model.predict(pd.DataFrame({"prompt": QUESTIONS}), params={"max_new_tokens": 10, "seed": 7})
    assert model.predict(pd.DataFrame({"prompt": QUESTIONS}), params={"max_new_tokens": 10, "seed": 7}) == sampled
    meta = model.metadata
    assert [p.name for p in meta.signature.params] == ["max_new_tokens", "temperature", "top_p", "seed"]
    assert [c.name for c in meta.signature.inputs] == ["prompt", "messages"]
    assert meta.metadata["chat_template"] == chat_template(store[0] / "policy") and "im_start" in meta.metadata["chat_template"]
    with pytest.raises(ValueError, match="no rows"):
        model.predict(QUESTIONS)        # MLflow empties a bare list: an error, never []
    # the lineage records the sha of the very weights the alias serves
    from cai_lib.registry.lineage import lineage
    from cai_lib.registry.models import model_folder
    from cai_lib.registry.serving import weights_sha256
    assert lineage("cai-rl@champion")["weights_sha256"] == weights_sha256(model_folder("cai-rl@champion"))


def test_the_pm_returns_the_reward_evaluate_uses(store, rewards):
    import mlflow
    model = mlflow.pyfunc.load_model("models:/cai-pm/1")
    assert model.predict(pd.DataFrame(ROWS)) == rewards
    assert len(set(rewards)) == 3


def test_a_load_refuses_pickles_and_changed_weights(store, tmp_path):
    from cai_lib.registry.serving import load_servable, weights_sha256
    folder = tmp_path / "pm"
    shutil.copytree(store[0] / "pm", folder)
    sha = weights_sha256(folder)
    with open(folder / "score_head.safetensors", "r+b") as f:    # one byte of the head flipped
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(ValueError, match=f"is not the registered {sha[:12]}"):
        load_servable(folder, {"kind": "pm", "weights_sha256": sha})
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="pickle"):
        load_servable(folder, {"kind": "pm", "weights_sha256": sha})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: dict):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())["predictions"]


class Served:
    """`mlflow models serve` in its own process group, on loopback, up within `timeout` s."""

    def __init__(self, model_uri: str, tracking_uri: str, log, timeout: float = 300):
        self.port = _free_port()
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_REGISTRY_URI": tracking_uri}
        self.proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
                                      "--env-manager", "local", "-h", "127.0.0.1", "-p", str(self.port), "-w", "1"],
                                     env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"`mlflow models serve {model_uri}` exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ping", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(1)
        self.stop()
        raise AssertionError(f"`mlflow models serve {model_uri}` did not answer /ping within {timeout} s")

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def test_mlflow_models_serve_answers_over_http(store, answers, rewards, tmp_path):
    root, uri = store
    with open(tmp_path / "serve.log", "w") as log:
        policy = Served("models:/cai-rl@champion", uri, log)
        try:
            split = {"dataframe_split": {"columns": ["prompt"], "data": [[q] for q in QUESTIONS]}, "params": GREEDY}
            assert _post(policy.port, split) == answers
            chat = {"dataframe_records": [{"messages": [{"role": "user", "content": QUESTIONS[1]}]}], "params": GREEDY}
            assert _post(policy.port, chat) == answers[1:]
        finally:
            policy.stop()
        pm = Served("models:/cai-pm/1", uri, log)
        try:
            assert _post(pm.port, {"dataframe_records": ROWS}) == pytest.approx(rewards, abs=1e-6)
        finally:
            pm.stop()
