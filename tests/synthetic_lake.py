"""A clean, model-free lake written through the lake's writer (delta-spark), for quality-gate tests.

24 red-team prompts in 4 categories (one critique/revision round each, one sampled pair,
both label orders) and 12 helpful prompts in 3 categories. Texts are seeded random words,
so nothing recurs across responses and nothing refuses: every data check passes on it, and a
test plants exactly one fault on top. Its labels are random by default (U(0.3, 0.7) per order:
no information, ~50% swap consistency), so the labeller checks block promotion; pass
`p_shown=informative()` for labels that agree across the A/B swap.
"""
from __future__ import annotations

import random
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from cai_lib.ids import stable_id
from schemas import GENERATION_EVENTS, LABEL_EVENTS, PREFERENCE_DATASET, PROMPTS, SL_DATASET

try:
    from tests.lakes import cached, key_of, writer
except ImportError:   # imported as `synthetic_lake` (tests/ on sys.path)
    from lakes import cached, key_of, writer

WORDS = ("apple river window garden yellow music bridge winter candle forest market silver paper ocean "
         "travel pencil shadow mountain kitchen harbor lantern meadow rocket violin basket thunder valley "
         "copper blanket island ticket mirror planet feather orchard velvet canyon pepper marble saddle "
         "tunnel harvest cotton engine glacier puzzle ribbon quartz lemon anchor cactus dragon ember falcon "
         "gravel hammock iris jungle kettle ladder magnet nectar oyster pebble quilt raven spruce tulip "
         "umbrella vessel walnut yarn zephyr bamboo compass dolphin easel fossil goblet hazel igloo jasmine").split()
RED = ("violence", "privacy", "fraud", "self_harm")
HELPFUL = ("cooking", "travel", "health")
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
CONST = {"constitution_id": "default", "constitution_sha": "c" * 64, "model_id": "default",
         "model_fingerprint": "f" * 16, "backend": "transformers", "template_sha": "t" * 16}


def text(rng: random.Random, sentences: int = 3, words: int = 10) -> str:
    return " ".join(" ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "." for _ in range(sentences))


def gen_row(kind: str, prompt_id: str, body: str, parent: str | None = None, rnd: int = 0, **kw) -> dict:
    eid = stable_id("gen", kind=kind, prompt=prompt_id, parent=parent or "", round=rnd)
    return {"event_id": eid, "kind": kind, "status": "ok", "target_event_id": eid, "attempt": 1,
            "prompt_id": prompt_id, "parent_id": parent, "round": rnd, "principle_id": kw.get("principle"),
            **CONST, "sampling": "{}", "seed": 1, "text": body, "finish_reason": "stop", "prompt_tokens": 10,
            "completion_tokens": 30, "latency_ms": 1.0, "error": None, "job_run_id": "synthetic", "created_at": NOW}


def label_row(pair: dict, order: str, p_shown_a: float, kind: str = "ai_label") -> dict:
    return {"event_id": stable_id("label", pair=pair["pair_id"], order=order, kind=kind), "kind": kind, "status": "ok",
            "pair_id": pair["pair_id"], "prompt_id": pair["prompt_id"], "response_a_id": pair["a"],
            "response_b_id": pair["b"], "order": order, "ensemble_index": 0, "principle_id": "harm",
            "logprob_shown_a": -1.0, "logprob_shown_b": -1.0, "p_shown_a": p_shown_a,
            "p_a": p_shown_a if order == "ab" else 1 - p_shown_a, "cot_event_id": None,
            **CONST, "job_run_id": "synthetic", "created_at": NOW}


def informative(strength: float = 0.25):
    """p_shown for a labeller that knows which response it prefers: per pair P(A better) is
    0.5 +- strength (the side drawn per pair), the same in both orders (so every pair is
    swap-consistent and p_a has spread), and neither position is favoured on average."""
    state: dict = {}

    def p_shown(rng: random.Random, order: str) -> float:
        if order == "ab":
            state["p_a"] = 0.5 + strength * rng.choice((1, -1))
            return state["p_a"]
        return 1 - state["p_a"]   # shown first is response B
    return p_shown


def build_clean_lake(root: Path, seed: int = 7, p_shown=None):
    """`p_shown(rng, order)` overrides the shown-as-A probability of each label (default U(0.3, 0.7)).
    Written with delta-spark (once per session for the same rows, then copied); returns the writer."""
    tables = clean_tables(seed, p_shown)

    def build(folder: Path) -> None:
        lake = writer(folder)
        for name, rows in tables.items():
            (lake.replace if name in ("sl_dataset", "preference_dataset") else lake.insert_new)(name, rows)
    cached(Path(root), key_of(*tables.values()), build)
    return writer(root)


def clean_tables(seed: int = 7, p_shown=None) -> dict[str, pa.Table]:
    """The synthetic lake's rows, table by table (pure)."""
    rng = random.Random(seed)
    p_shown = p_shown or (lambda rng, order: round(rng.uniform(0.3, 0.7), 3))
    prompts, events, sl, labels, prefs = [], [], [], [], []
    for i in range(24 + 12):
        kind = "red_team" if i < 24 else "helpful"
        category = RED[i % 4] if kind == "red_team" else HELPFUL[i % 3]
        body = f"Prompt {i}: " + text(rng, 1)
        pid = stable_id("prompt", kind=kind, text=body)
        prompts.append({"prompt_id": pid, "text": body, "kind": kind, "source": "synthetic", "source_row": i,
                        "source_format": "jsonl", "category": category, "tags": [], "split": "train",
                        "meta": None, "created_at": NOW})
        if kind == "helpful":
            answer = gen_row("helpful_response", pid, text(rng))
            events.append(answer)
            chain, final, principles = [answer["event_id"]], answer, []
        else:
            first = gen_row("initial_response", pid, text(rng))
            critique = gen_row("critique", pid, text(rng, 1), first["event_id"], 1, principle="harm")
            final = gen_row("revision", pid, text(rng), critique["event_id"], 1, principle="harm")
            samples = [gen_row("pair_sample", pid, text(rng), rnd=k) for k in range(2)]
            events += [first, critique, final, *samples]
            chain, principles = [first["event_id"], critique["event_id"], final["event_id"]], ["harm"]
            pair = {"pair_id": stable_id("pair", prompt=pid), "prompt_id": pid,
                    "a": samples[0]["event_id"], "b": samples[1]["event_id"]}
            pair_labels = [label_row(pair, order, p_shown(rng, order)) for order in ("ab", "ba")]
            labels += pair_labels
            prefs.append({"pair_id": pair["pair_id"], "prompt_id": pid, "prompt": body,
                          "response_a": samples[0]["text"], "response_b": samples[1]["text"],
                          "target": sum(r["p_a"] for r in pair_labels) / 2, "source": "ai_harmless",
                          "consistent": None, "n_labels": 2, "label_event_ids": [r["event_id"] for r in pair_labels],
                          "response_a_id": pair["a"], "response_b_id": pair["b"],
                          "constitution_sha": CONST["constitution_sha"],
                          "feedback_model_fingerprint": CONST["model_fingerprint"], "origin": "lake"})
        sl.append({"prompt_id": pid, "prompt": body, "response": final["text"],
                   "source_kind": "revision" if kind == "red_team" else "helpful_response", "category": category,
                   "split": "train", "rounds": len(principles), "final_event_id": final["event_id"],
                   "chain_event_ids": chain, "principle_ids": principles,
                   **{k: CONST[k] for k in ("constitution_sha", "model_id", "model_fingerprint")}})
    return {"prompts": pa.Table.from_pylist(prompts, schema=PROMPTS),
            "generation_events": pa.Table.from_pylist(events, schema=GENERATION_EVENTS),
            "sl_dataset": pa.Table.from_pylist(sl, schema=SL_DATASET),
            "label_events": pa.Table.from_pylist(labels, schema=LABEL_EVENTS),
            "preference_dataset": pa.Table.from_pylist(prefs, schema=PREFERENCE_DATASET)}
