"""preference_dataset: a pure projection of label events (+ human comparison files).

AI harmlessness pairs: target = mean over principles of the order-debiased p (feedback.aggregate_pair).
Human helpfulness pairs (HH-RLHF format): hard targets; which response is shown as A is a
hash of the pair, so a preference model cannot learn "A wins".
"""
from __future__ import annotations

from typing import Mapping, Sequence

import pyarrow as pa

from cai_lib.feedback.labels import aggregate_pair, conversation_text
from cai_lib.ids import sha256_text, stable_id
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
