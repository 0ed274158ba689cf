"""Training and evaluating the preference model (PM); the model itself is `cai_lib.training.pm_model`.

A PM scores one (conversation, response) pair with a reward r; P(A better) = sigmoid(r_A - r_B)
is trained with the soft-label loss of `pm_loss` (AI labels are probabilities, human labels
0/1). Text is rendered with the tokenizer's chat template, the response as the final assistant
turn, and cut from the LEFT so the end of the response (what is being judged) always survives.

  render / prompt_turns   (prompt text, response) -> token ids; "Human: ... Assistant: ..." text
                          is parsed back into chat turns
  PreferenceModel         backbone (AutoModel, no LM head) + nn.Linear(hidden, 1); save/load a
                          safetensors-only folder (pickle weight files are refused)
  train_pm                rows of preference_dataset -> trained PM folder + PMResult
  evaluate_pm             human pairs (eval_data.read_hh_pairs) -> accuracy, margin, calibration

    pm_dir = "out/pm"
    result = train_pm("default", rows, PMSettings(max_steps=100), pm_dir)
    pm = PreferenceModel.load(pm_dir)
    pairs, _ = read_hh_pairs("../shared/data/hh-rlhf/harmless-base/test.jsonl.gz", limit=200, seed=0)
    print(evaluate_pm(pm, pairs))

    python -m pytest -q tests/test_pm_train.py cai_lib/training/pm_train.py
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from cai_lib.backends.weights import DTYPE_NAMES, resolve_dtype
from cai_lib.config import check_fields, opt
from cai_lib.feedback.label_metrics import expected_calibration_error, reliability_curve
from cai_lib.ids import split_heldout
from cai_lib.training.checkpoint import Checkpointer, check_checkpoint_fields, dir_field, every_field, fingerprint
from cai_lib.training.distributed import Ranks, rank_device, rank_seed, ranks
from cai_lib.training.pm_loss import pm_accuracy, pm_loss
from cai_lib.training.pm_model import HEAD_FILE, PM_CONFIG, PreferenceModel, check_out_dir, prompt_turns, render
from cai_lib.training.policy import DEVICE_HELP, check_device_name, resolve_device

__all__ = ["PMSettings", "PMResult", "PreferenceModel", "prompt_turns", "render",
           "train_pm", "evaluate_pm", "PM_CONFIG", "HEAD_FILE"]

SOURCE_WEIGHT = {"ai_harmless": "weight_ai", "human_helpful": "weight_human"}


# ---------------------------------------------------------------- training

@dataclass
class PMSettings:
    learning_rate: float = opt(1e-5, "AdamW learning rate of the backbone (small: a 135M model forgets fast)",
                               gt=0.0, hi=1.0)
    head_learning_rate: float = opt(1e-3, "AdamW learning rate of the score head (fresh weights move faster)",
                                    gt=0.0, hi=1.0)
    epochs: int = opt(1, "passes over the training rows", lo=1, hi=10_000)
    max_steps: int | None = opt(None, "stop after this many optimizer steps (None = all epochs)", lo=1)
    batch_size: int = opt(8, "pairs per micro-batch (each pair is 2 sequences)", lo=1, hi=4096)
    grad_accum: int = opt(1, "micro-batches per optimizer step", lo=1, hi=4096)
    max_length: int = opt(512, "tokens per rendered (conversation, response), cut from the left", lo=2, hi=131_072)
    heldout_fraction: float = opt(0.1, "share of pairs held out, chosen by a hash of pair_id", lo=0.0, lt=1.0)
    seed: int = opt(1234, "seeds the head init and the batch order", lo=0)
    torch_threads: int | None = opt(None, "torch.set_num_threads (process-wide); None leaves it alone. On "
                                    "busy shared cores 1 thread ran 10-15x faster than 2", lo=1, hi=1024)
    device: str | None = opt(None, "where the PM trains: " + DEVICE_HELP)
    train_backbone: bool = opt(False, "False = train the head only on cached features (fast)")
    backbone_dtype: str | None = opt(None, "None = float32 when training the backbone (bf16 AdamW "
                                           "updates round away), else what `auto` gives on the device "
                                           "(bf16 on GPUs, float32 on CPUs without bf16 instructions, "
                                           "where emulated bf16 scored 5x slower)", choices=DTYPE_NAMES)
    weight_human: float = opt(1.0, "loss weight of human_helpful rows", lo=0.0)
    weight_ai: float = opt(1.0, "loss weight of ai_harmless rows", lo=0.0)
    weight_decay: float = opt(0.0, "AdamW weight decay", lo=0.0)
    max_grad_norm: float | None = opt(1.0, "clip the gradient norm (None = no clipping)", gt=0.0)
    checkpoint_every: int = every_field()       # cai_lib.training.checkpoint: resume a killed run
    checkpoint_dir: str | None = dir_field()

    def __post_init__(self):
        check_fields(self)   # the bounds above, for settings built in code as for params and flags
        check_device_name(self.device, "PMSettings.device")
        check_checkpoint_fields(self)


@dataclass
class PMResult:
    out_dir: str
    n_train: int
    n_heldout: int
    n_zero_weight: int                   # training rows left out because their source weight is 0
    heldout_loss_before: float | None    # None when nothing is held out
    heldout_loss_after: float | None
    heldout_accuracy_before: float | None
    heldout_accuracy_after: float | None
    steps: int
    seconds: float
    train_losses: list[float] = field(default_factory=list)
    resumed_from_step: int = 0           # the checkpoint's step this run continued from (0 = a fresh start)
    pm: PreferenceModel | None = field(default=None, repr=False, compare=False)  # the trained model, in memory

    def metrics(self) -> dict[str, float]:
        """The scalar results, for MLflow (None values left out)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}   # not asdict: it deep-copies pm
        return {k: float(v) for k, v in values.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _check_rows(rows) -> list[dict]:
    required = ("pair_id", "prompt", "response_a", "response_b", "target", "source")
    out, seen = [], set()
    for i, r in enumerate(rows):
        if not isinstance(r, Mapping):
            raise TypeError(f"rows[{i}] must be a dict, got {type(r).__name__}")
        missing = [k for k in required if k not in r]
        if missing:
            raise ValueError(f"rows[{i}] lacks {missing}; rows are preference_dataset rows")
        for k in ("pair_id", "prompt", "response_a", "response_b"):
            if not isinstance(r[k], str):
                raise ValueError(f"rows[{i}] ({r.get('pair_id')!r}) field {k!r} must be a str, got {type(r[k]).__name__}")
        t = r["target"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
            raise ValueError(f"rows[{i}] ({r['pair_id']!r}) target must be P(A better) in [0, 1], got {t!r}")
        if r["source"] not in SOURCE_WEIGHT:
            raise ValueError(f"rows[{i}] ({r['pair_id']!r}) source must be one of {sorted(SOURCE_WEIGHT)}, "
                             f"got {r['source']!r}")
        if r["pair_id"] in seen:
            raise ValueError(f"rows[{i}] repeats pair_id {r['pair_id']!r}; pair ids must be unique")
        seen.add(r["pair_id"])
        out.append(dict(r))
    if not out:
        raise ValueError("rows is empty; pass the preference_dataset rows to train on")
    return out


def _encoded(pm: PreferenceModel, rows: list[dict]) -> tuple[list, list]:
    a = [render(pm.tokenizer, r["prompt"], r["response_a"], pm.max_length) for r in rows]
    b = [render(pm.tokenizer, r["prompt"], r["response_b"], pm.max_length) for r in rows]
    return a, b


@torch.no_grad()
def _cached_features(pm: PreferenceModel, ids: list, batch_size: int, group: Ranks = Ranks()) -> Tensor:
    """Last-token features of every sequence: each rank computes its share, all ranks get all."""
    pm.eval()
    mine = group.shard(ids)
    parts = [pm.features(*pm.batch(mine[i:i + batch_size])) for i in range(0, len(mine), batch_size)]
    local = torch.cat(parts) if parts else torch.zeros(0, pm.head.in_features, device=pm.device)
    return group.interleave(local, len(ids))


@dataclass
class _PMData:
    """The split, weighted and tokenized rows: train pairs (A and B ids, target, weight) and held-out pairs."""
    train_rows: list[dict]
    held_rows: list[dict]
    n_zero: int                 # training rows left out: their source weight is 0
    target: Tensor
    weight: Tensor
    ids_a: list
    ids_b: list
    held_a: list
    held_b: list
    held_t: Tensor

    @classmethod
    def build(cls, pm: PreferenceModel, rows: list[dict], settings: PMSettings, device) -> "_PMData":
        train_rows, held_rows = split_heldout(rows, settings.heldout_fraction, key=lambda r: str(r["pair_id"]))
        weight_of = {src: getattr(settings, name) for src, name in SOURCE_WEIGHT.items()}
        n_zero = sum(weight_of[r["source"]] == 0 for r in train_rows)
        train_rows = [r for r in train_rows if weight_of[r["source"]] > 0]
        if not train_rows:
            raise ValueError("no training rows left: every row is held out or has source weight 0. "
                             "Fix: pass more rows, lower heldout_fraction or raise weight_ai/weight_human.")
        ids_a, ids_b = _encoded(pm, train_rows)
        held_a, held_b = _encoded(pm, held_rows)
        return cls(train_rows, held_rows, n_zero,
                   torch.tensor([float(r["target"]) for r in train_rows], device=device),
                   torch.tensor([float(weight_of[r["source"]]) for r in train_rows], device=device),
                   ids_a, ids_b, held_a, held_b,
                   torch.tensor([float(r["target"]) for r in held_rows], device=device))

    @property
    def n(self) -> int:
        return len(self.train_rows)


class _BackboneScorer:
    """train_backbone=True: every reward is a forward pass of the whole PM."""

    def __init__(self, pm: PreferenceModel, data: _PMData, settings: PMSettings, group: Ranks):
        self.pm, self.data, self.batch_size = pm, data, settings.batch_size
        pm.backbone.requires_grad_(True)
        self.params = [{"params": list(pm.backbone.parameters()), "lr": settings.learning_rate},
                       {"params": list(pm.head.parameters()), "lr": settings.head_learning_rate}]

    def rewards(self, idx: list[int]) -> tuple[Tensor, Tensor]:
        d = self.data
        r = self.pm(*self.pm.batch([d.ids_a[i] for i in idx] + [d.ids_b[i] for i in idx]))
        return r[:len(idx)], r[len(idx):]

    def held_rewards(self) -> Tensor:
        return self.pm.score_ids(self.data.held_a + self.data.held_b, 2 * self.batch_size).to(self.pm.device)


class _HeadScorer:
    """train_backbone=False: the backbone is frozen, so every sequence's features are computed
    once (shared out over the ranks) and only the head runs per step."""

    def __init__(self, pm: PreferenceModel, data: _PMData, settings: PMSettings, group: Ranks):
        self.pm, self.n = pm, data.n
        pm.backbone.requires_grad_(False)
        self.feats = _cached_features(pm, data.ids_a + data.ids_b + data.held_a + data.held_b,
                                      2 * settings.batch_size, group)
        self.params = [{"params": list(pm.head.parameters()), "lr": settings.head_learning_rate}]

    def rewards(self, idx: list[int]) -> tuple[Tensor, Tensor]:
        r = self.pm.head(self.feats[idx + [self.n + i for i in idx]]).squeeze(-1)
        return r[:len(idx)], r[len(idx):]

    @torch.no_grad()
    def held_rewards(self) -> Tensor:
        return self.pm.head(self.feats[2 * self.n:]).squeeze(-1)


def _heldout(scorer, data: _PMData, group: Ranks) -> tuple[float | None, float | None]:
    """Unweighted held-out loss and accuracy (rank 0 only: the others' numbers are not reported)."""
    if not data.held_rows or not group.main:
        return None, None
    r = scorer.held_rewards()
    r_a, r_b = r[:len(data.held_rows)], r[len(data.held_rows):]
    return pm_loss(r_a, r_b, data.held_t).item(), pm_accuracy(r_a, r_b, data.held_t)


def _total_steps(n: int, settings: PMSettings) -> tuple[int, int]:
    """(optimizer steps per epoch, steps to run)."""
    per_epoch = math.ceil(n / (settings.batch_size * settings.grad_accum))
    total = per_epoch * settings.epochs
    return per_epoch, total if settings.max_steps is None else min(total, settings.max_steps)


def _step_groups(n: int, size: int, gen: torch.Generator):
    """Row indices per optimizer step: a seeded shuffle per epoch, cut in groups of `size`."""
    while True:
        order = torch.randperm(n, generator=gen).tolist()
        for start in range(0, n, size):
            yield order[start:start + size]


def _fit(scorer, data: _PMData, settings: PMSettings, on_step, group: Ranks,
         ckpt: Checkpointer) -> tuple[list[float], int]:
    """The optimizer steps: (the loss of each, the step resumed from). Every rank draws the same
    step groups and runs its share; the loss is the weighted mean over the whole step and the
    gradients are summed over the ranks. With checkpoints on, a run starts from the latest one
    and writes one every checkpoint_every steps (cai_lib.training.checkpoint)."""
    params = [p for g in scorer.params for p in g["params"]]
    named = {name: p for name, p in scorer.pm.named_parameters() if p.requires_grad}
    group.broadcast_(params)   # rank 0's head init (and backbone) on every rank
    optimizer = torch.optim.AdamW(scorer.params, weight_decay=settings.weight_decay)
    per_epoch, total = _total_steps(data.n, settings)
    per_rank = math.ceil(settings.batch_size / group.world)   # the same global batch, split N ways
    gen = torch.Generator().manual_seed(settings.seed)
    resume = ckpt.restore(named, optimizer)
    losses = list(resume.history)
    groups = _step_groups(data.n, settings.batch_size * settings.grad_accum, gen)
    for step, step_idx in zip(range(resume.step, total), itertools.islice(groups, resume.step, None)):
        step_weight = data.weight[step_idx].sum()
        mine, loss_value = group.shard(step_idx), 0.0
        for mb in range(0, len(mine), per_rank):
            idx = mine[mb:mb + per_rank]
            r_a, r_b = scorer.rewards(idx)
            loss = pm_loss(r_a, r_b, data.target[idx], data.weight[idx], reduction="sum") / step_weight
            loss.backward()
            loss_value += loss.item()
        group.sum_grads_(params)
        if settings.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(group.sum_(loss_value)[0])
        if on_step is not None and group.main:
            on_step(step + 1, {"loss": losses[-1], "epoch": (step + 1) / per_epoch})
        ckpt.save(step + 1, named, optimizer, losses, {"step_groups_drawn": step + 1, "seed": settings.seed})
    return losses, resume.step


def train_pm(model_dir: str | Path, rows: Sequence[Mapping], settings: PMSettings, out_dir: str | Path,
             on_step: Callable[[int, dict], None] | None = None) -> PMResult:
    """Train a PM on preference_dataset rows and save it to out_dir.

    Loss: pm_loss of sigmoid(r_A - r_B) vs target, weighted per source, a weighted mean over
    each optimizer step (exact across grad_accum micro-batches and across data-parallel ranks).
    With train_backbone=False the backbone is frozen, so each sequence's last-token features
    are computed once and only the head trains on them. Held-out loss/accuracy are unweighted,
    before and after. Under TorchDistributor (cai_lib.training.distributed) rank 0 alone saves
    and reports; the result then carries no in-memory `pm` (load it from out_dir)."""
    t0 = time.perf_counter()
    if not isinstance(settings, PMSettings):
        raise TypeError(f"settings must be a PMSettings, got {type(settings).__name__}")
    rows = _check_rows(rows)
    out_dir = Path(out_dir)
    check_out_dir(out_dir)                    # fail before training, not after
    if settings.torch_threads:
        torch.set_num_threads(int(settings.torch_threads))
    torch.manual_seed(settings.seed)
    group = ranks()
    device = rank_device(resolve_device(settings.device))   # `device cuda` without a GPU fails before any load
    dtype = settings.backbone_dtype or ("float32" if settings.train_backbone else resolve_dtype("auto", str(device)))
    pm = PreferenceModel.from_backbone(model_dir, dtype=dtype, seed=settings.seed,
                                       max_length=settings.max_length).to(device)
    data = _PMData.build(pm, rows, settings, device)
    scorer = (_BackboneScorer if settings.train_backbone else _HeadScorer)(pm, data, settings, group)
    loss_before, acc_before = _heldout(scorer, data, group)
    if group.world > 1:
        torch.manual_seed(rank_seed(settings.seed, group))   # dropout differs per rank
    pm.train(settings.train_backbone)        # dropout only where the backbone trains
    # a checkpoint continues only the run that wrote it: same settings, rows, base weights and ranks
    fp = fingerprint("pm", settings, rows, model_dir, group.world) if settings.checkpoint_every else {}
    train_losses, resumed = _fit(scorer, data, settings, on_step, group, Checkpointer(settings, fp, group))
    pm.eval()
    pm.backbone.requires_grad_(False)
    loss_after, acc_after = _heldout(scorer, data, group)
    if group.main:   # one writer
        pm.save(out_dir, extra={"base_model": str(model_dir), "settings": asdict(settings)})
    return PMResult(out_dir=str(out_dir), n_train=data.n, n_heldout=len(data.held_rows), n_zero_weight=data.n_zero,
                    heldout_loss_before=loss_before, heldout_loss_after=loss_after,
                    heldout_accuracy_before=acc_before, heldout_accuracy_after=acc_after,
                    steps=len(train_losses), seconds=time.perf_counter() - t0, train_losses=train_losses,
                    resumed_from_step=resumed, pm=pm if group.world == 1 else None)


# ---------------------------------------------------------------- evaluation

def evaluate_pm(pm: PreferenceModel, pairs: Sequence, batch_size: int = 8, bins: int = 10) -> dict:
    """On human pairs (objects with .context turns, .chosen, .rejected, as read_hh_pairs gives):
    accuracy (chosen scored strictly higher), mean margin r_chosen - r_rejected, and the
    calibration of sigmoid(margin) as P(first better), each pair counted in both orders
    ((chosen, rejected) -> outcome 1, (rejected, chosen) -> 0) so the outcomes are not all 1."""
    from cai_lib.feedback.preferences import dialogue_text   # here: preferences imports pyarrow (bench/gpu_check.py)
    pairs = list(pairs)
    if not pairs:
        raise ValueError("pairs is empty; pass HumanPair objects from eval_data.read_hh_pairs")
    for i, p in enumerate(pairs):
        if not all(hasattr(p, k) for k in ("context", "chosen", "rejected")):
            raise TypeError(f"pairs[{i}] needs .context, .chosen and .rejected (a HumanPair), "
                            f"got {type(p).__name__}")
    n = len(pairs)
    prompts = [dialogue_text(p.context) for p in pairs]
    r = pm.score_pairs(prompts * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs], batch_size)
    r_c, r_r = r[:n], r[n:]
    margin = r_c - r_r
    probs = torch.sigmoid(torch.cat([margin, -margin])).double().tolist()
    outcomes = [1] * n + [0] * n
    return {"n": n, "accuracy": pm_accuracy(r_c, r_r, torch.ones(n)),
            "mean_margin": margin.mean().item(),
            "ece": expected_calibration_error(probs, outcomes, bins),
            "brier": sum((p - o) ** 2 for p, o in zip(probs, outcomes)) / (2 * n),
            "reliability": reliability_curve(probs, outcomes, bins)}
