"""The review dashboard's figures, as pure functions over rows (no lake, no HTML).

Every rate is per principle and constitution version (constitution_sha) with its n and a Wilson 95%
interval (`cai_lib.quality.stats.wilson_interval`), because a share of 4 verdicts is a range, not a number.

- `agreement`: how often a reviewer's verdict names the response the AI label prefers, on the
  **audit** sample only (review rows whose queue_reasons hold "audit"): the doubtful items are
  chosen for the AI being unsure or inconsistent, so agreement on them says little about the
  labels as a whole, while the audit sample is a seeded random draw of all comparisons.
  A verdict is `(reviewer, comparison)`'s latest (a later verdict replaces an earlier one).
  Ties and both_bad name no side: they are left out of n and counted beside it. An AI p of
  exactly 0.5 names no side either: such a verdict counts half (as `label_metrics.accuracy` scores it).
- `swap_consistency`: the share of AI comparisons whose two orders prefer the same response
  (`label_metrics.swap_consistent`; 0.5 agrees with either); comparisons with one order are left out.
- `calibration`: the AI's debiased p, binned, against the reviewers' share of A verdicts on every
  reviewed comparison (A and B verdicts; ties and both_bad left out).
- `gate_timeline`: the gate verdicts (gate_events) per stage in time order.

    >>> r = [review("c1", "A", 0.9), review("c2", "A", 0.8), review("c3", "B", 0.7), review("c4", "B", 0.2)]
    >>> [a] = agreement(r, {e: p for row in r for e, p in row["_p"].items()})
    >>> (a.successes, a.n, a.value)
    (3.0, 4, 0.75)
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Iterable, Mapping

from cai_lib.feedback.label_metrics import reliability_curve, swap_consistent
from cai_lib.quality.stats import wilson_interval

SIDES = ("A", "B")


@dataclass(frozen=True)
class Rate:
    """successes of n, for one principle of one constitution; `left_out` counts what n does not hold."""
    principle_id: str
    constitution_sha: str
    successes: float
    n: int
    left_out: tuple[tuple[str, int], ...] = ()

    @property
    def value(self) -> float | None:
        return self.successes / self.n if self.n else None

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.successes, self.n)


@dataclass(frozen=True)
class GatePoint:
    stage: str
    at: datetime
    passed: bool
    verdict: str          # passed | failed | incomplete | not_promotable | promoted | refused
    event_id: str
    checks: tuple[str, ...] = ()   # the checks that failed or could not run (labels.review_agreement among them)


def latest_verdicts(review_rows: Iterable[dict]) -> list[dict]:
    """Each (reviewer, comparison)'s latest verdict (by verdict_at, then event id), in id order."""
    latest: dict[tuple[str, str], dict] = {}
    for r in review_rows:
        key = (r["reviewer"], r["comparison_id"])
        if key not in latest or (latest[key]["verdict_at"], latest[key]["event_id"]) < (r["verdict_at"], r["event_id"]):
            latest[key] = r
    return sorted(latest.values(), key=lambda r: r["event_id"])


def ai_p(row: dict, label_p: Mapping[str, float]) -> float:
    """The debiased AI p (mean P(A better) of the label rows the reviewer judged)."""
    missing = [e for e in row["label_event_ids"] if e not in label_p]
    if missing or not row["label_event_ids"]:
        raise ValueError(f"review_events {row['event_id']}: label_events lacks {missing or 'any label'} it was "
                         "judging; the lake's label_events and review_events do not belong together")
    return sum(label_p[e] for e in row["label_event_ids"]) / len(row["label_event_ids"])


def agrees(verdict: str, p: float) -> float:
    """1 when an A/B verdict names the AI's side, 0 when the other, 0.5 when the AI has none (p = 0.5).

    >>> agrees("A", 0.7), agrees("A", 0.3), agrees("B", 0.5)
    (1.0, 0.0, 0.5)
    """
    if verdict not in SIDES:
        raise ValueError(f"agreement is about A/B verdicts, got {verdict!r}")
    if p == 0.5:
        return 0.5
    return float((p > 0.5) == (verdict == "A"))


def _rates(groups: dict[tuple[str, str], list[float]], left: dict[tuple[str, str], dict[str, int]],
           zero: tuple[str, ...]) -> list[Rate]:
    """One Rate per group seen (in n or left out), every `zero` count present."""
    keys = sorted(set(groups) | set(left))
    return [Rate(k[0], k[1], float(sum(groups.get(k, []))), len(groups.get(k, [])),
                 tuple(sorted({**dict.fromkeys(zero, 0), **left.get(k, {})}.items()))) for k in keys]


def agreement(review_rows: Iterable[dict], label_p: Mapping[str, float]) -> list[Rate]:
    """AI-vs-reviewer agreement per (principle, constitution sha) on the audit sample (see the module doc)."""
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    left: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in latest_verdicts(review_rows):
        if "audit" not in r["queue_reasons"]:
            continue
        key = (r["principle_id"], r["constitution_sha"])
        if r["verdict"] in SIDES:
            groups[key].append(agrees(r["verdict"], ai_p(r, label_p)))
        else:
            left[key][r["verdict"]] += 1
    return _rates(groups, left, ("tie", "both_bad"))


def agreement_figures(review_rows: Iterable[dict], label_rows: Iterable[dict]) -> dict:
    """What `cai eval-labeler` reports and the labels gate judges: `agreement` over the verdicts whose
    label rows are all among `label_rows` (the labeller being judged), pooled overall and per principle
    (over constitution versions), with Wilson 95% intervals. Ties and both_bad are not in n: they are
    counted beside it (`review_tie`, `review_both_bad`); `review_set_aside` counts the audit verdicts on
    labels not in `label_rows` (another labeller, or labels the gate quarantined).

    >>> r = [review("c1", "A", 0.9), review("c2", "B", 0.8), review("c3", "tie", 0.7), review("c4", "A", 0.6)]
    >>> labels = [{"event_id": f"label-{c}", "p_a": p} for c, p in (("c1", 0.9), ("c2", 0.8), ("c3", 0.7))]
    >>> f = agreement_figures(r, labels)
    >>> (f["review_n"], f["review_agreement"], f["review_tie"], f["review_set_aside"])
    (2, 0.5, 1, 1)
    """
    label_p = {r["event_id"]: r["p_a"] for r in label_rows}
    audit = [r for r in review_rows if "audit" in r["queue_reasons"]]
    mine = [r for r in audit if r["label_event_ids"] and all(e in label_p for e in r["label_event_ids"])]
    rates = agreement(mine, label_p)
    by_principle: dict[str, list[Rate]] = defaultdict(list)
    for rate in rates:
        by_principle[rate.principle_id].append(rate)
    set_aside = len({(r["reviewer"], r["comparison_id"]) for r in audit}) - \
        len({(r["reviewer"], r["comparison_id"]) for r in mine})
    return {**_pooled(rates, "review_"), "review_set_aside": set_aside,
            "review_by_principle": {p: _pooled(rs, "") for p, rs in sorted(by_principle.items())}}


def _pooled(rates: list[Rate], prefix: str) -> dict:
    """The Rates' successes and n summed: agreement (None when n is 0), its Wilson interval, ties, both_bad."""
    k, n = sum(r.successes for r in rates), sum(r.n for r in rates)
    left = {name: sum(dict(r.left_out).get(name, 0) for r in rates) for name in ("tie", "both_bad")}
    return {f"{prefix}n": n, f"{prefix}agreement": k / n if n else None,
            f"{prefix}agreement_ci": list(wilson_interval(k, n)),
            f"{prefix}tie": left["tie"], f"{prefix}both_bad": left["both_bad"]}


def swap_consistency(comparisons: Iterable) -> list[Rate]:
    """Share of comparisons (queue.Comparison) whose two orders agree on the side, per principle and sha."""
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    left: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for c in comparisons:
        key = (c.principle_id, c.constitution_sha)
        if c.p_a_ab is None or c.p_a_ba is None:
            left[key]["one_order"] += 1
        else:
            groups[key].append(float(swap_consistent(c.p_a_ab, c.p_a_ba)))
    return _rates(groups, left, ("one_order",))


def calibration(review_rows: Iterable[dict], label_p: Mapping[str, float], bins: int = 5) -> dict:
    """The AI p binned (equal width on [0, 1]) against the reviewers' share of A, over every reviewed
    comparison's latest A/B verdicts: {"bins": [{lo, hi, mean_prob, frac_positive, count, ci}], "left_out": n}."""
    probs, outcomes, left_out = [], [], 0
    for r in latest_verdicts(review_rows):
        if r["verdict"] not in SIDES:
            left_out += 1
            continue
        probs.append(ai_p(r, label_p))
        outcomes.append(int(r["verdict"] == "A"))
    curve = reliability_curve(probs, outcomes, bins) if probs else []
    for b in curve:
        b["ci"] = wilson_interval(b["frac_positive"] * b["count"], b["count"])
    return {"bins": curve, "left_out": left_out}


def gate_timeline(gate_rows: Iterable[dict]) -> dict[str, list[GatePoint]]:
    """stage -> its verdicts in time order (a missing verdict word reads as passed/failed), each with the
    checks that failed or could not run."""
    out: dict[str, list[GatePoint]] = defaultdict(list)
    for g in gate_rows:
        word = g.get("verdict") or ("passed" if g["passed"] else "failed")
        checks = tuple(sorted({*(g.get("failed_checks") or ()), *(g.get("incomplete_checks") or ())}))
        out[g["stage"]].append(GatePoint(g["stage"], g["created_at"], bool(g["passed"]), word, g["event_id"], checks))
    return {s: sorted(ps, key=lambda p: (p.at, p.event_id)) for s, ps in sorted(out.items())}


def review(comparison_id: str, verdict: str, p: float, *, principle: str = "harm", sha: str = "c" * 64,
           reasons: tuple[str, ...] = ("audit",), reviewer: str = "ann", at: int = 0) -> dict:
    """A minimal review_events row (the fields this module reads) judging one label of p, for doctests and tests;
    `_p` holds that label's p by event id."""
    label_id = f"label-{comparison_id}"
    return {"event_id": f"r-{reviewer}-{comparison_id}-{at}", "reviewer": reviewer, "comparison_id": comparison_id,
            "verdict": verdict, "principle_id": principle, "constitution_sha": sha, "queue_reasons": list(reasons),
            "label_event_ids": [label_id], "verdict_at": at, "_p": {label_id: p}}
