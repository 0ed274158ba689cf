"""A reviewer's verdict, from what the page showed to what the lake stores. Pure functions.

The page shows a comparison's two responses side by side in an order drawn per reviewer and
comparison (`shown_order`): a fixed order would add the page's own position bias to the
verdicts. The reviewer answers about the sides they saw (first / second); `stored_verdict`
maps that back to the pair's own A and B, which is what `review_events.verdict` holds.

    >>> shown_order("ann", "c1"), shown_order("bob", "c1")
    ('ba', 'ab')
    >>> stored_verdict("first", "ba"), stored_verdict("second", "ba"), stored_verdict("tie", "ba")
    ('B', 'A', 'tie')
"""
from __future__ import annotations

from datetime import datetime

from cai_lib.ids import stable_id
from schemas import REVIEW_EVENTS, VERDICTS

CHOICES = ("first", "second", "tie", "both_bad")   # what the form posts: sides as shown


def shown_order(reviewer: str, comparison_id: str) -> str:
    """'ab' (response A shown first) or 'ba', from a hash of reviewer and comparison: fixed for one
    reviewer (a reload shows the same page), independent across comparisons and reviewers."""
    return "ab" if int(stable_id("review_order", reviewer=reviewer, comparison=comparison_id)[:8], 16) % 2 == 0 else "ba"


def stored_verdict(choice: str, order: str) -> str:
    """The verdict about the pair's A and B from the side the reviewer picked on the page."""
    if choice not in CHOICES:
        raise ValueError(f"verdict must be one of {CHOICES}, got {choice!r}")
    if order not in ("ab", "ba"):
        raise ValueError(f"shown order must be 'ab' or 'ba', got {order!r}")
    if choice in ("tie", "both_bad"):
        return choice
    first_is_a = order == "ab"
    return "A" if (choice == "first") == first_is_a else "B"


def review_event_id(reviewer: str, comparison_id: str, verdict_at: datetime) -> str:
    return stable_id("review", reviewer=reviewer, comparison=comparison_id, verdict_at=verdict_at.isoformat())


def review_row(comparison, item_reasons: tuple[str, ...], *, reviewer: str, choice: str, note: str | None,
               verdict_at: datetime, now: datetime, order: str | None = None) -> dict:
    """The review_events row of one verdict on a `queue.Comparison`; `order` is the shown order when the
    page was not this app's (an exported task), else the reviewer's own (`shown_order`)."""
    order = order or shown_order(reviewer, comparison.comparison_id)
    verdict = stored_verdict(choice, order)
    assert verdict in VERDICTS
    row = {"event_id": review_event_id(reviewer, comparison.comparison_id, verdict_at), "kind": "review_verdict",
           "reviewer": reviewer, "verdict": verdict, "note": (note or "").strip() or None,
           "comparison_id": comparison.comparison_id, "pair_id": comparison.pair_id,
           "prompt_id": comparison.prompt_id, "response_a_id": comparison.response_a_id,
           "response_b_id": comparison.response_b_id, "principle_id": comparison.principle_id,
           "ensemble_index": comparison.ensemble_index, "constitution_sha": comparison.constitution_sha,
           "label_event_ids": list(comparison.label_event_ids), "shown_order": order,
           "queue_reasons": list(item_reasons), "verdict_at": verdict_at, "created_at": now}
    assert list(row) == REVIEW_EVENTS.names
    return row
