"""Soft AI-feedback labels: normalising, debiasing and scoring them. Pure functions over lists.

A label is p = P(response A is better). The feedback model sees the pair in both orders
('ab' shows A as option (A), 'ba' shows A as option (B)); its log-probs of " (A)"/" (B)"
become a probability (normalise_choice), CoT labels are clamped to [0.4, 0.6] as in the
paper, and the two orders are averaged (debias) because small models prefer whatever is
shown first (position_bias). Scoring against human outcomes (1 = A really better):
accuracy, expected_calibration_error, reliability_curve (+ plot_reliability), summarise.

    python -m pytest -q tests/test_label_metrics.py --doctest-modules cai_lib/feedback/label_metrics.py
"""
from __future__ import annotations

import math
from numbers import Real
from pathlib import Path

__all__ = ["normalise_choice", "clamp", "debias", "swap_consistent", "position_bias",
           "accuracy", "expected_calibration_error", "reliability_curve", "plot_reliability",
           "per_group", "summarise"]


# ---------------------------------------------------------------- validation (the edge)

def _prob(p, name: str) -> float:
    if isinstance(p, bool) or not isinstance(p, Real) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return float(p)


def _probs(probs, name: str = "probs") -> list[float]:
    probs = list(probs)
    if not probs:
        raise ValueError(f"{name} is empty; pass at least one probability")
    for i, p in enumerate(probs):
        _prob(p, f"{name}[{i}]")
    return [float(p) for p in probs]


def _check(probs, outcomes) -> tuple[list[float], list[int]]:
    probs, outcomes = _probs(probs), list(outcomes)
    if len(outcomes) != len(probs):
        raise ValueError(f"outcomes has {len(outcomes)} items but probs has {len(probs)}; "
                         "pass one outcome per probability")
    for i, o in enumerate(outcomes):
        if isinstance(o, bool) or o not in (0, 1):
            raise ValueError(f"outcomes[{i}] must be 0 or 1 (1 = A really better), got {o!r}")
    return probs, [int(o) for o in outcomes]


def _bins(bins) -> int:
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    return bins


def _mean(xs) -> float:
    return sum(xs) / len(xs)


# ---------------------------------------------------------------- one label

def normalise_choice(logprob_a: float, logprob_b: float) -> float:
    """P(A) from the log-probs of the two choices: a softmax over the two, overflow-free.

    >>> round(normalise_choice(math.log(0.3), math.log(0.1)), 6)
    0.75
    >>> normalise_choice(-1000.0, -1000.0), normalise_choice(0.0, -float("inf"))
    (0.5, 1.0)
    """
    for name, x in (("logprob_a", logprob_a), ("logprob_b", logprob_b)):
        if math.isnan(x) or x == math.inf:
            raise ValueError(f"{name} must be a log-probability (finite or -inf), got {x!r}")
    if logprob_a == logprob_b == -math.inf:
        raise ValueError("logprob_a and logprob_b are both -inf: no probability on either choice")
    d = logprob_b - logprob_a
    if d <= 0:                                   # exp(d) <= 1: cannot overflow
        return 1.0 / (1.0 + math.exp(d))
    e = math.exp(-d)
    return e / (1.0 + e)


def clamp(p: float, lo: float = 0.4, hi: float = 0.6) -> float:
    """Clamp a chain-of-thought label to [lo, hi] (the paper uses 40-60%: CoT labels are
    overconfident, so extreme values are pulled in).

    >>> clamp(0.95), clamp(0.1), clamp(0.55)
    (0.6, 0.4, 0.55)
    """
    p, lo, hi = _prob(p, "p"), _prob(lo, "lo"), _prob(hi, "hi")
    if lo > hi:
        raise ValueError(f"lo must be <= hi, got lo={lo} hi={hi}")
    return min(max(p, lo), hi)


def debias(p_a_shown_ab: float, p_a_shown_ba: float) -> float:
    """P(A better) averaged over both orders. Order 'ab' shows A as option (A): its value is
    P(option A); order 'ba' shows A as option (B): P(A better) = 1 - P(option A).

    >>> round(debias(0.8, 0.6), 12)        # (0.8 + (1 - 0.6)) / 2
    0.6
    >>> debias(0.9, 0.9)        # always picks the first option: no preference left
    0.5
    """
    p_ab, p_ba = _prob(p_a_shown_ab, "p_a_shown_ab"), _prob(p_a_shown_ba, "p_a_shown_ba")
    return (p_ab + (1.0 - p_ba)) / 2.0


def swap_consistent(p_a_from_ab: float, p_a_from_ba: float) -> bool:
    """Do both orders (already mapped to P(A better)) prefer the same response? A value of
    exactly 0.5 is undecided and agrees with either side.

    >>> swap_consistent(0.7, 0.6), swap_consistent(0.7, 0.3), swap_consistent(0.5, 0.1)
    (True, False, True)
    """
    a, b = _prob(p_a_from_ab, "p_a_from_ab"), _prob(p_a_from_ba, "p_a_from_ba")
    return (a - 0.5) * (b - 0.5) >= 0


def position_bias(p_shown_a_values: list[float]) -> float:
    """Mean P(option (A)) over all orders minus 0.5; positive = prefers what is shown first.
    With both orders of every pair included, an unbiased labeller scores 0.

    >>> round(position_bias([0.9, 0.7, 0.8, 0.6]), 12)
    0.25
    """
    return _mean(_probs(p_shown_a_values, "p_shown_a_values")) - 0.5


# ---------------------------------------------------------------- scoring against outcomes

def accuracy(probs: list[float], outcomes: list[int]) -> float:
    """Fraction right; p > 0.5 predicts A, p < 0.5 predicts B, p == 0.5 scores half.

    >>> accuracy([0.9, 0.2, 0.5, 0.6], [1, 0, 1, 0])   # right, right, half, wrong
    0.625
    """
    probs, outcomes = _check(probs, outcomes)
    score = [0.5 if p == 0.5 else float((p > 0.5) == (o == 1)) for p, o in zip(probs, outcomes)]
    return _mean(score)


def _bin_index(p: float, bins: int) -> int:
    return min(int(p * bins), bins - 1)          # [i/bins, (i+1)/bins); p = 1.0 -> last bin


def reliability_curve(probs: list[float], outcomes: list[int], bins: int = 10) -> list[dict]:
    """One dict per non-empty equal-width bin on [0, 1], in order.

    >>> reliability_curve([0.1, 0.15, 0.9], [0, 1, 1], bins=2)  # doctest: +NORMALIZE_WHITESPACE
    [{'lo': 0.0, 'hi': 0.5, 'mean_prob': 0.125, 'frac_positive': 0.5, 'count': 2},
     {'lo': 0.5, 'hi': 1.0, 'mean_prob': 0.9, 'frac_positive': 1.0, 'count': 1}]
    """
    probs, outcomes = _check(probs, outcomes)
    bins = _bins(bins)
    groups: dict[int, list[tuple[float, int]]] = {}
    for p, o in zip(probs, outcomes):
        groups.setdefault(_bin_index(p, bins), []).append((p, o))
    return [{"lo": i / bins, "hi": (i + 1) / bins,
             "mean_prob": _mean([p for p, _ in g]), "frac_positive": _mean([o for _, o in g]),
             "count": len(g)} for i, g in sorted(groups.items())]


def expected_calibration_error(probs: list[float], outcomes: list[int], bins: int = 10) -> float:
    """ECE = sum over non-empty bins of |B|/N * |mean(outcome) - mean(prob)|.

    >>> round(expected_calibration_error([0.1, 0.15, 0.9], [0, 1, 1], bins=2), 6)
    0.283333
    """
    curve = reliability_curve(probs, outcomes, bins)
    n = sum(b["count"] for b in curve)
    return sum(b["count"] / n * abs(b["frac_positive"] - b["mean_prob"]) for b in curve)


def plot_reliability(curve: list[dict], path, title: str = "") -> Path:
    """Write a reliability diagram (PNG) of a reliability_curve; returns the path.

    Bars show the fraction of positives per bin; points sit at the bin's mean probability
    with area proportional to its count; the diagonal is perfect calibration. Uses the Agg
    canvas directly, so no display and no change to the global matplotlib backend.
    """
    if not curve:
        raise ValueError("curve is empty; pass the output of reliability_curve()")
    for i, b in enumerate(curve):
        missing = {"lo", "hi", "mean_prob", "frac_positive", "count"} - set(b)
        if missing:
            raise ValueError(f"curve[{i}] lacks {sorted(missing)}; "
                             "pass the output of reliability_curve()")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(5, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    ax.bar([b["lo"] for b in curve], [b["frac_positive"] for b in curve],
           width=[b["hi"] - b["lo"] for b in curve], align="edge", alpha=0.3,
           edgecolor="tab:blue", label="fraction A better")
    top = max(b["count"] for b in curve)
    ax.scatter([b["mean_prob"] for b in curve], [b["frac_positive"] for b in curve],
               s=[20 + 280 * b["count"] / top for b in curve], color="tab:blue", zorder=3,
               label="bin mean (area ~ count)")
    for b in curve:
        ax.annotate(str(b["count"]), (b["mean_prob"], b["frac_positive"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted P(A better)",
           ylabel="observed fraction A better", title=title or "Reliability")
    ax.legend(loc="upper left", fontsize=8, markerscale=0.5)
    fig.savefig(path, format="png")
    return path


def per_group(keys: list[str], probs: list[float], outcomes: list[int]) -> dict[str, dict]:
    """{key: {"n", "accuracy", "mean_prob"}}, keys in sorted order (e.g. per principle).

    >>> per_group(["b", "a", "b"], [0.9, 0.4, 0.2], [1, 1, 1])  # doctest: +NORMALIZE_WHITESPACE
    {'a': {'n': 1, 'accuracy': 0.0, 'mean_prob': 0.4},
     'b': {'n': 2, 'accuracy': 0.5, 'mean_prob': 0.55}}
    """
    probs, outcomes = _check(probs, outcomes)
    keys = list(keys)
    if len(keys) != len(probs):
        raise ValueError(f"keys has {len(keys)} items but probs has {len(probs)}; "
                         "pass one key per probability")
    for i, k in enumerate(keys):
        if not isinstance(k, str):
            raise ValueError(f"keys[{i}] must be a str, got {type(k).__name__}")
    groups: dict[str, list[tuple[float, int]]] = {}
    for k, p, o in zip(keys, probs, outcomes):
        groups.setdefault(k, []).append((p, o))
    return {k: {"n": len(g), "accuracy": accuracy([p for p, _ in g], [o for _, o in g]),
                "mean_prob": _mean([p for p, _ in g])}
            for k, g in sorted(groups.items())}


def summarise(probs: list[float], outcomes: list[int], bins: int = 10) -> dict:
    """{"n", "accuracy", "ece", "mean_prob", "brier"}; brier = mean (p - outcome)^2.

    >>> s = summarise([0.9, 0.2, 0.5, 0.6], [1, 0, 1, 0])
    >>> s["n"], s["accuracy"], round(s["brier"], 4), round(s["mean_prob"], 4)
    (4, 0.625, 0.165, 0.55)
    """
    probs, outcomes = _check(probs, outcomes)
    return {"n": len(probs), "accuracy": accuracy(probs, outcomes),
            "ece": expected_calibration_error(probs, outcomes, bins),
            "mean_prob": _mean(probs),
            "brier": _mean([(p - o) ** 2 for p, o in zip(probs, outcomes)])}
