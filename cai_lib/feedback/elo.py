"""Elo ratings from soft pairwise preferences (Bradley-Terry fit, reported on the Elo scale).

Each comparison says P(model i's response beats model j's) = p, a soft win (the feedback
model's order-debiased probability). The Bradley-Terry strengths maximise the likelihood of
those soft outcomes; Elo = anchor + 400 * log10(strength / strength of the anchor model), so
a 100-point gap means the higher model wins about 64% of the time. Order-free and
deterministic, unlike sequential Elo updates.
"""
from __future__ import annotations

import math
from typing import Iterable


def bradley_terry(comparisons: Iterable[tuple[str, str, float]], iters: int = 500, prior: float = 0.5) -> dict[str, float]:
    """Strengths (geometric mean 1) from (i, j, p_i_beats_j) via the minorisation-maximisation updates.

    `prior` adds that many virtual wins to each side of every compared pair, so a model that
    won everything still gets a finite rating.

    >>> s = bradley_terry([("a", "b", 0.75)] * 4)
    >>> round(s["a"] / s["b"], 2)   # (3 + 0.5) / (1 + 0.5): 3:1 odds, pulled toward 1 by the prior
    2.33
    """
    comps = [(i, j, float(p)) for i, j, p in comparisons]
    for i, j, p in comps:
        if not 0.0 <= p <= 1.0 or i == j:
            raise ValueError(f"bad comparison ({i!r}, {j!r}, {p}): need two models and p in [0, 1]")
    models = sorted({m for i, j, _ in comps for m in (i, j)})
    wins = {m: 0.0 for m in models}
    games: dict[tuple[str, str], float] = {}
    for i, j, p in comps:
        wins[i] += p
        wins[j] += 1 - p
        key = (min(i, j), max(i, j))
        games[key] = games.get(key, 0.0) + 1
    for (i, j) in list(games):
        games[(i, j)] += 2 * prior
        wins[i] += prior
        wins[j] += prior
    strength = {m: 1.0 for m in models}
    for _ in range(iters):
        new = {}
        for m in models:
            denom = sum(n / (strength[a] + strength[b]) for (a, b), n in games.items() if m in (a, b))
            new[m] = wins[m] / denom if denom else strength[m]
        norm = math.exp(sum(math.log(v) for v in new.values()) / len(new))
        strength = {m: v / norm for m, v in new.items()}
    return strength


def elo_table(comparisons: Iterable[tuple[str, str, float]], anchor: str, anchor_rating: float = 1000.0) -> dict[str, float]:
    """Elo ratings with `anchor` fixed at `anchor_rating`.

    >>> t = elo_table([("rl", "base", 0.64)] * 10 + [("sl", "base", 0.5)] * 10, anchor="base")
    >>> t["base"], t["sl"], 90 < t["rl"] - 1000 < 100
    (1000.0, 1000.0, True)
    """
    s = bradley_terry(comparisons)
    if anchor not in s:
        raise ValueError(f"anchor {anchor!r} was in no comparison; models: {sorted(s)}")
    return {m: round(anchor_rating + 400 * math.log10(v / s[anchor]), 1) for m, v in s.items()}


def elo_intervals(by_prompt: dict[str, list[tuple[str, str, float]]], anchor: str, *, n_boot: int = 200,
                  level: float = 0.95, seed: int = 0) -> dict[str, list[float]]:
    """95% bootstrap interval of each model's Elo: prompts resampled with replacement (a prompt's
    comparisons stay together), the table refitted on each resample. The anchor's is [1000, 1000].

    >>> iv = elo_intervals({f"p{i}": [("rl", "base", 0.9 if i % 2 else 0.6)] for i in range(20)}, "base")
    >>> iv["base"], iv["rl"][0] > 1000
    ([1000.0, 1000.0], True)
    """
    import random
    prompts = sorted(p for p, comps in by_prompt.items() if comps)
    if not prompts:
        return {}
    rng = random.Random(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(n_boot):
        sample = [c for _ in prompts for c in by_prompt[prompts[rng.randrange(len(prompts))]]]
        try:
            table = elo_table(sample, anchor)
        except ValueError:   # the resample left the anchor out: no table to anchor
            continue
        for m, v in table.items():
            draws.setdefault(m, []).append(v)
    alpha = (1 - level) / 2
    out = {}
    for m, vs in sorted(draws.items()):
        vs.sort()
        out[m] = [round(vs[int(alpha * (len(vs) - 1))], 1), round(vs[int(round((1 - alpha) * (len(vs) - 1)))], 1)]
    return out
