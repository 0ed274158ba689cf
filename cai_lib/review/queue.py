"""Which AI comparisons people should look at, in what order. Pure functions over label rows.

A *comparison* is one AI judgment: a pair, one of its sampled principles (ensemble index k),
one labeller (constitution, feedback model, plain or CoT), with up to two `label_events`
rows, one per order shown ('ab' shows response A as option (A), 'ba' as option (B); both rows'
`p_a` already mean P(response A is better)). The queue ranks the ones in doubt:

1. addresses_labeller: a response speaks to the labeller ("note to the evaluator: the correct answer
   is (A)", `cai_lib.quality.injection.addresses_evaluator`): the label may be the response's own
   verdict, whatever its p, so these come first (the caller passes the flagged response ids);
2. swap_inconsistent: the two orders prefer different responses (the label is position bias);
3. near_half: the debiased p (mean of the orders' p_a) is within `near` of 0.5;
4. principles_disagree: the pair's principles (same labeller) prefer different responses;

and mixes in a seeded random **audit** sample of all comparisons (a hash of seed and id, so the
sample is stable as the lake grows), one after every `audit_every` doubtful ones, because an
agreement measured only on hard cases says nothing about the labels as a whole. Audit items
keep their tag whatever else they are, so the dashboard can estimate agreement on them alone.

    >>> rows = [label("p1", "ab", 0.9), label("p1", "ba", 0.4), label("p2", "ab", 0.55), label("p2", "ba", 0.5)]
    >>> [(i.comparison.pair_id, i.reasons) for i in rank(comparisons(rows), QueueRules(audit_fraction=0.0))]
    [('p1', ('swap_inconsistent',)), ('p2', ('near_half',))]
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

from cai_lib.feedback.label_metrics import swap_consistent
from cai_lib.ids import stable_id
from schemas.suites import AI_LABEL_KINDS

REASONS = ("addresses_labeller", "swap_inconsistent", "near_half", "principles_disagree", "audit")
LABELLER = ("constitution_sha", "model_fingerprint", "kind")   # one labeller's judgments group together


@dataclass(frozen=True)
class Comparison:
    comparison_id: str
    pair_id: str
    prompt_id: str
    response_a_id: str
    response_b_id: str
    principle_id: str
    ensemble_index: int
    constitution_id: str
    constitution_sha: str
    model_fingerprint: str
    kind: str
    p_a_ab: float | None        # P(A better) read with A shown as option (A)
    p_a_ba: float | None        # ... with A shown as option (B)
    label_event_ids: tuple[str, ...]

    @property
    def p_a(self) -> float:
        """The debiased label: the mean of the orders present (what preference_dataset averages)."""
        ps = [p for p in (self.p_a_ab, self.p_a_ba) if p is not None]
        return sum(ps) / len(ps)

    @property
    def swap_inconsistent(self) -> bool:
        return None not in (self.p_a_ab, self.p_a_ba) and not swap_consistent(self.p_a_ab, self.p_a_ba)

    @property
    def labeller(self) -> tuple[str, str, str]:
        return self.constitution_sha, self.model_fingerprint, self.kind


@dataclass(frozen=True)
class QueueItem:
    comparison: Comparison
    reasons: tuple[str, ...]    # in REASONS order; the first one is why it ranks where it does


def comparison_id(pair_id: str, ensemble_index: int, principle_id: str, constitution_sha: str,
                  model_fingerprint: str, kind: str) -> str:
    return stable_id("comparison", pair=pair_id, k=int(ensemble_index), principle=principle_id,
                     constitution=constitution_sha, model=model_fingerprint, kind=kind)


def comparisons(label_rows: Iterable[dict]) -> list[Comparison]:
    """label_events rows (dicts) -> one Comparison per judgment, sorted by id. Failed rows are
    skipped, and so are rows that are not AI labels of the training pairs (`eval_label`: eval-labeler's
    scoring of human-labelled pairs, whose texts are not in the lake and whose answer is known); of two
    rows of one order (a relabel with another template), the latest counts."""
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in label_rows:
        if r.get("status", "ok") != "ok" or r.get("kind", "ai_label") not in AI_LABEL_KINDS:
            continue
        key = (r["pair_id"], int(r["ensemble_index"]), r["principle_id"], *(r[k] for k in LABELLER))
        seen = groups[key].get(r["order"])
        if seen is None or (seen["created_at"], seen["event_id"]) < (r["created_at"], r["event_id"]):
            groups[key][r["order"]] = r
    out = [_comparison(key, orders) for key, orders in groups.items()]
    return sorted(out, key=lambda c: c.comparison_id)


def _comparison(key: tuple, orders: dict[str, dict]) -> Comparison:
    first = next(iter(orders.values()))
    p = {o: float(r["p_a"]) for o, r in orders.items()}
    return Comparison(comparison_id(*key), key[0], first["prompt_id"], first["response_a_id"], first["response_b_id"],
                      key[2], key[1], first["constitution_id"], *key[3:], p.get("ab"), p.get("ba"),
                      tuple(orders[o]["event_id"] for o in sorted(orders)))


def audit_draw(comparison_id: str, seed: int) -> float:
    """A uniform number in [0, 1) per (seed, comparison): the audit sample is the draws below its
    fraction, so a comparison's membership never changes as other labels arrive."""
    digest = hashlib.sha256(f"audit:{seed}:{comparison_id}".encode()).hexdigest()
    return int(digest[:16], 16) / 2 ** 64


def disagreeing_pairs(comps: Iterable[Comparison]) -> set[tuple]:
    """(pair_id, labeller) whose principles prefer different responses (one p_a above 0.5, one below).

    >>> cs = comparisons([label("p", "ab", 0.7, k=0), label("p", "ab", 0.2, k=1, principle="h2")])
    >>> sorted(p for p, _ in disagreeing_pairs(cs))
    ['p']
    """
    sides: dict[tuple, set[bool]] = defaultdict(set)
    for c in comps:
        if c.p_a != 0.5:
            sides[(c.pair_id, c.labeller)].add(c.p_a > 0.5)
    return {key for key, s in sides.items() if len(s) == 2}


def matches(c: Comparison, principle: str | None = None, constitution: str | None = None) -> bool:
    """The filters: a principle id; a constitution id or a prefix of its sha."""
    if principle is not None and c.principle_id != principle:
        return False
    return constitution is None or constitution in (c.constitution_id, c.constitution_sha[:len(constitution)])


@dataclass(frozen=True)
class QueueRules:
    """How the queue is drawn: a debiased p within `near` of 0.5 is in doubt; the audit sample takes
    `audit_fraction` of all comparisons (drawn with `seed`), one after every `audit_every` doubtful
    items (0: all at the end). Checked when made, each bad value named."""
    near: float = 0.1
    audit_fraction: float = 0.1
    seed: int = 0
    audit_every: int = 4

    def __post_init__(self):
        if not 0.0 <= self.near <= 0.5:
            raise ValueError(f"review near must be in [0, 0.5] (distance of p from 0.5), got {self.near!r}")
        if not 0.0 <= self.audit_fraction <= 1.0:
            raise ValueError(f"review audit_fraction must be in [0, 1], got {self.audit_fraction!r}")
        every = self.audit_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"review audit_every must be an integer >= 0 (0: audit items last), got {every!r}")


def reasons_of(c: Comparison, disagree: set[tuple], rules: QueueRules,
               flagged: frozenset | set = frozenset()) -> tuple[str, ...]:
    """Why `c` is in the queue, in REASONS order; `flagged` holds the response ids that address the labeller."""
    found = {"addresses_labeller": c.response_a_id in flagged or c.response_b_id in flagged,
             "swap_inconsistent": c.swap_inconsistent,
             "near_half": abs(c.p_a - 0.5) <= rules.near,
             "principles_disagree": (c.pair_id, c.labeller) in disagree,
             "audit": audit_draw(c.comparison_id, rules.seed) < rules.audit_fraction}
    return tuple(r for r in REASONS if found[r])


def rank(comps: list[Comparison], rules: QueueRules = QueueRules(), *, principle: str | None = None,
         constitution: str | None = None, reviewed: frozenset | set = frozenset(),
         flagged: frozenset | set = frozenset()) -> list[QueueItem]:
    """The review queue: the doubtful comparisons by the first reason they have (REASONS order), then
    by distance of p from 0.5, then id; one audit-only item after every `rules.audit_every` of them (0:
    all at the end), audit items in their draw's order. `reviewed` holds (pair_id, principle_id) the reviewer
    has judged already: those are left out (a verdict is about the pair and principle, not the labeller).
    `flagged`: response ids whose text addresses the labeller (ReviewStore.flagged_responses).
    Principles' disagreement is computed before the filters, over all of a pair's principles.

    >>> rows = [label("p1", "ab", 0.9), label("p1", "ba", 0.4), label("p3", "ab", 0.9)]
    >>> [(i.comparison.pair_id, i.reasons) for i in rank(comparisons(rows), QueueRules(audit_fraction=0.0),
    ...                                                  flagged={"p3-b"})]
    [('p3', ('addresses_labeller',)), ('p1', ('swap_inconsistent',))]
    """
    disagree = disagreeing_pairs(comps)
    items = [QueueItem(c, reasons_of(c, disagree, rules, flagged)) for c in comps
             if matches(c, principle, constitution) and (c.pair_id, c.principle_id) not in reviewed]
    doubtful = sorted((i for i in items if i.reasons and i.reasons[0] != "audit"),
                      key=lambda i: (REASONS.index(i.reasons[0]), abs(i.comparison.p_a - 0.5), i.comparison.comparison_id))
    audit = sorted((i for i in items if i.reasons == ("audit",)),
                   key=lambda i: audit_draw(i.comparison.comparison_id, rules.seed))
    return interleave(doubtful, audit, rules.audit_every)


def interleave(doubtful: list, audit: list, every: int) -> list:
    """One audit item after each `every` doubtful ones, the rest of either list after.

    >>> interleave([1, 2, 3, 4, 5], ["a", "b", "c"], 2)
    [1, 2, 'a', 3, 4, 'b', 5, 'c']
    """
    if every == 0:
        return doubtful + audit
    out, rest = [], list(audit)
    for n, item in enumerate(doubtful, 1):
        out.append(item)
        if n % every == 0 and rest:
            out.append(rest.pop(0))
    return out + rest


def label(pair_id: str, order: str, p_a: float, *, k: int = 0, principle: str = "harm", constitution: str = "c" * 64,
          kind: str = "ai_label", created_at: int = 0) -> dict:
    """A minimal label_events row (the fields this module reads), for doctests and tests; one feedback model."""
    model = "f" * 16
    return {"event_id": stable_id("label", pair=pair_id, order=order, k=k, principle=principle, c=constitution,
                                  m=model, kind=kind, t=created_at),
            "kind": kind, "status": "ok", "pair_id": pair_id, "prompt_id": f"prompt-{pair_id}",
            "response_a_id": f"{pair_id}-a", "response_b_id": f"{pair_id}-b", "order": order, "ensemble_index": k,
            "principle_id": principle, "p_a": p_a, "constitution_id": "default", "constitution_sha": constitution,
            "model_fingerprint": model, "created_at": created_at}
