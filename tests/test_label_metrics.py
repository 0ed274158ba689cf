"""Tests for cai_lib.feedback.label_metrics: soft-label math on hand-computed examples (pure, fast).

    python -m pytest -q tests/test_label_metrics.py --doctest-modules cai_lib/feedback/label_metrics.py
"""
import math

import pytest

from cai_lib.feedback.label_metrics import (accuracy, clamp, debias, expected_calibration_error, normalise_choice,
                                            per_group, plot_reliability, position_bias, reliability_curve, summarise,
                                            swap_consistent)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A tiny answer key for calibration, 5 equal-width bins of 0.2:
#   bin [0.0,0.2): 0.15 -> 0          mean_prob 0.15, frac 0.0, |gap| 0.15, count 1
#   bin [0.2,0.4): 0.25 -> 0, 0.35 -> 1   mean_prob 0.30, frac 0.5, |gap| 0.20, count 2
#   bin [0.4,0.6): empty (skipped)
#   bin [0.6,0.8): 0.65 -> 1          mean_prob 0.65, frac 1.0, |gap| 0.35, count 1
#   bin [0.8,1.0]: 0.85 -> 1, 0.95 -> 0   mean_prob 0.90, frac 0.5, |gap| 0.40, count 2
# ECE = (1*0.15 + 2*0.20 + 1*0.35 + 2*0.40) / 6 = 1.70 / 6 = 0.283333...
KEY_P = [0.15, 0.25, 0.35, 0.65, 0.85, 0.95]
KEY_O = [0, 0, 1, 1, 1, 0]


# ---------------------------------------------------------------- one label

def test_normalise_choice_hand_example():
    # P(A) = 0.3 / (0.3 + 0.1) = 0.75
    assert normalise_choice(math.log(0.3), math.log(0.1)) == pytest.approx(0.75)
    assert normalise_choice(math.log(0.1), math.log(0.3)) == pytest.approx(0.25)
    assert normalise_choice(-2.0, -2.0) == 0.5


def test_normalise_choice_is_numerically_stable():
    # exp(1000) overflows; the result must still be exact-ish, not an error or nan
    assert normalise_choice(-1.0, -1001.0) == pytest.approx(1.0)
    assert normalise_choice(-1001.0, -1.0) == pytest.approx(0.0, abs=1e-300)
    assert normalise_choice(-5000.0, -5000.0 + math.log(3)) == pytest.approx(0.25)
    assert normalise_choice(-math.inf, -3.0) == 0.0


@pytest.mark.parametrize("la, lb", [(math.nan, 0.0), (0.0, math.inf), (-math.inf, -math.inf)])
def test_normalise_choice_rejects_non_logprobs(la, lb):
    with pytest.raises(ValueError, match="logprob"):
        normalise_choice(la, lb)


def test_clamp():
    assert [clamp(p) for p in (0.99, 0.01, 0.5, 0.4, 0.6)] == [0.6, 0.4, 0.5, 0.4, 0.6]
    assert clamp(0.9, lo=0.2, hi=0.8) == 0.8
    with pytest.raises(ValueError, match="lo must be <= hi"):
        clamp(0.5, lo=0.7, hi=0.3)
    with pytest.raises(ValueError, match="p must be a probability"):
        clamp(1.5)


def test_debias_hand_examples():
    assert debias(0.8, 0.6) == pytest.approx(0.6)        # (0.8 + (1 - 0.6)) / 2
    assert debias(0.9, 0.9) == pytest.approx(0.5)        # pure position preference cancels
    assert debias(1.0, 0.0) == 1.0                        # A wins in both orders
    assert debias(0.2, 0.7) == pytest.approx(0.25)       # (0.2 + 0.3) / 2
    with pytest.raises(ValueError, match="p_a_shown_ba"):
        debias(0.5, -0.1)


@pytest.mark.parametrize("a, b, expected", [
    (0.7, 0.6, True), (0.3, 0.1, True),               # same side
    (0.7, 0.3, False), (0.49, 0.51, False),           # opposite sides
    (0.5, 0.1, True), (0.9, 0.5, True), (0.5, 0.5, True),   # exactly 0.5 agrees with either
])
def test_swap_consistent(a, b, expected):
    assert swap_consistent(a, b) is expected


def test_position_bias():
    # P(option (A)) over both orders of two pairs: mean 0.75 -> +0.25 (prefers the first)
    assert position_bias([0.9, 0.7, 0.8, 0.6]) == pytest.approx(0.25)
    assert position_bias([0.2, 0.4]) == pytest.approx(-0.2)
    assert position_bias([0.7, 0.3]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match=r"p_shown_a_values\[1\]"):
        position_bias([0.5, 2.0])


# ---------------------------------------------------------------- scoring

def test_accuracy_with_ties():
    assert accuracy([0.9, 0.1], [1, 0]) == 1.0
    assert accuracy([0.9, 0.1], [0, 1]) == 0.0
    assert accuracy([0.5, 0.5], [1, 0]) == 0.5                     # a tie is half right
    assert accuracy([0.9, 0.2, 0.5, 0.6], [1, 0, 1, 0]) == 0.625   # (1 + 1 + 0.5 + 0) / 4


def test_ece_hand_made_key():
    assert expected_calibration_error(KEY_P, KEY_O, bins=5) == pytest.approx(1.7 / 6)


def test_ece_edges():
    assert expected_calibration_error([1.0, 0.0], [1, 0]) == 0.0     # 1.0 in the last bin
    assert expected_calibration_error([0.7] * 10, [1] * 7 + [0] * 3) == pytest.approx(0.0)
    assert expected_calibration_error([1.0, 1.0], [0, 0], bins=1) == 1.0


def test_reliability_curve_bins():
    curve = reliability_curve(KEY_P, KEY_O, bins=5)
    assert [b["count"] for b in curve] == [1, 2, 1, 2]             # the empty bin is skipped
    assert [(b["lo"], b["hi"]) for b in curve] == [(0.0, 0.2), (0.2, 0.4), (0.6, 0.8), (0.8, 1.0)]
    assert [b["mean_prob"] for b in curve] == pytest.approx([0.15, 0.30, 0.65, 0.90])
    assert [b["frac_positive"] for b in curve] == [0.0, 0.5, 1.0, 0.5]
    assert set(curve[0]) == {"lo", "hi", "mean_prob", "frac_positive", "count"}
    # p = 1.0 falls in the last bin; p = 0.0 in the first; a p on an edge opens the next bin
    edges = reliability_curve([0.0, 0.5, 1.0], [0, 1, 1], bins=10)
    assert [(b["lo"], b["count"]) for b in edges] == [(0.0, 1), (0.5, 1), (0.9, 1)]


def test_plot_reliability_writes_png(tmp_path):
    curve = reliability_curve(KEY_P, KEY_O, bins=5)
    out = plot_reliability(curve, tmp_path / "plots" / "rel.png", title="hand key")
    assert out == tmp_path / "plots" / "rel.png"
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    with pytest.raises(ValueError, match="curve is empty"):
        plot_reliability([], tmp_path / "empty.png")


def test_per_group_sorted():
    groups = per_group(["harm", "evasive", "harm", "evasive"], [0.9, 0.5, 0.3, 0.8], [1, 1, 1, 0])
    assert list(groups) == ["evasive", "harm"]
    assert groups["evasive"] == {"n": 2, "accuracy": 0.25, "mean_prob": pytest.approx(0.65)}
    assert groups["harm"] == {"n": 2, "accuracy": 0.5, "mean_prob": pytest.approx(0.6)}
    with pytest.raises(ValueError, match="keys has 1 items"):
        per_group(["a"], [0.5, 0.5], [1, 0])


def test_summarise():
    s = summarise(KEY_P, KEY_O, bins=5)
    assert set(s) == {"n", "accuracy", "ece", "mean_prob", "brier"}
    assert s["n"] == 6
    assert s["accuracy"] == pytest.approx(4 / 6)      # right: 0.15, 0.25, 0.65, 0.85
    assert s["ece"] == pytest.approx(1.7 / 6)
    assert s["mean_prob"] == pytest.approx(3.2 / 6)
    # (0.15^2 + 0.25^2 + 0.65^2 + 0.35^2 + 0.15^2 + 0.95^2) / 6 = 1.555 / 6
    assert s["brier"] == pytest.approx(1.555 / 6)


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("probs, outcomes, match", [
    ([], [], "probs is empty"),
    ([0.5, 0.6], [1], "outcomes has 1 items but probs has 2"),
    ([0.5, 1.2], [1, 0], r"probs\[1\] must be a probability"),
    ([0.5, math.nan], [1, 0], r"probs\[1\]"),
    ([0.5, "0.6"], [1, 0], r"probs\[1\]"),
    ([0.5, 0.6, 0.7], [1, 0, 2], r"outcomes\[2\] must be 0 or 1"),
    ([0.5, 0.6], [1, 0.5], r"outcomes\[1\]"),
])
def test_validation_names_argument_and_index(probs, outcomes, match):
    for fn in (accuracy, expected_calibration_error, reliability_curve, summarise):
        with pytest.raises(ValueError, match=match):
            fn(probs, outcomes)


@pytest.mark.parametrize("bins", [0, -3, 2.5, True])
def test_bins_must_be_positive_int(bins):
    with pytest.raises(ValueError, match="bins must be a positive integer"):
        expected_calibration_error([0.5], [1], bins=bins)
