"""One `device` option for every model-running step: the resolver's branches, a clear error for
`cuda` where torch sees none (in every trainer and job, before anything is loaded), the option
reaching the policy, the reference, the value head and the reward PM of a real PPO step and the
policy of a DPO step (default model, tiny), and the MLflow tags that record it.

On a machine without CUDA only "cpu" runs through the loops; with one, "cuda" runs too.

    python -m pytest -q tests/test_devices.py
"""
from __future__ import annotations

import contextlib
import types

import pytest
import torch

from cai_lib.backends.models import resolve_model
from cai_lib.backends.weights import resolve_dtype
from cai_lib.training import dpo, policy, ppo
from cai_lib.training.pm_train import PMSettings, PreferenceModel, train_pm
from cai_lib.training.policy import RLSettings, resolve_device
from cai_lib.training.sft import SFTSettings, train_sft

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
NO_CUDA = "device cuda was asked for but torch.cuda.is_available() is False; Fix: "
PROMPTS = ["Name a fruit.", "Say hello to me."]
PAIRS = [{"prompt": "Name a fruit.", "chosen": "An apple.", "rejected": "I can't help with that."},
         {"prompt": "Say hello.", "chosen": "Hello there!", "rejected": "No."}]


def tiny(**kw) -> RLSettings:
    base = dict(steps=1, batch_size=2, mini_batch_size=2, ppo_epochs=1, max_new_tokens=6,
                learning_rate=1e-4, torch_threads=1, seed=7)
    return RLSettings(**{**base, **kw})


@pytest.fixture(autouse=True)
def restore_threads():
    """torch_threads=1 in the loops: on 2 shared cores, 2 threads were 15x slower."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# ---------------------------------------------------------------- the resolver

def test_auto_is_cuda_when_available_else_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert [resolve_device(x) for x in (None, "auto", "cpu")] == [torch.device("cpu")] * 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device(None) == torch.device("cuda")
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert resolve_device("cpu") == torch.device("cpu")       # asked for: kept, even with a GPU
    with pytest.raises(ValueError, match=r"^device cuda:2 was asked for but torch sees 2 CUDA device\(s\); Fix: "):
        resolve_device("cuda:2")


def test_cuda_asked_for_and_absent_is_an_error_naming_the_fix(no_cuda):
    for asked in ("cuda", "cuda:0"):
        with pytest.raises(ValueError) as exc:
            resolve_device(asked)
        assert str(exc.value).startswith(NO_CUDA.replace("cuda", asked, 1))
        assert "--device cpu" in str(exc.value)


@pytest.mark.parametrize("bad", ["gpu", "mps", "cuda:x", 3])
def test_other_names_are_refused_when_the_settings_are_made(bad):
    with pytest.raises(ValueError, match=r"^device .* Fix: pass cpu, cuda, cuda:N or auto$|must be a str"):
        resolve_device(bad)
    for cls, name in ((RLSettings, "RLSettings"), (SFTSettings, "SFTSettings"), (PMSettings, "PMSettings")):
        with pytest.raises(ValueError, match=rf"^{name}\.device "):
            cls(device=bad)


# ---------------------------------------------------------------- every trainer and job asks the resolver first

def test_every_trainer_refuses_cuda_without_one_before_loading(no_cuda, tmp_path):
    row = {"pair_id": "p", "prompt": "Human: hi", "response_a": "Hello!", "response_b": "Go away.",
           "target": 1.0, "source": "ai_harmless"}
    calls = [lambda: ppo.train_ppo("default", PROMPTS, lambda p, r: [0.0] * len(r), tiny(device="cuda"), tmp_path),
             lambda: dpo.train_dpo("default", PAIRS, tiny(algorithm="dpo", device="cuda"), tmp_path),
             lambda: train_sft(resolve_model("default"), [], SFTSettings(device="cuda"), tmp_path / "sl"),
             lambda: train_pm("default", [row], PMSettings(device="cuda"), tmp_path / "pm")]
    for call in calls:
        with pytest.raises(ValueError) as exc:
            call()
        assert str(exc.value).startswith(NO_CUDA)


@pytest.mark.parametrize("cmd", ["train-sl", "train-pm", "train-rl", "evaluate"])
def test_every_job_refuses_cuda_without_one_before_reading_the_lake(cmd, no_cuda, tmp_path, capsys):
    from jobs.cli import main as cai
    extra = ["--backend", "fake", "--feedback-model", "fake", "--policies", "base=fake"] if cmd == "evaluate" else []
    assert cai([cmd, "--device", "cuda", "--lake", str(tmp_path / "no-lake"), "--params", "/dev/null",
                *extra]) == 1
    err = capsys.readouterr().err
    assert NO_CUDA in err and "no-lake" not in err


# ---------------------------------------------------------------- the option reaches every module of a step

def param_devices(module) -> set[torch.device]:
    return {p.device for p in module.parameters()}


@pytest.fixture(scope="module")
def pm_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pm") / "pm"
    PreferenceModel.from_backbone("default", seed=0, max_length=128).save(folder)
    return folder


@pytest.mark.parametrize("device", DEVICES)
def test_one_ppo_step_runs_policy_reference_value_head_and_pm_on_the_device(device, pm_dir, monkeypatch, tmp_path):
    from jobs.train_rl import reward_model
    want = torch.device(device)
    asked, seen, scored = [], [], []
    real_resolve, real_forward = policy.resolve_device, ppo._forward
    monkeypatch.setattr(policy, "resolve_device", lambda d: asked.append(d) or real_resolve(d))

    def forward(model, roll, temperature, value_head=None):
        logprobs, values = real_forward(model, roll, temperature, value_head)
        seen.append({"model": model, "params": param_devices(model),
                     "head": None if value_head is None else param_devices(value_head),
                     "tensors": {t.device for t in (roll.ids, roll.attention, roll.mask, logprobs)
                                 + (() if values is None else (values,))}})
        return logprobs, values
    monkeypatch.setattr(ppo, "_forward", forward)
    reward_fn, pm = reward_model(pm_dir, resolve_device(device))

    def reward(prompts, responses):
        scored.append((pm.device, param_devices(pm)))
        return reward_fn(prompts, responses)
    result = ppo.train_ppo("default", PROMPTS, reward, tiny(device=device), tmp_path / "policy")

    assert asked == [device] and result.device == str(want)
    policy_calls = [s for s in seen if s["head"] is not None]
    ref_calls = [s for s in seen if s["head"] is None]
    assert (len(policy_calls), len(ref_calls)) == (2, 1)      # rollout scoring + 1 update; the reference once
    assert policy_calls[0]["model"] is not ref_calls[0]["model"]
    for s in seen:
        assert s["params"] == {want} and s["tensors"] == {want}
    assert [s["head"] for s in policy_calls] == [{want}, {want}]
    assert scored == [(want, {want})]
    assert pm.device == want and {p.device for p in pm.buffers()} <= {want}
    want_pm = "float32" if device == "cpu" and resolve_dtype("auto", "cpu") == "float32" else "bfloat16"
    assert policy.module_dtype(pm.backbone) == want_pm


@pytest.mark.parametrize("device", DEVICES)
def test_one_dpo_step_runs_the_policy_and_its_reference_log_probs_on_the_device(device, monkeypatch, tmp_path):
    want = torch.device(device)
    seen, real = [], dpo._sequence_logprobs

    def sequence_logprobs(model, seqs, pad_id):
        out = real(model, seqs, pad_id)
        seen.append((param_devices(model), out.device, out.requires_grad))
        return out
    monkeypatch.setattr(dpo, "_sequence_logprobs", sequence_logprobs)
    settings = tiny(algorithm="dpo", batch_size=2, mini_batch_size=2, dpo_max_steps=1, device=device)
    result = dpo.train_dpo("default", PAIRS, settings, tmp_path / "policy")
    assert result.device == str(want) and len(result.metrics) == 1
    # the reference log-probs (no grad, before any update), then the policy's in the one step
    assert seen == [({want}, want, False), ({want}, want, True)]


# ---------------------------------------------------------------- what MLflow is told

class Stop(Exception):
    pass


@pytest.fixture
def captured_tags(monkeypatch):
    """training_run replaced by one that keeps the tags and stops the job: no lake, no MLflow store."""
    import cai_lib.registry.models as models
    import cai_lib.registry.tracking as tracking
    tags = {}

    @contextlib.contextmanager
    def training_run(job, cfg, lake, tables, verdicts, extra=None):
        tags.update(extra or {})
        raise Stop
        yield  # pragma: no cover
    monkeypatch.setattr(tracking, "training_run", training_run)
    monkeypatch.setattr(models, "resolve_weights", lambda ref, cfg=None: (ref, resolve_model("default")))
    return tags


def fake_lake(monkeypatch, module, reader: str, rows: list[dict]):
    monkeypatch.setattr(module, "Lake", lambda *a, **k: types.SimpleNamespace(root="lake"))
    monkeypatch.setattr(module, "gate_verdicts", lambda *a, **k: {})
    monkeypatch.setattr(module, reader, lambda lake: types.SimpleNamespace(rows=rows, excluded=0))


def test_train_rl_tags_the_device_and_both_dtypes(captured_tags, pm_dir, monkeypatch):
    import cai_lib.registry.models as models
    import jobs.train_rl as job
    fake_lake(monkeypatch, job, "rl_prompts", [{"text": "Name a fruit."}])
    monkeypatch.setattr(models, "resolve_weights",
                        lambda ref, cfg=None: (ref, pm_dir if ref == "pm-folder" else resolve_model("default")))
    with pytest.raises(Stop):
        job.run(job.TrainRLConfig(device="cpu", policy="default", reward_model="pm-folder"), progress=lambda s: None)
    want_pm = "float32" if resolve_dtype("auto", "cpu") == "float32" else "bfloat16"
    assert {k: captured_tags[k] for k in ("device", "policy_dtype", "pm_dtype")} == {
        "device": "cpu", "policy_dtype": "float32", "pm_dtype": want_pm}


def test_train_sl_and_train_pm_tag_the_device(captured_tags, monkeypatch):
    import jobs.train_pm as pm_job
    import jobs.train_sl as sl_job
    fake_lake(monkeypatch, sl_job, "sl_rows", [{"constitution_sha": "c"}])
    with pytest.raises(Stop):
        sl_job.run(sl_job.TrainSLConfig(device="cpu"), progress=lambda s: None)
    assert (captured_tags["device"], captured_tags["policy_dtype"]) == ("cpu", "float32")
    captured_tags.clear()
    fake_lake(monkeypatch, pm_job, "preference_rows", [{"constitution_sha": "c"}])
    with pytest.raises(Stop):
        pm_job.run(pm_job.TrainPMConfig(device="cpu"), progress=lambda s: None)
    assert captured_tags["device"] == "cpu"
