"""preference_dataset: a pure projection of label events (+ human comparison files).

AI harmlessness pairs: target = mean over principles of the order-debiased p (feedback.aggregate_pair).
Human helpfulness pairs (HH-RLHF format): hard targets; which response is shown as A is a
hash of the pair, so a preference model cannot learn "A wins".
Reviewed pairs (`cai label --reviewed-verdicts prefer`): reviewers' verdicts (review_events) replace the
AI target of the pairs they judged (`reviewed_targets`); the row's `origin` then names those events.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import pyarrow as pa

from cai_lib.feedback.labels import aggregate_pair, conversation_text
from cai_lib.ids import sha256_text, stable_id
from cai_lib.review.dashboard import latest_verdicts
from cai_lib.sources.eval_data import read_hh_pairs


def dialogue_text(turns: Sequence[tuple[str, str]]) -> str:
    """[('human', 'hi'), ('assistant', 'yo'), ('human', 'q')] -> 'Human: hi\\n\\nAssistant: yo\\n\\nHuman: q'."""
    return "\n\n".join(f"{'Human' if role == 'human' else 'Assistant'}: {text}" for role, text in turns)


def ai_rows(labels: pa.Table, texts: Mapping[str, str], prompt_text: Mapping[str, str]) -> tuple[list[dict], int]:
    """One row per pair whose every principle has both orders; and how many pairs are incomplete."""
    by_pair: dict[str, list[dict]] = {}
    for r in labels.to_pylist():
        by_pair.setdefault(r["pair_id"], []).append(r)
    rows, incomplete = [], 0
    for pair_id, rs in sorted(by_pair.items()):
        try:
            target, consistent, ids = aggregate_pair(rs)
        except ValueError:
            incomplete += 1  # an order is missing (its scoring was quarantined): reported, not guessed
            continue
        first = rs[0]
        rows.append({
            "pair_id": pair_id, "prompt_id": first["prompt_id"], "prompt": conversation_text(prompt_text[first["prompt_id"]]),
            "response_a": texts[first["response_a_id"]], "response_b": texts[first["response_b_id"]],
            "target": target, "source": "ai_harmless", "consistent": consistent, "n_labels": len(rs),
            "label_event_ids": ids, "response_a_id": first["response_a_id"], "response_b_id": first["response_b_id"],
            "constitution_sha": first["constitution_sha"], "feedback_model_fingerprint": first["model_fingerprint"],
            "origin": "label_events",
        })
    return rows, incomplete


def human_rows(specs: Sequence[Mapping]) -> tuple[list[dict], int]:
    """Rows from HH-RLHF files: [{path, limit, seed}]; returns rows and the count of rejected pairs."""
    rows, rejected = [], 0
    for spec in specs:
        unknown = set(spec) - {"path", "limit", "seed"}
        if "path" not in spec or unknown:
            raise ValueError(f"label.human_pairs entries take path, limit, seed; got {sorted(spec)}")
        pairs, bad = read_hh_pairs(spec["path"], limit=spec.get("limit"), seed=spec.get("seed"))
        rejected += len(bad)
        for p in pairs:
            origin = f"{spec['path']}:{p.row}"
            pair_id = stable_id("human_pair", origin=origin, chosen=sha256_text(p.chosen), rejected=sha256_text(p.rejected))
            chosen_first = int(pair_id[:2], 16) % 2 == 0
            context = dialogue_text(p.context)
            rows.append({
                "pair_id": pair_id, "prompt_id": stable_id("human_context", text=context), "prompt": context,
                "response_a": p.chosen if chosen_first else p.rejected,
                "response_b": p.rejected if chosen_first else p.chosen,
                "target": 1.0 if chosen_first else 0.0, "source": "human_helpful", "consistent": None,
                "n_labels": 1, "label_event_ids": [], "response_a_id": None, "response_b_id": None,
                "constitution_sha": None, "feedback_model_fingerprint": None, "origin": origin,
            })
    return rows, rejected


REVIEWED_VERDICTS = ("ignore", "prefer")   # label.reviewed_verdicts: what reviewers' verdicts do to the targets
VOTE = {"A": 1.0, "B": 0.0, "tie": 0.5}


def reviewed_targets(review_rows: Iterable[dict]) -> tuple[dict[str, tuple[float, str]], dict[str, str]]:
    """The targets reviewers' verdicts give: (pair_id -> (target, origin), pair_id -> origin of the pairs
    dropped). Each reviewer's latest verdict on each comparison is one vote (a later verdict replaces an
    earlier one, `dashboard.latest_verdicts`): A is 1.0, B 0.0, tie 0.5, and the pair's target is the mean
    of its votes, so one reviewer's A is a hard 1.0, two reviewers who disagree (A and B) make 0.5. A
    both_bad vote drops the pair from training: a person said neither response is worth learning toward.
    A verdict is about the pair's responses, whichever labeller's comparison (or principle) it was given on.
    `origin` is "review_events:" and the counted events' ids, comma-joined in order.

    >>> from cai_lib.review.dashboard import review
    >>> t, dropped = reviewed_targets([review("c1", "B", 0.9) | {"pair_id": "p1"},
    ...     review("c1", "A", 0.9, at=1) | {"pair_id": "p1"}, review("c2", "tie", 0.3, reviewer="bob") | {"pair_id": "p1"},
    ...     review("c3", "both_bad", 0.5) | {"pair_id": "p2"}])
    >>> t, dropped
    ({'p1': (0.75, 'review_events:r-ann-c1-1,r-bob-c2-0')}, {'p2': 'review_events:r-ann-c3-0'})
    """
    votes: dict[str, list[dict]] = {}
    for r in latest_verdicts(review_rows):
        votes.setdefault(r["pair_id"], []).append(r)
    targets, dropped = {}, {}
    for pair_id, rs in sorted(votes.items()):
        origin = "review_events:" + ",".join(sorted(r["event_id"] for r in rs))
        if any(r["verdict"] == "both_bad" for r in rs):
            dropped[pair_id] = origin
            continue
        unknown = [r["event_id"] for r in rs if r["verdict"] not in VOTE]
        if unknown:
            raise ValueError(f"review_events {unknown[0]}: verdict is not one of A, B, tie, both_bad")
        targets[pair_id] = (sum(VOTE[r["verdict"]] for r in rs) / len(rs), origin)
    return targets, dropped
