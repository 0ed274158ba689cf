"""Reviewers' verdicts as training targets (cai label --reviewed-verdicts prefer): the pure rule on known
verdicts, and its application to preference_dataset rows in Spark (lineage in `origin`, drops counted)."""
from __future__ import annotations

import pyarrow as pa
import pytest

from cai_lib.feedback.preferences import reviewed_targets
from cai_lib.review.dashboard import review
from schemas import PREFERENCE_DATASET


def on(pair: str, comparison: str, verdict: str, **kw) -> dict:
    return review(comparison, verdict, 0.5, **kw) | {"pair_id": pair}


VERDICTS = [on("p1", "c1", "B"), on("p1", "c1", "A", at=1),               # ann changed her mind: A
            on("p2", "c2", "A"), on("p2", "c2", "B", reviewer="bob"),      # two reviewers disagree
            on("p3", "c3", "tie", reviewer="bob"),
            on("p4", "c4", "A"), on("p4", "c4", "both_bad", reviewer="bob"),   # one says both bad: dropped
            on("p5", "c5", "B", principle="help")]


def test_the_latest_verdict_of_each_reviewer_votes_and_both_bad_drops_the_pair():
    targets, dropped = reviewed_targets(VERDICTS)
    assert targets == {"p1": (1.0, "review_events:r-ann-c1-1"),
                       "p2": (0.5, "review_events:r-ann-c2-0,r-bob-c2-0"),
                       "p3": (0.5, "review_events:r-bob-c3-0"),
                       "p5": (0.0, "review_events:r-ann-c5-0")}
    assert dropped == {"p4": "review_events:r-ann-c4-0,r-bob-c4-0"}
    assert reviewed_targets([]) == ({}, {})
    with pytest.raises(ValueError, match="review_events r-ann-c9-0: verdict is not one of A, B, tie, both_bad"):
        reviewed_targets([on("p9", "c9", "maybe")])


def pref(pair: str, target: float, source: str = "ai_harmless") -> dict:
    return {"pair_id": pair, "prompt_id": "q", "prompt": "Q?", "response_a": "a", "response_b": "b", "target": target,
            "source": source, "consistent": True, "n_labels": 2, "label_event_ids": [f"l-{pair}"],
            "response_a_id": f"{pair}-a", "response_b_id": f"{pair}-b", "constitution_sha": "c" * 64,
            "feedback_model_fingerprint": "f" * 16, "origin": "label_events" if source == "ai_harmless" else "hh:1"}


def test_preference_rows_take_the_verdicts_with_their_lineage_and_drops_are_printed(spark, capsys):
    from jobs.label import with_reviews
    rows = [pref("p1", 0.3), pref("p2", 0.9), pref("p4", 0.6), pref("p6", 0.7), pref("p5", 1.0, "human_helpful")]
    dataset = spark.createDataFrame(pa.Table.from_pylist(rows, schema=PREFERENCE_DATASET))
    selected = spark.createDataFrame([(r["pair_id"],) for r in rows], "pair_id string")
    out, kept = with_reviews(dataset, selected, *reviewed_targets(VERDICTS))
    got = sorted((r["pair_id"], r["target"], r["origin"], r["source"]) for r in out.collect())
    assert got == [("p1", 1.0, "review_events:r-ann-c1-1", "ai_harmless"),          # the AI said 0.3
                   ("p2", 0.5, "review_events:r-ann-c2-0,r-bob-c2-0", "ai_harmless"),
                   ("p5", 1.0, "hh:1", "human_helpful"),                             # human rows untouched
                   ("p6", 0.7, "label_events", "ai_harmless")]                       # not reviewed: the AI's
    assert out.columns == PREFERENCE_DATASET.names
    assert sorted(r[0] for r in kept.collect()) == ["p1", "p2", "p5", "p6"]          # p4 left on purpose
    assert "preference_dataset: 2 AI pairs take reviewers' verdicts as targets (origin review_events:...); " \
           "1 dropped from training because a reviewer called both responses bad" in capsys.readouterr().out


def test_cai_label_prefer_writes_the_verdicts_into_preference_dataset(spark, small_lake):
    from datetime import datetime, timezone

    from cai_lib.lake.spark_delta import open_lake
    from cai_lib.lake.tables import Lake
    from cai_lib.review.queue import comparisons
    from cai_lib.review.verdicts import review_row
    from jobs.label import LabelConfig
    from jobs.label import run as label
    from jobs.sample_pairs import SamplePairsConfig
    from jobs.sample_pairs import run as sample_pairs
    from schemas import REVIEW_EVENTS
    from tests.conftest import ROOT
    base = dict(lake=str(small_lake), params="/nonexistent.yaml", constitution=str(ROOT / "constitutions/default.yaml"),
                batch_size=8, backend="fake")
    sample_pairs(spark, SamplePairsConfig(max_new_tokens=8, policy="fake", **base))
    label(spark, LabelConfig(feedback_model="fake:prefer=a", **base))
    lake = Lake(small_lake)
    ai = {r["pair_id"]: r for r in lake.read("preference_dataset").to_pylist()}
    comps = comparisons(lake.read("label_events").to_pylist())
    assert len(comps) == len(ai) == 3
    at = datetime(2026, 12, 1, tzinfo=timezone.utc)
    verdicts = [review_row(c, ("audit",), reviewer="ann", choice=choice, note=None, verdict_at=at, now=at, order="ab")
                for c, choice in zip(comps[:2], ("second", "both_bad"))]   # B better; both bad
    open_lake(str(small_lake), spark).insert_new("review_events", pa.Table.from_pylist(verdicts, schema=REVIEW_EVENTS))
    out = label(spark, LabelConfig(feedback_model="fake:prefer=a", reviewed_verdicts="prefer", **base))
    assert (out["model_calls"], out["preference_dataset_rewritten"], out["errors"]) == (0, True, [])
    now = {r["pair_id"]: r for r in lake.read("preference_dataset").to_pylist()}
    reviewed, dropped, untouched = (c.pair_id for c in comps)
    assert sorted(now) == sorted([reviewed, untouched])
    assert (now[reviewed]["target"], now[reviewed]["origin"]) == (0.0, f"review_events:{verdicts[0]['event_id']}")
    assert (now[untouched]["target"], now[untouched]["origin"]) == (ai[untouched]["target"], "label_events")
