"""`review_events`: people's verdicts on the AI's comparisons, as append-only events.

A row is one reviewer's verdict on one comparison (a pair, one principle, one labeller: see
`cai_lib.review.queue`). `verdict` names the responses as the pair stores them (A = the pair's
response_a_id), never the side the page showed them on; `shown_order` keeps that side, so a
reviewer's own position bias can be measured. The id is sha256 of reviewer, comparison and
`verdict_at`, the time the verdict's form was served: one form submitted twice (a double click,
a browser retry) is one event, while a later verdict on the same comparison is a new event
(the latest one stands).
"""
from __future__ import annotations

import pyarrow as pa

UTC_TS = pa.timestamp("us", tz="UTC")


def _f(name: str, typ: pa.DataType, nullable: bool = True, doc: str = "") -> pa.Field:
    """As schemas/tables.py's helper (which imports this module for its registry, so not the reverse)."""
    return pa.field(name, typ, nullable=nullable, metadata={"doc": doc} if doc else None)


VERDICTS = ("A", "B", "tie", "both_bad")

REVIEW_EVENTS = pa.schema([
    _f("event_id", pa.string(), False, "sha256 of reviewer, comparison_id and verdict_at"),
    _f("kind", pa.string(), False, "review_verdict"),
    _f("reviewer", pa.string(), False, "the reviewer's name (from --reviewer or their token)"),
    _f("verdict", pa.string(), False, "A | B | tie | both_bad, A and B as stored in the pair (not as shown)"),
    _f("note", pa.string(), doc="the reviewer's optional free text"),
    _f("comparison_id", pa.string(), False, "sha256 of pair, principle, ensemble index and labeller"),
    _f("pair_id", pa.string(), False),
    _f("prompt_id", pa.string(), False),
    _f("response_a_id", pa.string(), False),
    _f("response_b_id", pa.string(), False),
    _f("principle_id", pa.string(), False),
    _f("ensemble_index", pa.int32(), False),
    _f("constitution_sha", pa.string(), False, "of the AI labels the comparison was queued from"),
    _f("label_event_ids", pa.list_(pa.string()), False, "the AI labels (both orders) the reviewer was judging"),
    _f("shown_order", pa.string(), False, "ab: response A shown first (left); ba: response B shown first"),
    _f("queue_reasons", pa.list_(pa.string()), False, "why it was queued: swap_inconsistent, near_half, "
       "principles_disagree, audit (the seeded random sample: agreement is estimated on these)"),
    _f("verdict_at", UTC_TS, False, "when the verdict's form was served (part of the id)"),
    _f("created_at", UTC_TS, False, "when the verdict reached the server"),
])
