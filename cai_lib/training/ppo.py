"""RL-CAI: fine-tune the SL-CAI policy against the preference model (PPO), or on pairs (DPO).

PPO (Bai et al. 2022b, after Ziegler et al. 2019), one iteration:

    prompts   next `batch_size` prompts of a seeded shuffle (reshuffled after each pass)
    rollout   sample one response per prompt (chat template, generation prompt, left-padded)
    score     reward_fn(prompts, responses) -> one float each (the job passes the PM score)
    rewards   r_t = -beta * (log pi - log pi_ref)(a_t)  +  score on the response's last token
    GAE       advantages and returns from the value head; advantages whitened
    update    `ppo_epochs` passes of shuffled minibatches: clipped policy + vf_coef * value loss
    beta      KL controller (fixed or adaptive) fed the mean sequence KL of the rollout

The formulas live in `cai_lib.training.ppo_math` (tested by hand); this file is the loop around the HF
model. The policy is the SL-CAI folder in float32 with a `ValueHead` on its last hidden
states; the reference is a frozen copy of the same starting weights. All three live on
`settings.device` (`policy.resolve_device`), and so does every tensor of a step: the
rollout, the rewards (reward_fn's floats are moved there) and the advantages. A response's tokens
run up to and including its EOS, so a response that ends at once still has one token (the
EOS) to carry the score, and the mask is never empty. Log-probs use logits / temperature,
the distribution the tokens were sampled from (top_p < 1 makes the rollout slightly
off-policy; the ratio then still starts at 1).

DPO lives in `cai_lib.training.dpo`; the settings, loading, optimizer step and saving that both
share are in `cai_lib.training.policy`.

    from cai_lib.training.policy import RLSettings
    from cai_lib.training.ppo import train_ppo
    result = train_ppo(sl_folder, prompts, pm_scores, RLSettings(steps=200), "models/rl_cai",
                       on_step=lambda step, m: mlflow.log_metrics(m, step=step))

    python -m pytest -q tests/test_rl.py cai_lib/training/ppo.py
"""
from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from cai_lib.ids import derive_seed
from cai_lib.training.checkpoint import Checkpointer, Resume, fingerprint
from cai_lib.training.distributed import Ranks, rank_seed, ranks
from cai_lib.training.policy import (OnStep, RewardFn, RLResult, RLSettings, check_settings, load_policy,
                                     finish, make_optimizer, module_device, record_step, render_chat,
                                     step_update, text_list)
from cai_lib.training.ppo_math import (AdaptiveKLController, Clip, FixedKLController, Targets, ValueHead, gae,
                                       kl_penalised_rewards, logprobs_from_logits, ppo_losses, whiten)

__all__ = ["train_ppo", "prompt_batches", "response_mask", "PPO_METRICS", "PMReward"]

PPO_METRICS = ("reward_mean", "reward_std", "kl_mean", "beta", "policy_loss", "value_loss", "approx_kl",
               "clip_fraction", "response_len_mean", "empty_rate", "truncated_rate", "refusal_rate",
               "boilerplate_rate", "seconds")


def prompt_batches(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Prompt indices per iteration: a seeded shuffle of range(n), reshuffled after each pass.

    A batch that spans two passes may hold one prompt twice (two samples of it).

    >>> prompt_batches(3, 2, 3, seed=0)
    [[1, 2], [0, 0], [1, 2]]
    """
    rng, pool, out = random.Random(seed), [], []
    for _ in range(steps):
        batch = []
        while len(batch) < batch_size:
            if not pool:
                pool = list(range(n))
                rng.shuffle(pool)
            batch.append(pool.pop())
        out.append(batch)
    return out


def response_mask(tokens: Tensor, eos_id: int) -> Tensor:
    """1 on response tokens up to and including the first EOS (all of them if none); 0 after.
    A response that is just EOS keeps one token, so no row is empty.

    >>> response_mask(torch.tensor([[5, 2, 2], [2, 2, 2], [5, 6, 7]]), eos_id=2)
    tensor([[1, 1, 0],
            [1, 0, 0],
            [1, 1, 1]])
    """
    is_eos = (tokens == eos_id).long()
    return (is_eos.cumsum(1) - is_eos == 0).long()


@dataclass
class _Rollout:
    ids: Tensor            # [B, P + N]: left-padded prompt, then the response (right-padded)
    attention: Tensor      # [B, P + N]: prompt attention mask, then the response mask
    prompt_len: int        # P
    mask: Tensor           # [B, N]: response tokens up to and including EOS
    texts: list[str]       # decoded responses, EOS and padding dropped
    ended: Tensor          # [B] bool: the response ended with EOS (else hit max_new_tokens)

    def rows(self, idx: Tensor) -> "_Rollout":
        return _Rollout(self.ids[idx], self.attention[idx], self.prompt_len, self.mask[idx],
                        [self.texts[i] for i in idx.tolist()], self.ended[idx])


@torch.no_grad()
def _rollout(policy, tokenizer, rendered: list[str], settings: RLSettings, seed: int) -> _Rollout:
    from transformers import GenerationConfig

    enc = tokenizer(rendered, return_tensors="pt", padding=True, padding_side="left",
                    add_special_tokens=False).to(module_device(policy))
    eos = tokenizer.eos_token_id
    config = GenerationConfig(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=0,
                              max_new_tokens=settings.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=eos)
    torch.manual_seed(seed)  # generate() samples from the global RNG
    seqs = policy.generate(**enc, generation_config=config)
    P = enc["input_ids"].shape[1]
    response = seqs[:, P:]
    mask = response_mask(response, eos)
    ended = ((response == eos) & mask.bool()).any(1)
    content = mask - ((response == eos) & mask.bool()).long()   # response tokens without the EOS
    texts = [tokenizer.decode(r[c.bool()], skip_special_tokens=True).strip() for r, c in zip(response, content)]
    # the stored ids after EOS are the pad id: masked out of attention and of every loss
    return _Rollout(seqs, torch.cat([enc["attention_mask"], mask], 1), P, mask, texts, ended)


def _forward(model, roll: _Rollout, temperature: float, value_head: ValueHead | None = None):
    """Log-probs of the response tokens under logits / temperature, and values ([B, N] each)."""
    P, N = roll.prompt_len, roll.mask.shape[1]
    position_ids = (roll.attention.cumsum(-1) - 1).clamp(min=0)  # left padding: count real tokens
    out = model(input_ids=roll.ids, attention_mask=roll.attention, position_ids=position_ids,
                use_cache=False, logits_to_keep=N + 1, output_hidden_states=value_head is not None)
    logits = out.logits[:, :-1] / temperature          # position P - 1 + t predicts response token t
    logprobs = logprobs_from_logits(logits, roll.ids[:, P:])
    values = None if value_head is None else value_head(out.hidden_states[-1][:, P - 1:P - 1 + N])
    return logprobs, values


def _scores(reward_fn: RewardFn, prompts: list[str], responses: list[str], device: torch.device) -> Tensor:
    raw = reward_fn(list(prompts), list(responses))
    try:
        vals = [float(x) for x in raw]
    except (TypeError, ValueError) as exc:
        raise TypeError(f"reward_fn must return one float per response, got {raw!r} ({exc})") from None
    if len(vals) != len(responses):
        raise ValueError(f"reward_fn returned {len(vals)} scores for {len(responses)} responses; "
                         "return one float per response, in order")
    bad = [i for i, v in enumerate(vals) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"reward_fn returned non-finite scores at rows {bad}: {[vals[i] for i in bad]}")
    return torch.tensor(vals, dtype=torch.float32, device=device)


class PMReward:
    """reward_fn of a preference-model folder, loaded where it is first called: in a data-parallel
    run each rank holds its own PM on its own device (pickled as a path, not as weights)."""

    def __init__(self, pm_dir, device: str | None = None):
        self.pm_dir, self.device, self.pm = str(pm_dir), device, None

    def __getstate__(self):
        return {"pm_dir": self.pm_dir, "device": self.device, "pm": None}

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        if self.pm is None:
            from cai_lib.training.distributed import rank_device
            from cai_lib.training.pm_train import PreferenceModel
            from cai_lib.training.policy import resolve_device
            self.pm = PreferenceModel.load(self.pm_dir, device=str(rank_device(resolve_device(self.device))))
            self.pm.eval()
        return self.pm.score_pairs(prompts, responses).tolist()


def _check_ranks(s: RLSettings, group: Ranks) -> None:
    """Every rank must hold the same number of rollout rows and minibatch rows (their losses are averaged)."""
    for name in ("batch_size", "mini_batch_size"):
        if getattr(s, name) % group.world:
            raise ValueError(f"RLSettings.{name} {getattr(s, name)} does not split evenly over {group.world} "
                             f"processes: pass a multiple of --num-processes")


def train_ppo(policy_dir, prompts: Sequence[str], reward_fn: RewardFn, settings: RLSettings | None = None,
              out_dir="rl_policy", on_step: OnStep | None = None) -> RLResult:
    """PPO of the policy in `policy_dir` (a model folder or 'default') against `reward_fn`.

    reward_fn(prompts, responses) -> one float per response. on_step(step, metrics) is
    called after each iteration with PPO_METRICS (reward_mean = the raw score; kl_mean = the
    rollout's mean sequence KL to the reference, k1 estimate; beta = the one its rewards used;
    loss values averaged over the updates; response_len_mean in tokens without the EOS;
    refusal_rate and boilerplate_rate of the sampled responses: the Goodhart watch).
    Data-parallel (cai_lib.training.distributed): each rank samples its share of every
    iteration's prompts with its own seed, scores them with its own reward_fn, keeps its own
    reference, and the gradients are averaged; metrics are the mean of the ranks' values.
    With checkpoint_every > 0 a killed run resumes from its last checkpoint (policy, value head,
    optimizer, KL coefficient, minibatch order, RNGs; cai_lib.training.checkpoint).
    """
    s = check_settings(settings or RLSettings(), "ppo")
    prompts = text_list(prompts, "prompts")
    if not callable(reward_fn):
        raise TypeError(f"reward_fn must be callable (prompts, responses) -> list[float], got {type(reward_fn).__name__}")
    group = ranks()
    _check_ranks(s, group)
    start = time.perf_counter()
    run = _PPORun.start(policy_dir, s, group)
    tokenizer, policy = run.tokenizer, run.policy
    rendered = [render_chat(tokenizer, p) for p in prompts]
    keep = [i for i, r in enumerate(rendered)
            if len(tokenizer(r, add_special_tokens=False).input_ids) <= s.max_prompt_tokens]
    if not keep:
        raise ValueError(f"all {len(prompts)} prompts are longer than max_prompt_tokens={s.max_prompt_tokens} "
                         "once rendered with the chat template; raise max_prompt_tokens")
    result = RLResult("ppo", Path(out_dir), prompts_dropped=len(prompts) - len(keep),
                      device=str(module_device(policy)))
    reward = {"reward_model": reward_fn.pm_dir} if isinstance(reward_fn, PMReward) else {}
    fp = fingerprint("ppo", s, prompts, policy_dir, group.world, **reward) if s.checkpoint_every else {}
    ckpt = Checkpointer(s, fp, group)
    resume = run.resume(ckpt)   # after start(): the reference is the starting policy
    result.metrics, result.resumed_from_step = list(resume.history), resume.step
    batches = prompt_batches(len(keep), s.batch_size, s.steps, s.seed)
    for step in range(resume.step, len(batches)):   # rollout seeds are a function of the step
        idx = [keep[i] for i in group.shard(batches[step])]   # this rank's share of the iteration's prompts
        metrics = run.iteration(step, [prompts[i] for i in idx], [rendered[i] for i in idx], reward_fn)
        record_step(result, step, metrics, on_step, group)
        run.checkpoint(ckpt, step + 1, result.metrics)
    return finish(result, policy, tokenizer, out_dir, start, group)


@dataclass
class _Update:
    """What one PPO update leaves for the iteration's metrics (and for bench/gpu_check.py to check)."""
    roll: _Rollout
    score: Tensor           # [B] reward_fn's scores, on the policy's device
    old_logprobs: Tensor    # [B, N] before the update
    ref_logprobs: Tensor    # [B, N] under the frozen reference
    beta: float             # the KL coefficient the rewards used
    logs: list[dict]        # per minibatch update: policy_loss, value_loss, approx_kl, clip_fraction


@dataclass
class _PPORun:
    """What one PPO iteration needs: the models, optimizer, KL controller and minibatch order."""
    s: RLSettings
    tokenizer: object
    policy: torch.nn.Module
    ref: torch.nn.Module
    value_head: ValueHead
    params: list
    optimizer: torch.optim.Optimizer
    kl_ctl: object
    shuffle: torch.Generator
    group: Ranks

    @classmethod
    def start(cls, policy_dir, s: RLSettings, group: Ranks) -> "_PPORun":
        """The policy (load_policy: float32, on s.device), its frozen reference, a fresh value head,
        the optimizer and the KL controller."""
        tokenizer, policy = load_policy(policy_dir, s, "ppo")
        # Frozen by use, not by flag: it only ever runs under no_grad and is not in the optimizer.
        # requires_grad_(False) would send its matmuls down another CPU kernel path, and the
        # step-0 KL would read ~1e-5 instead of exactly 0.
        ref = copy.deepcopy(policy)
        # drawn on the CPU (seeded by load_policy's manual_seed), then moved: the same head on every device
        value_head = ValueHead(policy.config.hidden_size).to(module_device(policy))
        params = [p for p in policy.parameters() if p.requires_grad] + list(value_head.parameters())
        group.broadcast_(params)
        optimizer = make_optimizer(params, s)
        kl_ctl = (FixedKLController(s.kl_beta) if s.kl_mode == "fixed"
                  else AdaptiveKLController(s.kl_beta, s.kl_target, s.kl_horizon))
        return cls(s, tokenizer, policy, ref, value_head, params, optimizer, kl_ctl,
                   torch.Generator().manual_seed(s.seed), group)

    def trained(self) -> dict[str, Tensor]:
        """The named tensors a checkpoint keeps: the policy's and the value head's."""
        return {**{f"policy.{n}": p for n, p in self.policy.named_parameters() if p.requires_grad},
                **{f"value_head.{n}": p for n, p in self.value_head.named_parameters()}}

    def resume(self, ckpt: Checkpointer) -> Resume:
        """The latest checkpoint's weights, optimizer and RNGs, its KL coefficient and minibatch order."""
        resume = ckpt.restore(self.trained(), self.optimizer)
        if resume.step:
            self.kl_ctl.value = float(resume.position["kl_beta"])
            self.shuffle.set_state(torch.tensor(resume.position["minibatch_order_state"], dtype=torch.uint8))
        return resume

    def checkpoint(self, ckpt: Checkpointer, step: int, history: list) -> None:
        ckpt.save(step, self.trained(), self.optimizer, history, {
            "iterations_done": step, "seed": self.s.seed, "kl_beta": self.kl_ctl.value,
            "minibatch_order_state": self.shuffle.get_state().tolist()})

    def update(self, step: int, prompts: list[str], rendered: list[str], reward_fn: RewardFn) -> _Update:
        """Rollout, score, KL-penalised rewards, GAE, `ppo_epochs` of minibatch updates."""
        s, group = self.s, self.group
        roll = _rollout(self.policy, self.tokenizer, rendered, s,
                        derive_seed(rank_seed(s.seed, group), "ppo-rollout", step))
        mask = roll.mask
        with torch.no_grad():
            old_logprobs, old_values = _forward(self.policy, roll, s.temperature, self.value_head)
            ref_logprobs, _ = _forward(self.ref, roll, s.temperature)
        score = _scores(reward_fn, prompts, roll.texts, mask.device)
        beta = self.kl_ctl.value
        rewards = kl_penalised_rewards(score, old_logprobs, ref_logprobs, mask, beta)
        advantages, returns = gae(rewards, old_values, mask, gamma=s.gamma, lam=s.lam)
        if s.whiten_advantages:
            advantages = _whiten(advantages, mask, group)
        logs = self._updates(roll, old_logprobs, old_values, advantages, returns)
        return _Update(roll, score, old_logprobs, ref_logprobs, beta, logs)

    def iteration(self, step: int, prompts: list[str], rendered: list[str], reward_fn: RewardFn) -> dict:
        """One update, then the metrics: the KL controller's step and the Goodhart watch on the texts."""
        # here, not at the top: signals imports pandas, and bench/gpu_check.py runs `update` without it
        from cai_lib.quality.signals import boilerplate_rate, is_refusal

        group, t0 = self.group, time.perf_counter()
        u = self.update(step, prompts, rendered, reward_fn)
        roll, mask = u.roll, u.roll.mask
        kl_seq = ((u.old_logprobs - u.ref_logprobs) * mask).sum(1)
        kl_mean = group.sum_(kl_seq.mean().item())[0] / group.world   # equal shares: the mean of means
        self.kl_ctl.update(kl_mean, n_steps=len(prompts) * group.world)
        n_content = mask.sum(1) - roll.ended.long()
        local = {
            "reward_mean": u.score.mean().item(), "reward_std": u.score.std(unbiased=False).item(),
            "kl_mean": kl_seq.mean().item(), "beta": u.beta,
            **{k: sum(d[k] for d in u.logs) / len(u.logs) for k in u.logs[0]},
            "response_len_mean": n_content.float().mean().item(),
            "empty_rate": (n_content == 0).float().mean().item(),
            "truncated_rate": (~roll.ended).float().mean().item(),
            "refusal_rate": sum(map(is_refusal, roll.texts)) / len(roll.texts),
            "boilerplate_rate": boilerplate_rate(roll.texts)[0],
            "seconds": time.perf_counter() - t0,
        }
        return dict(zip(local, (v / group.world for v in group.sum_(*local.values()))))

    def _updates(self, roll, old_logprobs, old_values, advantages, returns) -> list[dict]:
        s, mask, logs = self.s, roll.mask, []
        targets = Targets(old_logprobs, old_values, advantages, returns, mask)
        clip = Clip(s.clip_range, s.clip_range_value, s.vf_coef)
        for _ in range(s.ppo_epochs):
            # the order is drawn on the CPU (the same on every device), the rows indexed where the tensors are
            rows_all = torch.randperm(len(roll.texts), generator=self.shuffle).to(mask.device)
            for rows in rows_all.split(s.mini_batch_size // self.group.world):
                logprobs, values = _forward(self.policy, roll.rows(rows), s.temperature, self.value_head)
                out = ppo_losses(logprobs, values, targets.rows(rows), clip)
                step_update(self.optimizer, self.params, out["loss"], s, self.group)
                logs.append({k: out[k].item() for k in ("policy_loss", "value_loss", "approx_kl", "clip_fraction")})
        return logs


def _whiten(advantages: Tensor, mask: Tensor, group: Ranks) -> Tensor:
    """`whiten` over the real tokens of the whole rollout, all ranks' rows together."""
    if group.world == 1:
        return whiten(advantages, mask)
    m = mask.to(advantages.dtype)
    total, count = group.sum_((advantages * m).sum().item(), m.sum().item())
    mean = total / count
    var = group.sum_((((advantages - mean) ** 2) * m).sum().item())[0] / count
    return (advantages - mean) * (var + 1e-8) ** -0.5 * m
