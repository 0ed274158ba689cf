"""DPO (Rafailov et al. 2023): the cheaper, offline alternative to PPO, on preference pairs.

Our own ~60 lines rather than TRL's `DPOTrainer`: the job passes a per-pair weight, which TRL
1.16 has no slot for (its `use_weighting` is WPO, a different thing); the reference log-probs
come from the starting policy itself before the first update, so no second model stays in
memory; and the loop is the same plain torch as PPO (`cai_lib.training.ppo`: seeding, threads, saving,
on_step), with no `datasets`/Trainer layer to configure.

    loss = sum_i w_i * -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))_i) / sum_i w_i

where pi_c is the summed log-prob of the chosen response tokens (EOS included) given the
prompt. The policy runs on `settings.device` (`policy.resolve_device`): its batches, the
reference log-probs and the pair weights are put there too. It is saved as a float32
safetensors folder with the tokenizer, all or nothing.

    python -m pytest -q tests/test_rl.py cai_lib/training/dpo.py
"""
from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from cai_lib.training.checkpoint import Checkpointer, fingerprint
from cai_lib.training.distributed import ranks
from cai_lib.training.policy import (OnStep, RLResult, RLSettings, check_settings, load_policy, make_optimizer,
                                     finish, module_device, record_step, render_chat)
from cai_lib.training.ppo_math import logprobs_from_logits

__all__ = ["dpo_loss", "train_dpo", "DPO_METRICS"]

DPO_METRICS = ("loss", "reward_chosen", "reward_rejected", "margin", "accuracy", "pairs", "seconds")


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float) -> tuple[Tensor, Tensor]:
    """Per-pair DPO loss -log sigmoid(margin) and the margin
    beta * ((pi_c - ref_c) - (pi_r - ref_r)), from summed response log-probs [B].

    >>> loss, margin = dpo_loss(*torch.tensor([[-5.0], [-5.0], [-5.0], [-5.0]]), beta=0.1)
    >>> round(loss.item(), 4), margin.item()   # policy == reference: log 2, no preference yet
    (0.6931, 0.0)
    """
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(margin), margin


def _pairs(pairs) -> tuple[list[dict], Tensor]:
    if isinstance(pairs, (str, Mapping)) or not isinstance(pairs, Sequence) or not pairs:
        raise ValueError("pairs must be a non-empty list of {prompt, chosen, rejected[, weight]} dicts")
    rows, weights = [], []
    for i, p in enumerate(pairs):
        if not isinstance(p, Mapping):
            raise TypeError(f"pairs[{i}] must be a dict with prompt, chosen, rejected, got {type(p).__name__}")
        missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(p.get(k), str)]
        if missing or not p["prompt"].strip():
            raise ValueError(f"pairs[{i}] needs str prompt (non-empty), chosen and rejected; bad: {missing or ['prompt']}")
        if p["chosen"] == p["rejected"]:
            raise ValueError(f"pairs[{i}]: chosen and rejected are the same text; drop ties before DPO")
        w = p.get("weight", 1.0)
        w = 1.0 if w is None else float(w)
        if not (math.isfinite(w) and w > 0):
            raise ValueError(f"pairs[{i}]: weight must be a finite number > 0, got {p.get('weight')!r}; "
                             "drop pairs you do not want instead of weighting them 0")
        rows.append(p)
        weights.append(w)
    return rows, torch.tensor(weights)


def _encode(tokenizer, prompt: str, response: str, max_length: int) -> tuple[list[int], int, bool]:
    """Token ids of chat prompt + response + EOS, the prompt's length, and whether it was cut."""
    p = tokenizer(render_chat(tokenizer, prompt), add_special_tokens=False).input_ids
    r = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    cut = len(p) + len(r) > max_length
    if cut:
        r = r[:max(1, max_length - len(p))]
        p = p[len(p) + len(r) - max_length:] if len(p) + len(r) > max_length else p
    return p + r, len(p), cut


def _sequence_logprobs(model, seqs: list[tuple[list[int], int]], pad_id: int) -> Tensor:
    """Summed log-probs of each sequence's response tokens (after its prompt), right-padded batch
    built on the model's device."""
    T, device = max(len(ids) for ids, _ in seqs), module_device(model)
    ids = torch.tensor([i + [pad_id] * (T - len(i)) for i, _ in seqs], device=device)
    attention = torch.tensor([[1] * len(i) + [0] * (T - len(i)) for i, _ in seqs], device=device)
    labels_mask = torch.tensor([[0] * n + [1] * (len(i) - n) + [0] * (T - len(i)) for i, n in seqs],
                               device=device)[:, 1:]
    logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1]
    return (logprobs_from_logits(logits, ids[:, 1:]) * labels_mask).sum(1)


def train_dpo(policy_dir, pairs: Sequence[Mapping], settings: RLSettings | None = None,
              out_dir="rl_policy", on_step: OnStep | None = None) -> RLResult:
    """DPO of the policy in `policy_dir` on pairs {prompt, chosen, rejected[, weight]}.

    One step = `batch_size` pairs of a seeded shuffle (per epoch), run in chunks of
    mini_batch_size; `dpo_epochs` passes, capped by `dpo_max_steps`. on_step(step, metrics)
    gets DPO_METRICS: the step's weighted loss, mean implicit rewards beta * (pi - ref) of
    chosen and rejected, their mean margin, and accuracy = share of pairs with margin > 0
    (all measured before the step's update, so step 0 shows loss log 2 and margin 0).
    Data-parallel (cai_lib.training.distributed): each rank encodes, scores the reference on,
    and trains on only its share of every step's pairs; the gradients are summed. With
    checkpoint_every > 0 a killed run resumes from its last checkpoint (cai_lib.training.checkpoint):
    the reference log-probs are the starting policy's, computed again before the weights are loaded.
    """
    s = check_settings(settings or RLSettings(algorithm="dpo"), "dpo")
    rows, weights = _pairs(pairs)
    start, group = time.perf_counter(), ranks()
    tokenizer, policy = load_policy(policy_dir, s, "dpo")
    device = module_device(policy)
    weights = weights.to(device)   # multiplies the per-pair losses, which are on the policy's device
    named = {name: p for name, p in policy.named_parameters() if p.requires_grad}
    params = list(named.values())
    group.broadcast_(params)
    optimizer = make_optimizer(params, s)
    schedule = _schedule(len(rows), s)
    mine = {i for step in schedule for i in group.shard(step)}   # the pairs this rank ever trains on
    encoded, truncated = _encode_pairs(tokenizer, rows, mine, s.max_length)
    logps = _LogProbs(encoded, tokenizer.pad_token_id)
    ref = logps.reference(policy, s.mini_batch_size)
    truncated = int(group.sum_(truncated)[0])
    result = RLResult("dpo", Path(out_dir), pairs_truncated=truncated, device=str(device))
    chunk_size = math.ceil(s.mini_batch_size / group.world)
    fp = fingerprint("dpo", s, rows, policy_dir, group.world) if s.checkpoint_every else {}
    ckpt = Checkpointer(s, fp, group)
    resume = ckpt.restore(named, optimizer)   # after the reference: it is the starting policy's
    result.metrics, result.resumed_from_step = list(resume.history), resume.step
    for step in range(resume.step, len(schedule)):
        batch = schedule[step]
        t0 = time.perf_counter()
        sums = _dpo_step(policy, logps, ref, group.shard(batch), weights, weights[batch].sum(), chunk_size, s)
        group.sum_grads_(params)
        if s.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss, chosen, rejected, margin, correct = group.sum_(*sums)
        n = len(batch)
        metrics = {"loss": loss, "reward_chosen": chosen / n, "reward_rejected": rejected / n,
                   "margin": margin / n, "accuracy": correct / n, "pairs": float(n),
                   "seconds": time.perf_counter() - t0}
        record_step(result, step, metrics, on_step, group)
        ckpt.save(step + 1, named, optimizer, result.metrics, {"schedule_steps_done": step + 1, "seed": s.seed})
    return finish(result, policy, tokenizer, out_dir, start, group)


def _schedule(n: int, s: RLSettings) -> list[list[int]]:
    """Pair indices per step: a seeded shuffle per epoch cut in batch_size groups, capped by dpo_max_steps."""
    rng = random.Random(s.seed)
    schedule: list[list[int]] = []
    for _ in range(s.dpo_epochs):
        order = list(range(n))
        rng.shuffle(order)
        schedule += [order[i:i + s.batch_size] for i in range(0, len(order), s.batch_size)]
    return schedule[:s.dpo_max_steps]


def _encode_pairs(tokenizer, rows, which, max_length: int) -> tuple[dict, int]:
    """{i: ((chosen ids, prompt len), (rejected ids, prompt len))} for the pairs `which`, and how many were cut."""
    encoded, truncated = {}, 0
    for i in sorted(which):
        c = _encode(tokenizer, rows[i]["prompt"], rows[i]["chosen"], max_length)
        r = _encode(tokenizer, rows[i]["prompt"], rows[i]["rejected"], max_length)
        truncated += c[2] or r[2]
        encoded[i] = (c[:2], r[:2])
    return encoded, truncated


class _LogProbs:
    """Summed response log-probs of encoded pairs under a model."""

    def __init__(self, encoded: dict, pad: int):
        self.encoded, self.pad = encoded, pad

    def __call__(self, model, idx: list[int]) -> tuple[Tensor, Tensor]:
        lp = _sequence_logprobs(model, [self.encoded[i][0] for i in idx] + [self.encoded[i][1] for i in idx],
                                self.pad)
        return lp[:len(idx)], lp[len(idx):]

    @torch.no_grad()
    def reference(self, policy, chunk: int) -> dict:
        """The reference is the starting policy: its log-probs, once, before any update."""
        ref, ids = {}, sorted(self.encoded)
        for j in range(0, len(ids), chunk):
            part = ids[j:j + chunk]
            for i, c, r in zip(part, *self(policy, part)):
                ref[i] = (c, r)
        return ref


def _dpo_step(policy, logps: _LogProbs, ref: dict, batch: list[int], weights: Tensor, total_w: Tensor,
              chunk_size: int, s: RLSettings) -> tuple[float, ...]:
    """Backward over this rank's pairs of a step (the weighted mean over the whole step's weight);
    returns the sums (weighted loss, chosen reward, rejected reward, margin, correct) for the metrics."""
    loss_sum = chosen = rejected = margin_sum = correct = 0.0
    for j in range(0, len(batch), chunk_size):
        chunk = batch[j:j + chunk_size]
        pi_c, pi_r = logps(policy, chunk)
        ref_c = torch.stack([ref[i][0] for i in chunk])
        ref_r = torch.stack([ref[i][1] for i in chunk])
        loss, margin = dpo_loss(pi_c, pi_r, ref_c, ref_r, s.dpo_beta)
        weighted = (weights[chunk] * loss).sum() / total_w
        weighted.backward()   # chunks (and ranks) add up to the weighted mean
        loss_sum += weighted.item()
        chosen += (s.dpo_beta * (pi_c - ref_c)).sum().item()
        rejected += (s.dpo_beta * (pi_r - ref_r)).sum().item()
        margin_sum += margin.sum().item()
        correct += (margin > 0).sum().item()
    return loss_sum, chosen, rejected, margin_sum, correct
