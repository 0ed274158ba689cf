"""PPO core for RLHF on token sequences (Ziegler et al. 2019; Bai et al. 2022). Pure torch.

The policy writes a response token by token; the PM scores the whole response once. As in
those papers the per-token reward is a KL penalty to the frozen reference (SL-CAI) policy,
with the PM score added on the last response token:

    r_t = -beta * (log pi(a_t|s_t) - log pi_ref(a_t|s_t))  + [t == last] * score

GAE turns rewards and value estimates into advantages; the clipped surrogate and the
clipped value loss are then minimised for a few epochs on the same rollout. Tensors are
[batch, time] over response tokens, right-padded, mask 1 on real tokens (a row's ones must
be one contiguous block; positions after it are padding). The training loop lives with the
HF model; this file holds only the math, so each formula is tested by hand.

    python -m pytest -q tests/test_ppo.py cai_lib/training/ppo_math.py
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

__all__ = ["logprobs_from_logits", "masked_mean", "whiten", "per_token_kl",
           "kl_penalised_rewards", "gae", "Clip", "Targets", "ppo_losses", "AdaptiveKLController",
           "FixedKLController", "ValueHead"]


# ---------------------------------------------------------------- validation (the edge)

def _same_shape(**tensors: Tensor) -> None:
    (first, ref), *rest = tensors.items()
    if ref.dim() != 2:
        raise ValueError(f"{first} must be [batch, time], got shape {tuple(ref.shape)}")
    for name, t in rest:
        if t.shape != ref.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {first} has shape "
                             f"{tuple(ref.shape)}; pass [batch, time] tensors over the same tokens")


def _mask(mask: Tensor, like: Tensor) -> Tensor:
    """The mask as a float of `like`'s dtype; every row needs a contiguous block of ones."""
    m = mask.to(like.dtype)
    if not ((m == 0) | (m == 1)).all():
        raise ValueError("mask must hold only 0 and 1 (1 = real response token)")
    if (m.sum(1) == 0).any():
        raise ValueError(f"mask rows {m.sum(1).eq(0).nonzero().flatten().tolist()} have no real "
                         "token; drop empty responses before PPO")
    starts = (m[:, 1:] > m[:, :-1]).sum(1) + m[:, 0]        # number of 0 -> 1 edges
    if (starts > 1).any():
        raise ValueError("each mask row must be one contiguous block of ones (right-padded "
                         "response tokens); got a row with a gap")
    return m


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over positions where mask == 1 (all rows pooled: every token counts once)."""
    return torch.where(mask.bool(), x, 0.0).sum() / mask.sum()


# ---------------------------------------------------------------- log-probs and KL

def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """log p(label) per position: gather of log_softmax. logits [B, T, V], labels [B, T].
    Remember the shift for causal LMs: logits[:, t] predict labels[:, t + 1].

    >>> logprobs_from_logits(torch.zeros(1, 2, 4), torch.tensor([[0, 3]])).exp()
    tensor([[0.2500, 0.2500]])
    """
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def per_token_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor | None = None) -> Tensor:
    """k1 estimate of KL(pi || pi_ref) per sampled token: logp - logp_ref (zero on padding).
    Unbiased for the sequence KL when summed over tokens sampled from pi; a single token
    can be negative."""
    _same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    kl = logprobs - ref_logprobs
    return kl if mask is None else torch.where(_mask(mask, kl).bool(), kl, 0.0)


def kl_penalised_rewards(score: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor,
                         beta: float) -> Tensor:
    """Per-token rewards -beta * KL_t, plus each row's PM `score` [B] on its last real token.

    >>> kl_penalised_rewards(torch.tensor([2.0]), torch.tensor([[-1.0, -2.0, -3.0]]),
    ...                      torch.tensor([[-1.5, -2.0, -1.0]]), torch.tensor([[1, 1, 0]]), beta=0.1)
    tensor([[-0.0500,  2.0000,  0.0000]])
    """
    _same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    if score.shape != logprobs.shape[:1]:
        raise ValueError(f"score must be one number per row, shape ({logprobs.shape[0]},), "
                         f"got {tuple(score.shape)}")
    m = _mask(mask, logprobs)
    rewards = torch.where(m.bool(), -beta * per_token_kl(logprobs, ref_logprobs), 0.0)
    last = m.shape[1] - 1 - m.flip(1).argmax(1)            # argmax finds the first max
    rows = torch.arange(len(score), device=rewards.device)   # on the rewards' device: CUDA rollouts too
    rewards[rows, last] += score.to(device=rewards.device, dtype=rewards.dtype)
    return rewards


# ---------------------------------------------------------------- advantages

@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), backwards in time:

        delta_t = r_t + gamma * V_{t+1} - V_t        (V after the last real token = 0)
        A_t     = delta_t + gamma * lam * A_{t+1}
        returns = A + V                              (targets for the value loss)

    gamma = lam = 1 gives A_t = sum_{k>=t} r_k - V_t (Monte Carlo). Padding gets 0.
    """
    _same_shape(rewards=rewards, values=values, mask=mask)
    m = _mask(mask, values)
    real = m.bool()
    values, rewards = torch.where(real, values, 0.0), torch.where(real, rewards, 0.0)
    advantages = torch.zeros_like(values)
    next_adv = next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        # a row's mask drops to 0 after its last token: V_{t+1} = A_{t+1} = 0 there
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = delta + gamma * lam * next_adv
        advantages[:, t] = next_adv
        next_value, next_adv = values[:, t], next_adv * m[:, t]
    advantages = advantages * m
    return advantages, (advantages + values) * m


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over real tokens of the whole batch; padding stays 0. Normalising
    advantages keeps the step size independent of the reward scale. The population variance
    is used, so a single token is fine (it becomes 0).

    >>> whiten(torch.tensor([[1.0, 3.0, 9.0]]), torch.tensor([[1, 1, 0]]))
    tensor([[-1.,  1.,  0.]])
    """
    _same_shape(x=x, mask=mask)
    m = _mask(mask, x)
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    out = (x - mean) * torch.rsqrt(var + eps)
    return (out if shift_mean else out + mean) * m


# ---------------------------------------------------------------- the PPO objective

@dataclass(frozen=True)
class Clip:
    """PPO's clip ranges (ratio, value; value None: no value clipping) and the value loss's weight."""
    ratio: float = 0.2
    value: float | None = 0.2
    vf_coef: float = 0.1

    def __post_init__(self):
        if self.ratio <= 0 or (self.value is not None and self.value <= 0):
            raise ValueError(f"clip ranges must be > 0, got clip_range={self.ratio}, clip_range_value={self.value}")


@dataclass(frozen=True)
class Targets:
    """What the rollout fixed before the update: the old policy's log-probs and values, the
    advantages and returns, and the mask of real tokens, each [batch, time]."""
    old_logprobs: Tensor
    old_values: Tensor
    advantages: Tensor
    returns: Tensor
    mask: Tensor

    def rows(self, index: Tensor) -> "Targets":
        """The same targets for a minibatch's rows."""
        return Targets(*(getattr(self, f.name)[index] for f in fields(self)))


def ppo_losses(new_logprobs: Tensor, values: Tensor, targets: Targets, clip: Clip = Clip()) -> dict[str, Tensor]:
    """Clipped PPO losses, masked means over tokens (Schulman et al. 2017):

        ratio       = exp(logp_new - logp_old)
        policy_loss = mean max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))
        value_loss  = 0.5 * mean max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)
        loss        = policy_loss + vf_coef * value_loss

    The max makes clipping one-sided: once the ratio has moved past 1 +- eps in the
    direction the advantage favours, that token's gradient is zero. Diagnostics (detached):
    approx_kl = mean((ratio - 1) - log ratio) (Schulman's k3, >= 0) and clip_fraction =
    share of tokens with |ratio - 1| > eps. Clip(value=None) disables value clipping.
    """
    t = targets
    _same_shape(new_logprobs=new_logprobs, old_logprobs=t.old_logprobs, advantages=t.advantages,
                values=values, old_values=t.old_values, returns=t.returns, mask=t.mask)
    m = _mask(t.mask, new_logprobs)
    old_logprobs, advantages = t.old_logprobs.detach(), t.advantages.detach()
    old_values, returns = t.old_values.detach(), t.returns.detach()

    log_ratio = new_logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * torch.clamp(ratio, 1.0 - clip.ratio, 1.0 + clip.ratio)
    policy_loss = masked_mean(torch.max(pg_unclipped, pg_clipped), m)

    vf_unclipped = (values - returns) ** 2
    if clip.value is None:
        vf = vf_unclipped
    else:
        v_clipped = old_values + torch.clamp(values - old_values, -clip.value, clip.value)
        vf = torch.max(vf_unclipped, (v_clipped - returns) ** 2)
    value_loss = 0.5 * masked_mean(vf, m)

    with torch.no_grad():
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, m)
        clip_fraction = masked_mean(((ratio - 1.0).abs() > clip.ratio).to(m.dtype), m)
    return {"loss": policy_loss + clip.vf_coef * value_loss, "policy_loss": policy_loss,
            "value_loss": value_loss, "approx_kl": approx_kl, "clip_fraction": clip_fraction}


# ---------------------------------------------------------------- KL coefficient

class FixedKLController:
    """A constant beta; same interface as AdaptiveKLController."""

    def __init__(self, beta: float):
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.value = float(beta)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


class AdaptiveKLController:
    """Ziegler et al. (2019): steer the KL toward `target` (nats per sequence) with

        beta <- beta * (1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon)

    where n_steps is the number of samples (or batches) since the last update.

    >>> c = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    >>> round(c.update(12.0, n_steps=1_000), 6)   # KL twice the target: +0.2 * 0.1
    0.102
    """

    def __init__(self, init_beta: float, target: float, horizon: float):
        if init_beta < 0 or target <= 0 or horizon <= 0:
            raise ValueError(f"need init_beta >= 0, target > 0, horizon > 0; got init_beta="
                             f"{init_beta}, target={target}, horizon={horizon}")
        self.value, self.target, self.horizon = float(init_beta), float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


# ---------------------------------------------------------------- value head

class ValueHead(nn.Module):
    """Scalar value per token from the policy's hidden states: [B, T, H] -> [B, T].
    The head stays in its own dtype (fp32) even when the trunk runs in bf16."""

    def __init__(self, hidden_size: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.summary = nn.Linear(hidden_size, 1)

    def forward(self, hidden_states: Tensor) -> Tensor:
        h = hidden_states.to(self.summary.weight.dtype)
        return self.summary(self.dropout(h)).squeeze(-1)
