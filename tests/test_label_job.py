"""sample-pairs and label on real Spark, real Delta and the real default model."""
from __future__ import annotations

import pyarrow.compute as pc
import pytest

from cai_lib.feedback.label_metrics import debias
from cai_lib.lake.tables import Lake
from jobs.label import LabelConfig
from jobs.label import run as label
from jobs.sample_pairs import SamplePairsConfig
from jobs.sample_pairs import run as sample_pairs
from tests.conftest import ROOT, SHARED

BASE = dict(params="/nonexistent.yaml", constitution=str(ROOT / "constitutions/default.yaml"), batch_size=8)
POLICY = dict(policy="default")   # the base model plays the policy under study (no registry here)


@pytest.fixture
def sampled(spark, small_lake):
    out = sample_pairs(spark, SamplePairsConfig(lake=str(small_lake), max_new_tokens=24, **POLICY, **BASE))
    assert (out["prompts"], out["ok"]) == (3, 6)  # 3 red-team prompts x 2 samples (helpful ones are not paired)
    again = sample_pairs(spark, SamplePairsConfig(lake=str(small_lake), max_new_tokens=24, **POLICY, **BASE))
    assert (again["samples"], again["model_calls"]) == (0, 0)
    return small_lake


@pytest.mark.slow
def test_labels_both_orders_soft_and_debiased_then_rerun_is_a_noop(spark, sampled):
    human = [{"path": str(SHARED / "hh-rlhf/helpful-base/test.jsonl.gz"), "limit": 4, "seed": 1}] \
        if SHARED.exists() else []
    out = label(spark, LabelConfig(lake=str(sampled), ensemble=2, human_pairs=human, **BASE))
    assert (out["pairs"], out["comparisons"], out["inserted"]) == (3, 12, 12)
    lake = Lake(sampled)
    ev = lake.read("label_events")
    assert ev.num_rows == 12 and len(set(ev["event_id"].to_pylist())) == 12
    assert pc.min(ev["p_a"]).as_py() > 0 and pc.max(ev["p_a"]).as_py() < 1
    for r in ev.to_pylist():
        assert r["p_a"] == pytest.approx(r["p_shown_a"] if r["order"] == "ab" else 1 - r["p_shown_a"])
        assert r["logprob_shown_a"] < 0 and r["logprob_shown_b"] < 0
    ds = lake.read("preference_dataset")
    ai = [r for r in ds.to_pylist() if r["source"] == "ai_harmless"]
    assert len(ai) == 3
    for pair in ai:  # the target is recomputable from the events: mean over principles of the debiased p
        rows = [r for r in ev.to_pylist() if r["pair_id"] == pair["pair_id"]]
        by_k = {}
        for r in rows:
            by_k.setdefault(r["ensemble_index"], {})[r["order"]] = r
        want = sum(debias(o["ab"]["p_a"], o["ba"]["p_shown_a"]) for o in by_k.values()) / len(by_k)
        assert pair["target"] == pytest.approx(want) and pair["n_labels"] == 4 and len(by_k) == 2
        assert len({r["principle_id"] for r in rows}) == 2
    if human:
        hum = [r for r in ds.to_pylist() if r["source"] == "human_helpful"]
        assert len(hum) == 4 and {r["target"] for r in hum} <= {0.0, 1.0}

    before = lake.snapshot()
    again = label(spark, LabelConfig(lake=str(sampled), ensemble=2, human_pairs=human, **BASE))
    assert (again["scored"], again["model_calls"], again["preference_dataset_rewritten"]) == (0, 0, False)
    assert lake.snapshot() == before


@pytest.mark.slow
def test_cot_labels_are_clamped_and_their_reasoning_is_an_event(spark, sampled):
    out = label(spark, LabelConfig(lake=str(sampled), cot=True, cot_max_new_tokens=16, **BASE))
    assert out["inserted"] == 6
    lake = Lake(sampled)
    ev = lake.read("label_events")
    assert set(ev["kind"].to_pylist()) == {"ai_label_cot"}
    assert pc.min(ev["p_a"]).as_py() >= 0.4 and pc.max(ev["p_a"]).as_py() <= 0.6
    gen = lake.read("generation_events")
    cots = set(gen.filter(pc.equal(gen["kind"], "cot"))["event_id"].to_pylist())
    assert len(cots) == 6 and set(ev["cot_event_id"].to_pylist()) == cots


def test_label_without_pairs_is_a_clear_error(spark, small_lake):
    with pytest.raises(ValueError, match="run `cai sample-pairs` first"):
        label(spark, LabelConfig(lake=str(small_lake), **BASE))


def test_failing_chains_of_thought_are_retried_then_left_failed(spark, small_lake):
    """A CoT that fails is an event, retried up to max_attempts, then counted and not retried."""
    fake = dict(BASE, backend="fake")
    sample_pairs(spark, SamplePairsConfig(lake=str(small_lake), policy="fake", **fake))
    failing = LabelConfig(lake=str(small_lake), cot=True, feedback_model="fail-on:Option (A):", **fake)
    first, second, third = (label(spark, failing) for _ in range(3))
    assert (first["inserted"], first["cot_gave_up"]) == (0, 0) and first["model_calls"] > 0
    assert second["cot_gave_up"] == 0 and second["model_calls"] > 0  # attempt 2
    assert (third["cot_gave_up"], third["model_calls"]) == (6, 0)    # max_attempts=2 reached
    gen = Lake(small_lake).read("generation_events").to_pylist()
    assert sorted(r["attempt"] for r in gen if r["kind"] == "cot") == [1] * 6 + [2] * 6
