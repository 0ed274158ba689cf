"""Intervals for the figures gates and promotion judge: a rate on n items is a range, not a number.

`wilson_interval` for a share of successes (agreement, swap consistency); `bootstrap_interval`
for any statistic of per-item values (calibration error, mean PM score, refusal rates), seeded
so that the same data always gives the same interval; `bootstrap_difference` for "is A better
than B" on paired or unpaired samples. Pure Python, no numpy needed.
"""
from __future__ import annotations

import math
import random
from typing import Callable, Sequence

Z95 = 1.959963984540054   # two-sided 95%


def _z(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    from statistics import NormalDist
    return NormalDist().inv_cdf(0.5 + level / 2)


def wilson_interval(successes: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion (fractional successes allowed: ties count 0.5).

    >>> [round(x, 4) for x in wilson_interval(45, 100)]
    [0.3561, 0.5476]
    >>> wilson_interval(0, 0)
    (0.0, 1.0)
    """
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}], got {successes}")
    z = _z(level)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _percentile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def bootstrap_interval(items: Sequence, statistic: Callable[[list], float], *, n_boot: int = 1000,
                       level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` over `items` (resampled with replacement).

    >>> xs = [0, 1] * 50
    >>> lo, hi = bootstrap_interval(xs, lambda s: sum(s) / len(s), seed=1)
    >>> round(lo, 2), round(hi, 2)
    (0.4, 0.6)
    """
    if not items:
        raise ValueError("bootstrap_interval needs at least one item")
    _z(level)
    rng = random.Random(seed)
    n = len(items)
    stats = sorted(statistic([items[rng.randrange(n)] for _ in range(n)]) for _ in range(n_boot))
    alpha = (1 - level) / 2
    return _percentile(stats, alpha), _percentile(stats, 1 - alpha)


def bootstrap_difference(a: Sequence[float], b: Sequence[float], *, paired: bool, n_boot: int = 1000,
                         level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean(a) - mean(b), interval low, interval high). Paired: a[i] and b[i] are the same item
    (the same prompt answered by two models), resampled together.

    >>> d, lo, hi = bootstrap_difference([1.0] * 20, [0.0] * 20, paired=True)
    >>> d, lo, hi
    (1.0, 1.0, 1.0)
    """
    if not a or not b:
        raise ValueError("bootstrap_difference needs two non-empty samples")
    if paired and len(a) != len(b):
        raise ValueError(f"paired samples must have the same length, got {len(a)} and {len(b)}")
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    diff = mean(a) - mean(b)
    rng = random.Random(seed)
    stats = []
    for _ in range(n_boot):
        if paired:
            idx = [rng.randrange(len(a)) for _ in range(len(a))]
            stats.append(mean([a[i] for i in idx]) - mean([b[i] for i in idx]))
        else:
            stats.append(mean([a[rng.randrange(len(a))] for _ in a]) - mean([b[rng.randrange(len(b))] for _ in b]))
    stats.sort()
    _z(level)
    alpha = (1 - level) / 2
    return diff, _percentile(stats, alpha), _percentile(stats, 1 - alpha)
