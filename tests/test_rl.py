"""RL-CAI loops on the real default model (SmolLM2-135M), kept tiny: 2 PPO iterations of 2
prompts x 8 new tokens, 2 DPO steps on 4 pairs; plus settings validation and the KL sign.
One PPO run and one DPO run per module (fixtures); the file runs in about a minute on 2 busy cores."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from cai_lib.backends.models import resolve_model
from cai_lib.quality.signals import boilerplate_rate, is_refusal
from cai_lib.training.dpo import DPO_METRICS, train_dpo
from cai_lib.training.policy import RLSettings, load_policy, render_chat
from cai_lib.training.ppo import PPO_METRICS, _forward, _Rollout, _rollout, response_mask, train_ppo
from cai_lib.training.ppo_math import Targets, ValueHead, gae, kl_penalised_rewards, ppo_losses

PROMPTS = ["Name a fruit.", "Say hello to me.", "What colour is the sky?"]
PAIRS = [
    {"prompt": "Name a fruit.", "chosen": "An apple.", "rejected": "I can't help with that."},
    {"prompt": "Say hello.", "chosen": "Hello there!", "rejected": "No."},
    {"prompt": "What is 2 + 2?", "chosen": "4.", "rejected": "5.", "weight": 2.0},
    {"prompt": "Greet a friend.", "chosen": "Hi, good to see you!", "rejected": "", "weight": 0.5},
]


def letter_e(prompts, responses):
    """Toy reward: how often the letter e appears, / 10."""
    return [r.count("e") / 10 for r in responses]


def tiny(**kw) -> RLSettings:
    base = dict(steps=2, batch_size=2, mini_batch_size=2, ppo_epochs=1, max_new_tokens=8,
                learning_rate=1e-4, torch_threads=1, seed=7)
    return RLSettings(**{**base, **kw})


def start_weights() -> dict[str, torch.Tensor]:
    return load_file(str(resolve_model("default") / "model.safetensors"))


def assert_loadable_and_changed(out_dir):
    from transformers import AutoModelForCausalLM
    assert sorted(p.name for p in out_dir.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(out_dir.glob("*.bin")) and not list(out_dir.glob("*.pt"))
    saved, before = load_file(str(out_dir / "model.safetensors")), start_weights()
    assert saved.keys() == before.keys()                 # the value head is not saved
    changed = [k for k in before if not torch.equal(saved[k].float(), before[k].float())]
    assert len(changed) > len(before) // 2, changed
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    assert model.config.eos_token_id == 2
    assert (out_dir / "tokenizer.json").exists()


@pytest.fixture(scope="module", autouse=True)
def restore_threads():
    """torch_threads=1: on 2 shared cores, 2 threads were 15x slower (spinning at barriers)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- settings and pure helpers

@pytest.mark.parametrize("kw,name", [
    ({"algorithm": "grpo"}, "algorithm"), ({"kl_mode": "auto"}, "kl_mode"), ({"steps": 0}, "steps"),
    ({"batch_size": 2, "mini_batch_size": 4}, "mini_batch_size"), ({"top_p": 0.0}, "top_p"),
    ({"temperature": 0.0}, "temperature"), ({"kl_beta": -1.0}, "kl_beta"), ({"lam": 1.5}, "lam"),
    ({"clip_range_value": 0.0}, "clip_range_value"), ({"dpo_max_steps": 0}, "dpo_max_steps"),
])
def test_settings_are_validated_with_the_field_name(kw, name):
    with pytest.raises(ValueError, match=rf"RLSettings[. ]{name}\b"):   # "RLSettings steps: 0 is below ..."
        RLSettings(**kw)


def test_wrong_algorithm_and_bad_inputs_fail_before_loading_anything():
    with pytest.raises(ValueError, match="train_dpo"):
        train_ppo("default", PROMPTS, letter_e, RLSettings(algorithm="dpo"), "unused")
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        train_ppo("default", ["ok", " "], letter_e, tiny(), "unused")
    with pytest.raises(ValueError, match="same text"):
        train_dpo("default", [{"prompt": "p", "chosen": "a", "rejected": "a"}], tiny(algorithm="dpo"), "unused")
    with pytest.raises(ValueError, match="weight"):
        train_dpo("default", [{**PAIRS[0], "weight": 0}], tiny(algorithm="dpo"), "unused")


def test_an_immediate_eos_keeps_one_token_in_the_mask():
    tokens = torch.tensor([[2, 2, 2], [9, 2, 2]])
    assert response_mask(tokens, eos_id=2).tolist() == [[1, 0, 0], [1, 1, 0]]
    # ... so the score still has a token to land on, and nothing in ppo.py sees an empty row
    rewards = kl_penalised_rewards(torch.tensor([3.0, 1.0]), torch.zeros(2, 3), torch.zeros(2, 3),
                                   response_mask(tokens, 2), beta=0.1)
    assert rewards.tolist() == [[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]]


def test_a_larger_beta_lowers_rewards_when_the_policy_is_above_the_reference():
    logprobs = torch.tensor([[-1.0, -0.5, -2.0], [-0.2, -0.3, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -2.0], [-0.9, -0.4, -1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert ((logprobs - ref) * mask).sum(1).min() > 0              # KL > 0 on both rows
    score = torch.tensor([1.0, 2.0])
    total = {b: kl_penalised_rewards(score, logprobs, ref, mask, beta=b).sum(1) for b in (1e-4, 10.0)}
    assert (total[10.0] < total[1e-4]).all()
    assert torch.allclose(total[1e-4], score, atol=1e-3)          # tiny beta: just the score


# ---------------------------------------------------------------- PPO on the real model

@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    seen, sampled = [], []

    def reward(prompts, responses):                 # letter_e, keeping each step's sampled texts
        sampled.append(list(responses))
        return letter_e(prompts, responses)
    out = tmp_path_factory.mktemp("ppo") / "policy"
    result = train_ppo("default", PROMPTS, reward, tiny(), out, on_step=lambda i, m: seen.append((i, m)))
    return result, seen, sampled


def test_ppo_logs_every_metric_finite_each_step(ppo_run):
    result, seen, sampled = ppo_run
    assert [i for i, _ in seen] == [0, 1] and [m for _, m in seen] == result.metrics
    assert [len(texts) for texts in sampled] == [2, 2]
    for m, texts in zip(result.metrics, sampled):
        assert set(PPO_METRICS) <= m.keys()
        assert all(math.isfinite(v) for v in m.values()), m
        # the Goodhart watch is computed on the very texts the reward saw
        assert m["refusal_rate"] == sum(map(is_refusal, texts)) / 2
        assert m["boilerplate_rate"] == boilerplate_rate(texts)[0]
        assert m["reward_mean"] == pytest.approx(sum(letter_e([], texts)) / 2)
        assert 0 <= m["response_len_mean"] <= 8 and m["beta"] == tiny().kl_beta
    print("\nPPO seconds per iteration:", [round(m["seconds"], 1) for m in result.metrics],
          "total", round(result.seconds, 1))


def test_ppo_kl_is_zero_before_the_first_update(ppo_run):
    first = ppo_run[0].metrics[0]
    assert first["kl_mean"] == 0.0          # policy == reference bit for bit at step 0
    assert first["approx_kl"] < 1e-5         # first minibatch: ratio 1 up to batching noise


def test_ppo_saves_a_changed_policy_as_safetensors(ppo_run):
    assert_loadable_and_changed(ppo_run[0].out_dir)


@pytest.fixture(scope="module")
def loaded():
    settings = tiny()
    tokenizer, policy = load_policy("default", settings, "ppo")
    return settings, tokenizer, policy


def test_rollout_is_deterministic_given_the_seed_and_left_pads_prompts(loaded):
    settings, tokenizer, policy = loaded
    rendered = [render_chat(tokenizer, p) for p in PROMPTS[:2]]
    a, b = (_rollout(policy, tokenizer, rendered, settings, seed=11) for _ in range(2))
    assert torch.equal(a.ids, b.ids) and a.texts == b.texts
    assert a.attention[:, -settings.max_new_tokens - 1].all()   # last prompt token is real: left padding
    assert a.mask[:, 0].all()                                    # every response keeps >= 1 token


def test_an_empty_response_goes_through_the_ppo_math(loaded):
    """A rollout row that is EOS at once (then padding): decoded '', one masked token, finite losses."""
    settings, tokenizer, policy = loaded
    eos = tokenizer.eos_token_id
    prompt = tokenizer(render_chat(tokenizer, PROMPTS[0]), return_tensors="pt", add_special_tokens=False)
    response = torch.tensor([[eos, eos, eos]])
    mask = response_mask(response, eos)
    roll = _Rollout(torch.cat([prompt.input_ids, response], 1), torch.cat([prompt.attention_mask, mask], 1),
                    prompt.input_ids.shape[1], mask, [""], torch.tensor([True]))
    head = ValueHead(policy.config.hidden_size)
    logprobs, values = _forward(policy, roll, 1.0, head)
    rewards = kl_penalised_rewards(torch.tensor([0.5]), logprobs.detach(), logprobs.detach(), mask, beta=0.1)
    advantages, returns = gae(rewards, values.detach(), mask)
    out = ppo_losses(logprobs, values, Targets(logprobs.detach(), values.detach(), advantages, returns, mask))
    out["loss"].backward()
    assert mask.tolist() == [[1, 0, 0]] and rewards.tolist() == [[0.5, 0.0, 0.0]]
    assert all(torch.isfinite(v) for v in out.values())
    assert head.summary.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- DPO on the real model

@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo") / "policy"
    settings = tiny(algorithm="dpo", batch_size=2, mini_batch_size=1, dpo_epochs=1, dpo_max_steps=2)
    return train_dpo("default", PAIRS, settings, out)


def test_dpo_two_steps_log_finite_metrics_starting_at_log_2(dpo_run):
    assert len(dpo_run.metrics) == 2
    for m in dpo_run.metrics:
        assert set(DPO_METRICS) <= m.keys() and all(math.isfinite(v) for v in m.values()), m
    first = dpo_run.metrics[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)   # policy == reference at step 0
    assert first["margin"] == pytest.approx(0.0, abs=1e-5)
    assert dpo_run.metrics[1]["loss"] != first["loss"]


def test_dpo_saves_a_changed_policy_as_safetensors(dpo_run):
    assert_loadable_and_changed(dpo_run.out_dir)
