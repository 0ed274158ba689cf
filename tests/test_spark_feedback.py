"""sample-pairs and label on the Spark-native data plane: generation events, label events and
preference_dataset written by idempotent appends, a rerun for free; chains of thought a generation
wave; a failing scoring quarantined once and the run failing; a resample's newer samples labelled."""
from __future__ import annotations

import pytest
from deltalake import DeltaTable

from cai_lib.lake.tables import Lake
from jobs.common import judge
from jobs.label import LabelConfig
from jobs.label import run as label
from jobs.sample_pairs import SamplePairsConfig
from jobs.sample_pairs import run as sample_pairs
from tests.conftest import ROOT, SHARED, copy_lake, make_small_lake

BASE = dict(backend="fake", params="/nonexistent.yaml", constitution=str(ROOT / "constitutions/default.yaml"),
            batch_size=2, batches_per_commit=1)
PAIRS = dict(policy="fake", max_new_tokens=24, **BASE)
HUMAN = [{"path": str(SHARED / "hh-rlhf/helpful-base/test.jsonl.gz"), "limit": 3, "seed": 1}]
VOLATILE = {"job_run_id", "created_at", "latency_ms"}


def rows(lake, table: str, key: str) -> list[dict]:
    out = Lake(lake).read(table).to_pylist()
    return sorted(({k: v for k, v in r.items() if k not in VOLATILE} for r in out), key=lambda r: r[key])


def history(lake, table: str) -> list[str]:
    return [h["operation"] for h in reversed(DeltaTable(str(lake / table)).history())]


@pytest.fixture(scope="module")
def sampled_once(spark, tmp_path_factory):
    """Pairs sampled on the plane once per module."""
    lake = make_small_lake(tmp_path_factory.mktemp("pairs"))
    b = sample_pairs(spark, SamplePairsConfig(lake=str(lake), **PAIRS))
    keys = ("prompts", "samples", "ok", "failed", "gave_up", "inserted", "model_calls")
    # 3 red-team prompts x 2 samples, batches of 2: 3 model calls, one blind append each
    assert {k: b[k] for k in keys} == {"prompts": 3, "samples": 6, "ok": 6, "failed": 0, "gave_up": 0, "inserted": 6,
                                       "model_calls": 3}
    samples = rows(lake, "generation_events", "event_id")
    assert [(r["kind"], r["status"]) for r in samples] == [("pair_sample", "ok")] * 6
    assert sorted(r["round"] for r in samples) == [0, 0, 0, 1, 1, 1]
    assert history(lake, "generation_events") == ["CREATE TABLE"] + ["WRITE"] * 3
    again = sample_pairs(spark, SamplePairsConfig(lake=str(lake), **PAIRS))
    assert (again["samples"], again["model_calls"]) == (0, 0)
    return lake


@pytest.fixture
def sampled(sampled_once, tmp_path):
    return copy_lake(sampled_once, tmp_path / "plane")


def test_labels_soft_both_orders_and_a_rerun_is_free(spark, sampled):
    plane = sampled
    human = HUMAN if SHARED.exists() else []
    cfg = dict(feedback_model="fake", ensemble=2, human_pairs=human, **BASE)
    b = label(spark, LabelConfig(lake=str(plane), **cfg))
    # 3 pairs x 2 principles x 2 orders = 12 scorings, in 6 batches of 2 (one commit each)
    assert (b["pairs"], b["comparisons"], b["inserted"], b["ai_pairs"], b["model_calls"]) == (3, 12, 12, 3, 6)
    assert (b["quarantined"], b["failed"], b["incomplete_pairs"]) == (0, 0, 0)
    labels = rows(plane, "label_events", "event_id")
    assert len(labels) == 12 and sorted(r["order"] for r in labels) == ["ab"] * 6 + ["ba"] * 6
    for r in labels:
        assert r["p_a"] == pytest.approx(r["p_shown_a"] if r["order"] == "ab" else 1 - r["p_shown_a"])
    dataset = rows(plane, "preference_dataset", "pair_id")
    assert sorted(r["source"] for r in dataset) == ["ai_harmless"] * 3 + ["human_helpful"] * (3 if human else 0)
    assert {r["n_labels"] for r in dataset if r["source"] == "ai_harmless"} == {4}
    assert history(plane, "label_events") == ["CREATE TABLE"] + ["WRITE"] * 6

    again = label(spark, LabelConfig(lake=str(plane), **cfg))
    assert (again["scored"], again["model_calls"], again["preference_dataset_rewritten"]) == (0, 0, False)
    assert again["labels_sha"] == b["labels_sha"] and len(history(plane, "label_events")) == 7


def test_chains_of_thought_are_a_generation_wave(spark, sampled):
    plane = sampled
    cfg = dict(feedback_model="fake", cot=True, **BASE)
    b = label(spark, LabelConfig(lake=str(plane), **cfg))
    # 3 pairs x 2 orders: 6 chains of thought (3 batches), then 6 scorings (3 batches)
    assert (b["scored"], b["inserted"], b["cot_failed"], b["model_calls"]) == (6, 6, 0, 6)
    cots = [r for r in rows(plane, "generation_events", "event_id") if r["kind"] == "cot"]
    assert len(cots) == 6
    labels = rows(plane, "label_events", "event_id")
    assert {r["kind"] for r in labels} == {"ai_label_cot"} and all(0.4 <= r["p_a"] <= 0.6 for r in labels)
    assert {r["cot_event_id"] for r in labels} == {r["event_id"] for r in cots}


def test_a_failing_scoring_is_quarantined_once_and_fails_the_run(spark, sampled):
    plane = sampled
    red = sorted(r["text"] for r in Lake(plane).read("prompts").to_pylist() if r["kind"] == "red_team")
    text = red[0][:30]   # in that prompt's two comparisons only
    cfg = dict(feedback_model=f"fail-on:{text}", **BASE)
    first = label(spark, LabelConfig(lake=str(plane), **cfg))
    assert (first["scored"], first["inserted"], first["failed"], first["quarantined"]) == (6, 4, 2, 2)
    errors, _ = judge(first, 0.1)
    assert errors and "2 of 6 scorings failed" in errors[0] and "fake scoring failure" in errors[0]
    quarantine = Lake(plane).read("quarantine").to_pylist()
    assert sorted(q["stage"] for q in quarantine if q["stage"] == "label") == ["label", "label"]
    assert first["ai_pairs"] == 2 and first["incomplete_pairs"] == 0   # the failing pair has no label at all

    again = label(spark, LabelConfig(lake=str(plane), **cfg))
    assert (again["scored"], again["failed"], again["quarantined"]) == (2, 2, 0)   # retried, not logged twice
    assert len([q for q in Lake(plane).read("quarantine").to_pylist() if q["stage"] == "label"]) == 2


def test_after_a_resample_the_newer_samples_are_labelled(spark, sampled):
    """Two samples of one round (a `--resample` with another seed): the later one is labelled."""
    plane = sampled
    older = {r["event_id"] for r in rows(plane, "generation_events", "event_id") if r["kind"] == "pair_sample"}
    again = sample_pairs(spark, SamplePairsConfig(lake=str(plane), resample=True, seed=7, **PAIRS))
    assert (again["samples"], again["ok"]) == (6, 6)
    newer = {r["event_id"] for r in rows(plane, "generation_events", "event_id") if r["kind"] == "pair_sample"} - older
    assert len(newer) == 6
    b = label(spark, LabelConfig(lake=str(plane), feedback_model="fake", **BASE))
    assert b["pairs"] == 3
    labelled = {i for r in rows(plane, "label_events", "event_id") for i in (r["response_a_id"], r["response_b_id"])}
    assert labelled == newer
