"""The soft-label preference-model loss against hand computations. Pure torch, CPU, fast."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cai_lib.training.pm_loss import pm_accuracy, pm_loss, pm_probabilities


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


R_A = torch.tensor([1.0, -0.5, 3.0])
R_B = torch.tensor([0.0, 1.5, 3.0])
P_A = torch.tensor([0.7, 0.2, 1.0])
# margins 1, -2, 0
HAND = [
    -(0.7 * math.log(_sig(1.0)) + 0.3 * math.log(1.0 - _sig(1.0))),      # 0.613262
    -(0.2 * math.log(_sig(-2.0)) + 0.8 * math.log(1.0 - _sig(-2.0))),    # 0.526928
    -(1.0 * math.log(0.5)),                                              # log 2
]


def test_loss_per_row_matches_hand_computation():
    got = pm_loss(R_A, R_B, P_A, reduction="none")
    assert got.tolist() == pytest.approx(HAND, abs=1e-6)
    assert HAND[0] == pytest.approx(0.6132617, abs=1e-7)
    assert HAND[2] == pytest.approx(math.log(2.0))


def test_reductions_and_weights():
    assert pm_loss(R_A, R_B, P_A).item() == pytest.approx(sum(HAND) / 3, abs=1e-6)
    assert pm_loss(R_A, R_B, P_A, reduction="sum").item() == pytest.approx(sum(HAND), abs=1e-6)
    w = torch.tensor([1.0, 0.0, 3.0])
    weighted = (1.0 * HAND[0] + 3.0 * HAND[2]) / 4.0
    assert pm_loss(R_A, R_B, P_A, weight=w).item() == pytest.approx(weighted, abs=1e-6)
    assert pm_loss(R_A, R_B, P_A, weight=w, reduction="sum").item() == pytest.approx(
        HAND[0] + 3.0 * HAND[2], abs=1e-6)


def test_soft_half_target_with_equal_rewards_has_zero_gradient():
    r_a = torch.tensor([0.3, -1.0], requires_grad=True)
    r_b = torch.tensor([0.3, -1.0], requires_grad=True)
    pm_loss(r_a, r_b, torch.tensor([0.5, 0.5])).backward()
    assert r_a.grad.abs().max().item() == 0.0 and r_b.grad.abs().max().item() == 0.0


def test_gradient_is_sigmoid_margin_minus_target():
    # dL/dm = sigmoid(m) - p: at m = 0, p = 0.7 -> -0.2 (raise r_a), halved by the mean of 2
    r_a = torch.tensor([0.0, 1.0], requires_grad=True)
    r_b = torch.zeros(2, requires_grad=True)
    pm_loss(r_a, r_b, torch.tensor([0.7, 0.7])).backward()
    assert r_a.grad.tolist() == pytest.approx([-0.2 / 2, (_sig(1.0) - 0.7) / 2], abs=1e-6)
    assert r_b.grad.tolist() == pytest.approx((-r_a.grad).tolist(), abs=1e-7)


def test_hard_targets_match_torch_bce():
    g = torch.Generator().manual_seed(0)
    r_a, r_b = torch.randn(32, generator=g), torch.randn(32, generator=g)
    target = torch.randint(0, 2, (32,), generator=g).float()
    want = F.binary_cross_entropy(torch.sigmoid(r_a - r_b), target)
    assert pm_loss(r_a, r_b, target).item() == pytest.approx(want.item(), abs=1e-6)


def test_huge_margins_stay_finite():
    r_a = torch.tensor([1000.0, -1000.0], requires_grad=True)
    loss = pm_loss(r_a, torch.zeros(2), torch.tensor([0.0, 1.0]), reduction="none")
    assert loss.tolist() == pytest.approx([1000.0, 1000.0])        # wrong by a mile, not inf
    loss.sum().backward()
    assert torch.isfinite(r_a.grad).all()


@pytest.mark.parametrize("bad", [1.2, -0.1, float("nan")])
def test_target_outside_unit_interval_raises(bad):
    with pytest.raises(ValueError, match=r"target must hold probabilities in \[0, 1\]"):
        pm_loss(R_A, R_B, torch.tensor([0.5, bad, 0.5]))


def test_boundary_errors_name_the_argument():
    with pytest.raises(ValueError, match="r_a has shape"):
        pm_loss(R_A, R_B[:2], P_A)
    with pytest.raises(ValueError, match="target has shape"):
        pm_loss(R_A, R_B, P_A[:2])
    with pytest.raises(TypeError, match="r_a must be a floating-point"):
        pm_loss(torch.tensor([1, 2, 3]), R_B, P_A)
    with pytest.raises(ValueError, match="weight must be >= 0"):
        pm_loss(R_A, R_B, P_A, weight=torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="weight sums to 0"):
        pm_loss(R_A, R_B, P_A, weight=torch.zeros(3))
    with pytest.raises(ValueError, match="reduction must be one of"):
        pm_loss(R_A, R_B, P_A, reduction="avg")


def test_accuracy_excludes_half_targets_and_counts_reward_ties_wrong():
    r_a = torch.tensor([2.0, 0.0, 1.0, 1.0, 5.0])
    r_b = torch.tensor([1.0, 1.0, 1.0, 2.0, 0.0])
    target = torch.tensor([0.8, 0.0, 1.0, 1.0, 0.5])
    # right (A>B, p>.5), right (B>A, p=0), tie (wrong), wrong (B>A but p=1), skipped (p=.5)
    assert pm_accuracy(r_a, r_b, target) == pytest.approx(2 / 4)
    assert math.isnan(pm_accuracy(r_a, r_b, torch.full((5,), 0.5)))


def test_probabilities_are_sigmoid_of_margin():
    got = pm_probabilities(R_A, R_B)
    assert got.tolist() == pytest.approx([_sig(1.0), _sig(-2.0), 0.5], abs=1e-7)
