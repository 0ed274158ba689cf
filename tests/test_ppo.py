"""PPO math by hand (KL, rewards, GAE, clipping, KL control) and a toy policy that must learn.
Pure torch, CPU, seeded; the whole file runs in a few seconds."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from cai_lib.training.ppo_math import (AdaptiveKLController, Clip, FixedKLController, Targets, ValueHead, gae,
                                       kl_penalised_rewards, logprobs_from_logits, per_token_kl, ppo_losses, whiten)

# ---------------------------------------------------------------- log-probs, KL, rewards


def test_logprobs_from_logits_is_the_categorical_log_prob():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 7, generator=g)
    labels = torch.randint(0, 7, (2, 4), generator=g)
    want = torch.distributions.Categorical(logits=logits).log_prob(labels)
    assert torch.allclose(logprobs_from_logits(logits, labels), want, atol=1e-6)


def test_kl_is_exactly_zero_when_policy_equals_reference():
    logprobs = torch.log(torch.rand(3, 5, generator=torch.Generator().manual_seed(1)))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    assert per_token_kl(logprobs, logprobs.clone(), mask).abs().max().item() == 0.0
    rewards = kl_penalised_rewards(torch.zeros(3), logprobs, logprobs.clone(), mask, beta=0.5)
    assert rewards.abs().max().item() == 0.0


def test_per_token_kl_is_logp_minus_ref_and_zero_on_padding():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -9.0]])
    kl = per_token_kl(logprobs, ref, torch.tensor([[1, 1, 0]]))
    assert kl.tolist() == [[0.5, -1.0, 0.0]]


def test_score_lands_on_last_real_token_of_right_padded_rows():
    logprobs = torch.full((3, 4), -1.0)
    ref = torch.full((3, 4), -1.2)                    # KL_t = 0.2 on every real token
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    score = torch.tensor([10.0, 20.0, 30.0])
    rewards = kl_penalised_rewards(score, logprobs, ref, mask, beta=0.5)   # -0.5 * 0.2 = -0.1
    want = [[-0.1, -0.1, -0.1, 10.0 - 0.1],
            [-0.1, 20.0 - 0.1, 0.0, 0.0],
            [30.0 - 0.1, 0.0, 0.0, 0.0]]
    assert rewards.tolist() == [pytest.approx(row, abs=1e-6) for row in want]


def test_masks_with_gaps_or_empty_rows_are_rejected():
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="contiguous block"):
        kl_penalised_rewards(torch.zeros(1), x, x, torch.tensor([[1, 0, 1, 0]]), beta=0.1)
    with pytest.raises(ValueError, match=r"mask rows \[0\] have no real token"):
        gae(x, x, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="score must be one number per row"):
        kl_penalised_rewards(torch.zeros(2), x, x, torch.ones(1, 4), beta=0.1)
    with pytest.raises(ValueError, match="values has shape"):
        gae(x, torch.zeros(1, 3), torch.ones(1, 4))


# ---------------------------------------------------------------- GAE

REWARDS = [0.1, -0.2, 1.0]
VALUES = [0.5, 0.6, 0.7]


def test_gae_with_gamma_lam_one_is_monte_carlo_return_minus_value():
    adv, ret = gae(torch.tensor([REWARDS]), torch.tensor([VALUES]), torch.ones(1, 3), 1.0, 1.0)
    # returns-to-go: 0.1 - 0.2 + 1.0 = 0.9, -0.2 + 1.0 = 0.8, 1.0
    assert ret.tolist()[0] == pytest.approx([0.9, 0.8, 1.0], abs=1e-6)
    assert adv.tolist()[0] == pytest.approx([0.9 - 0.5, 0.8 - 0.6, 1.0 - 0.7], abs=1e-6)


def test_gae_matches_hand_arithmetic():
    gamma, lam = 0.9, 0.95
    d2 = 1.0 + gamma * 0.0 - 0.7                  # 0.3 (V after the last token is 0)
    d1 = -0.2 + gamma * 0.7 - 0.6                 # -0.17
    d0 = 0.1 + gamma * 0.6 - 0.5                  # 0.14
    a2 = d2                                       # 0.3
    a1 = d1 + gamma * lam * a2                    # -0.17 + 0.855 * 0.3 = 0.0865
    a0 = d0 + gamma * lam * a1                    # 0.14 + 0.855 * 0.0865 = 0.2139575
    assert [a0, a1, a2] == pytest.approx([0.2139575, 0.0865, 0.3])
    adv, ret = gae(torch.tensor([REWARDS]), torch.tensor([VALUES]), torch.ones(1, 3), gamma, lam)
    assert adv.tolist()[0] == pytest.approx([a0, a1, a2], abs=1e-6)
    assert ret.tolist()[0] == pytest.approx([a0 + 0.5, a1 + 0.6, a2 + 0.7], abs=1e-6)


def test_gae_ignores_padding_and_gives_it_zero_advantage():
    # the same trajectory right-padded to 5 tokens with junk in the padding, next to a full row
    rewards = torch.tensor([REWARDS + [9.0, 9.0], [1.0] * 5])
    values = torch.tensor([VALUES + [-7.0, 7.0], [0.0] * 5])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    adv, ret = gae(rewards, values, mask, 0.9, 0.95)
    assert adv[0].tolist() == pytest.approx([0.2139575, 0.0865, 0.3, 0.0, 0.0], abs=1e-6)
    assert ret[0, 3:].tolist() == [0.0, 0.0]
    alone, _ = gae(rewards[1:], values[1:], mask[1:], 0.9, 0.95)   # rows are independent
    assert torch.allclose(adv[1:], alone)


def test_whiten_normalises_real_tokens_only():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 6, generator=g) * 3 + 5
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4, [1] + [0] * 5])
    w = whiten(x, mask)
    real = w[mask.bool()]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert real.var(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    assert w[~mask.bool()].abs().max().item() == 0.0
    kept = whiten(x, mask, shift_mean=False)[mask.bool()]
    assert kept.mean().item() == pytest.approx(x[mask.bool()].mean().item(), abs=1e-5)


# ---------------------------------------------------------------- clipped objective

def _policy_case():
    # eps = 0.2; tokens: helped past the clip (A>0, r=1.5), helped past the clip (A<0, r=0.5),
    # outside but hurting (A>0, r=0.5), inside (A>0, r=1.1), padding (r=3)
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.1, 3.0]])
    adv = torch.tensor([[1.0, -1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    old = torch.full((1, 5), -2.0)
    new = (old + ratio.log()).requires_grad_(True)
    return new, old, adv, mask


def test_clipped_surrogate_has_zero_gradient_once_ratio_has_moved_far_enough():
    new, old, adv, mask = _policy_case()
    v = torch.zeros(1, 5)
    out = ppo_losses(new, v, Targets(old, v, adv, v, mask), Clip(0.2, 0.2, vf_coef=0.0))
    # max(-A r, -A clip r): max(-1.5,-1.2), max(0.5,0.8), max(-0.5,-0.8), max(-1.1,-1.1)
    assert out["policy_loss"].item() == pytest.approx((-1.2 + 0.8 - 0.5 - 1.1) / 4, abs=1e-6)
    out["policy_loss"].backward()
    # d/dlogp (-A r) = -A r, over 4 real tokens; clipped tokens and padding get nothing
    assert new.grad.tolist()[0] == pytest.approx([0.0, 0.0, -0.5 / 4, -1.1 / 4, 0.0], abs=1e-6)
    assert out["clip_fraction"].item() == pytest.approx(3 / 4)      # |r - 1| > 0.2: 1.5, 0.5, 0.5
    # k3 = (r - 1) - log r per real token
    k3 = [(r - 1) - math.log(r) for r in (1.5, 0.5, 0.5, 1.1)]
    assert out["approx_kl"].item() == pytest.approx(sum(k3) / 4, abs=1e-6)


def test_on_policy_step_is_plain_policy_gradient():
    logp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    adv = torch.tensor([[0.5, -1.0, 2.0]])
    v = torch.zeros(1, 3)
    out = ppo_losses(logp, v, Targets(logp.detach(), v, adv, v, torch.ones(1, 3)), Clip(0.2, 0.2, 0.0))
    out["loss"].backward()
    assert logp.grad.tolist()[0] == pytest.approx([-0.5 / 3, 1.0 / 3, -2.0 / 3])
    assert out["approx_kl"].item() == 0.0 and out["clip_fraction"].item() == 0.0


def test_value_loss_is_clipped_pessimistically():
    old_v = torch.zeros(1, 3)
    values = torch.tensor([[0.5, 0.5, 0.1]], requires_grad=True)
    returns = torch.tensor([[1.0, 0.0, 1.0]])
    logp = torch.zeros(1, 3)
    targets = Targets(logp, old_v, torch.zeros(1, 3), returns, torch.ones(1, 3))
    out = ppo_losses(logp, values, targets, Clip(0.2, 0.2, vf_coef=0.5))
    # token 0: max((0.5-1)^2, (0.2-1)^2) = 0.64; token 1: max(0.25, 0.04) = 0.25;
    # token 2 is inside the clip: (0.1-1)^2 = 0.81
    assert out["value_loss"].item() == pytest.approx(0.5 * (0.64 + 0.25 + 0.81) / 3, abs=1e-6)
    assert out["loss"].item() == pytest.approx(0.5 * out["value_loss"].item(), abs=1e-6)
    out["loss"].backward()
    assert values.grad[0, 0].item() == 0.0                 # the clipped branch won: no gradient
    unclipped = ppo_losses(logp, values, targets, Clip(0.2, None, 0.5))
    assert unclipped["value_loss"].item() == pytest.approx(0.5 * (0.25 + 0.25 + 0.81) / 3)


def test_clip_ranges_must_be_positive_and_targets_take_a_minibatch_of_rows():
    with pytest.raises(ValueError, match=r"clip ranges must be > 0, got clip_range=0, clip_range_value=0.2"):
        Clip(0)
    with pytest.raises(ValueError, match=r"clip_range_value=-0.1"):
        Clip(0.2, -0.1)
    rows = torch.arange(12.0).reshape(4, 3)
    part = Targets(rows, rows + 1, rows + 2, rows + 3, torch.ones(4, 3)).rows(torch.tensor([2, 0]))
    assert part.old_logprobs.tolist() == [[6.0, 7.0, 8.0], [0.0, 1.0, 2.0]] and part.returns[1].tolist() == [3.0, 4.0, 5.0]


# ---------------------------------------------------------------- KL controllers

def test_adaptive_kl_controller_moves_beta_toward_the_target():
    up = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    assert up.update(7.0, n_steps=256) > 0.1                  # KL above target: penalise more
    down = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    assert down.update(3.0, n_steps=256) < 0.1                # below target: relax
    # the proportional error is clipped at +-0.2 (here 100/6 - 1 would be 15.7)
    capped = AdaptiveKLController(1.0, target=6.0, horizon=100)
    assert capped.update(100.0, n_steps=10) == pytest.approx(1.0 * (1 + 0.2 * 10 / 100))
    assert capped.value == pytest.approx(1.02)


def test_fixed_kl_controller_never_moves():
    c = FixedKLController(0.05)
    assert c.update(100.0, n_steps=1000) == 0.05 and c.value == 0.05
    with pytest.raises(ValueError, match="beta must be >= 0"):
        FixedKLController(-1.0)


def test_value_head_is_one_scalar_per_token_in_fp32():
    head = ValueHead(8, dropout=0.1).eval()
    out = head(torch.randn(2, 5, 8, dtype=torch.bfloat16))
    assert out.shape == (2, 5) and out.dtype == torch.float32


# ---------------------------------------------------------------- a toy policy must learn

VOCAB, LENGTH, BOS, EOS, TARGET = 5, 3, 5, 0, 3     # token 0 ends a response early


class ToyPolicy(nn.Module):
    """A bigram LM: next-token logits and a value from the previous token only."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.embed = nn.Embedding(VOCAB + 1, hidden)          # +1 for BOS
        self.lm_head = nn.Linear(hidden, VOCAB)
        self.value_head = ValueHead(hidden)

    def forward(self, prev_tokens):
        h = torch.tanh(self.embed(prev_tokens))
        return self.lm_head(h), self.value_head(h)


@torch.no_grad()
def _sample(policy: ToyPolicy, n: int, gen: torch.Generator) -> torch.Tensor:
    seqs = torch.full((n, 1), BOS)
    for _ in range(LENGTH):
        logits, _ = policy(seqs[:, -1:])
        seqs = torch.cat([seqs, torch.multinomial(logits[:, -1].softmax(-1), 1, generator=gen)], 1)
    return seqs


def _response_mask(labels: torch.Tensor) -> torch.Tensor:
    """1 up to and including the first EOS, 0 after it (right padding)."""
    is_eos = (labels == EOS).long()
    return (is_eos.cumsum(1) - is_eos == 0).long()


def _exact_kl(policy, ref, inputs, mask) -> float:
    """Mean over rows of sum_t KL(pi(.|s_t) || pi_ref(.|s_t)) on the visited states."""
    with torch.no_grad():
        logp, logq = policy(inputs)[0].log_softmax(-1), ref(inputs)[0].log_softmax(-1)
        per_token = (logp.exp() * (logp - logq)).sum(-1)
    return (per_token * mask).sum(1).mean().item()


def train_toy(beta: float, updates: int = 50, batch: int = 64, epochs: int = 4, lr: float = 3e-2,
              seed: int = 0):
    """PPO with this module's functions; score = number of TARGET tokens in the response."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    policy = ToyPolicy()
    ref = copy.deepcopy(policy).requires_grad_(False)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    kl_ctl = FixedKLController(beta)
    scores, kls = [], []
    for _ in range(updates):
        seqs = _sample(policy, batch, gen)
        inputs, labels = seqs[:, :-1], seqs[:, 1:]
        mask = _response_mask(labels)
        score = ((labels == TARGET) * mask).sum(1).float()
        with torch.no_grad():
            logits, old_values = policy(inputs)
            old_logprobs = logprobs_from_logits(logits, labels)
            ref_logprobs = logprobs_from_logits(ref(inputs)[0], labels)
        rewards = kl_penalised_rewards(score, old_logprobs, ref_logprobs, mask, kl_ctl.value)
        advantages, returns = gae(rewards, old_values, mask, gamma=1.0, lam=0.95)
        advantages = whiten(advantages, mask)
        for _ in range(epochs):
            logits, values = policy(inputs)
            out = ppo_losses(logprobs_from_logits(logits, labels), values,
                             Targets(old_logprobs, old_values, advantages, returns, mask), Clip(0.2, 0.2, 0.1))
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
        scores.append(score.mean().item())
        kls.append(_exact_kl(policy, ref, inputs, mask))
    return scores, kls


@pytest.fixture
def one_thread():
    """Tiny tensors: thread hand-offs cost more than the math (12 s instead of 0.4 s for 50
    updates on a busy 2-core machine), so run these on one intra-op thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_toy_policy_learns_to_raise_the_score(one_thread):
    scores, kls = train_toy(beta=0.01)
    # scores[0] is sampled before any update: about 0.2 * (1 + 0.8 + 0.64) = 0.49 target tokens
    # for a near-uniform start (seed 0 draws 0.25); the maximum is 3
    assert scores[0] < 0.8, scores[:5]
    assert sum(scores[-5:]) / 5 > 2.5, scores[-5:]
    assert kls[-1] > 1.0, kls[-5:]                  # it had to move far from the reference


def test_huge_beta_keeps_the_policy_near_the_reference(one_thread):
    scores, kls = train_toy(beta=100.0)
    # whitened advantages keep the step size fixed, so the noisy k1 penalty still jitters the
    # policy a little (0.02-0.06 nats over seeds 0-7) against about 5 nats with beta = 0.01
    assert sum(kls[-10:]) / 10 < 0.1, kls[-10:]
    assert sum(scores[-5:]) / 5 < 1.0, scores[-5:]
