"""Preference-model (PM) loss of Constitutional AI: soft-label Bradley-Terry. Pure torch.

The PM gives each response a scalar reward r. P(A better) is modelled as sigmoid(r_A - r_B),
and the loss is the binary cross-entropy of that probability against a target p_A:
soft in [0, 1] for AI harmlessness labels (Bai et al. 2022b train on the feedback model's
probabilities, not on rounded 0/1 labels), hard 0/1 for human helpfulness pairs. Both kinds
go through the same function, optionally weighted per row (e.g. to balance the two sources).

    loss_i = -[p_i * log sigmoid(m_i) + (1 - p_i) * log(1 - sigmoid(m_i))],  m_i = r_A,i - r_B,i
           = softplus(-m_i) + (1 - p_i) * m_i           (the stable form torch computes)

TRL's RewardTrainer only knows margin losses on hard pairs, hence this module.

    python -m pytest -q tests/test_pm_loss.py cai_lib/training/pm_loss.py
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["pm_loss", "pm_probabilities", "pm_accuracy"]

_REDUCTIONS = ("mean", "sum", "none")


# ---------------------------------------------------------------- validation (the edge)

def _rewards(r_a, r_b) -> None:
    for name, r in (("r_a", r_a), ("r_b", r_b)):
        if not isinstance(r, Tensor) or not r.is_floating_point():
            got = r.dtype if isinstance(r, Tensor) else type(r).__name__
            raise TypeError(f"{name} must be a floating-point torch.Tensor of PM rewards, got {got}")
    if r_a.shape != r_b.shape:
        raise ValueError(f"r_a has shape {tuple(r_a.shape)} but r_b has shape {tuple(r_b.shape)}; "
                         "pass one reward per response, one row per pair")
    if r_a.numel() == 0:
        raise ValueError("r_a and r_b are empty; pass at least one pair")


def _target(target, like: Tensor, name: str = "target") -> Tensor:
    if not isinstance(target, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of P(A better), got {type(target).__name__}")
    if target.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(target.shape)} but the rewards have shape "
                         f"{tuple(like.shape)}; pass one p_A per pair")
    target = target.to(like.dtype)
    bad = ~((target >= 0) & (target <= 1))           # also catches NaN
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise ValueError(f"{name} must hold probabilities in [0, 1], got {target.flatten()[i].item()!r} "
                         f"at flat index {i}; soft labels are P(A better), hard labels 0 or 1")
    return target


# ---------------------------------------------------------------- the loss

def pm_loss(r_a: Tensor, r_b: Tensor, target: Tensor, weight: Tensor | None = None,
            reduction: str = "mean") -> Tensor:
    """BCE of sigmoid(r_a - r_b) against p_A = target (soft or hard), computed on the margin
    with `binary_cross_entropy_with_logits`, so huge margins neither overflow nor give NaN.
    `weight` (>= 0, one per row) makes "mean" a weighted mean: sum(w * loss) / sum(w).

    >>> r_a, r_b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    >>> pm_loss(r_a, r_b, torch.tensor([0.7, 0.5]), reduction="none")  # softplus(-m) + (1-p)m
    tensor([0.6133, 0.6931])
    >>> round(pm_loss(torch.tensor([1e4]), torch.tensor([0.0]), torch.tensor([1.0])).item(), 6)
    0.0
    """
    _rewards(r_a, r_b)
    target = _target(target, r_a)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    losses = F.binary_cross_entropy_with_logits(r_a - r_b, target, reduction="none")
    if weight is not None:
        if not isinstance(weight, Tensor) or weight.shape != r_a.shape:
            got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
            raise ValueError(f"weight must be a torch.Tensor shaped like the rewards "
                             f"{tuple(r_a.shape)}, got {got}")
        weight = weight.to(losses.dtype)
        if not (weight >= 0).all():
            raise ValueError("weight must be >= 0 (and not NaN) in every row")
        if reduction == "mean" and weight.sum() <= 0:
            raise ValueError("weight sums to 0: no row would contribute to the mean loss")
        losses = losses * weight
        if reduction == "mean":
            return losses.sum() / weight.sum()
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else losses.mean()


# ---------------------------------------------------------------- evaluation

def pm_probabilities(r_a: Tensor, r_b: Tensor) -> Tensor:
    """The PM's predicted P(A better) = sigmoid(r_a - r_b), for calibration plots
    (feed them to `label_metrics.reliability_curve` with the human outcomes).

    >>> pm_probabilities(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]))
    tensor([0.8808, 0.5000])
    """
    _rewards(r_a, r_b)
    return torch.sigmoid(r_a - r_b)


def pm_accuracy(r_a: Tensor, r_b: Tensor, target: Tensor) -> float:
    """Fraction of pairs whose preferred side (sign of r_a - r_b) agrees with target > 0.5.
    Rows with target == 0.5 say no side is better and are left out; a reward tie
    (r_a == r_b) picks no side, so it counts as wrong. NaN when every target is 0.5.

    >>> pm_accuracy(torch.tensor([1.0, 0.0, 2.0, 1.0]), torch.tensor([0.0, 1.0, 2.0, 0.0]),
    ...             torch.tensor([0.9, 0.0, 1.0, 0.5]))    # right, right, tie (wrong), skipped
    0.6666666666666666
    """
    _rewards(r_a, r_b)
    target = _target(target, r_a)
    decided = target != 0.5
    if not decided.any():
        return float("nan")
    margin = (r_a - r_b)[decided]
    a_better = target[decided] > 0.5
    correct = torch.where(a_better, margin > 0, margin < 0)
    return correct.double().mean().item()
