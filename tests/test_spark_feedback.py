"""sample-pairs and label on the Spark-native data plane (`--lake-engine spark`): the same generation
events, label events and preference_dataset as the delta-rs path, written by blind appends, a rerun for
free; chains of thought a generation wave; a failing scoring quarantined once and the run failing."""
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
    """Pairs sampled by each engine: (delta-rs lake, Spark-plane lake)."""
    small_lake = make_small_lake(tmp_path_factory.mktemp("pairs"))
    ref, plane = copy_lake(small_lake, small_lake.parent / "ref"), copy_lake(small_lake, small_lake.parent / "plane")
    a = sample_pairs(spark, SamplePairsConfig(lake=str(ref), **PAIRS))
    b = sample_pairs(spark, SamplePairsConfig(lake=str(plane), lake_engine="spark", **PAIRS))
    keys = ("prompts", "samples", "ok", "failed", "gave_up", "inserted")
    # 3 red-team prompts x 2 samples, batches of 2: 3 model calls, one blind append each on the plane
    assert {k: b[k] for k in keys} == {k: a[k] for k in keys} == {
        "prompts": 3, "samples": 6, "ok": 6, "failed": 0, "gave_up": 0, "inserted": 6}
    assert b["model_calls"] == 3
    assert rows(plane, "generation_events", "event_id") == rows(ref, "generation_events", "event_id")
    assert history(plane, "generation_events") == ["CREATE TABLE"] + ["WRITE"] * 3
    again = sample_pairs(spark, SamplePairsConfig(lake=str(plane), lake_engine="spark", **PAIRS))
    assert (again["samples"], again["model_calls"]) == (0, 0)
    return ref, plane


@pytest.fixture
def sampled(sampled_once, tmp_path):
    return tuple(copy_lake(lake, tmp_path / lake.name) for lake in sampled_once)


def test_labels_on_the_spark_plane_equal_the_delta_rs_path_and_a_rerun_is_free(spark, sampled):
    ref, plane = sampled
    human = HUMAN if SHARED.exists() else []
    cfg = dict(feedback_model="fake", ensemble=2, human_pairs=human, **BASE)
    a = label(spark, LabelConfig(lake=str(ref), **cfg))
    b = label(spark, LabelConfig(lake=str(plane), lake_engine="spark", **cfg))
    keys = ("pairs", "comparisons", "scored", "inserted", "quarantined", "failed", "ai_pairs", "human_pairs",
            "incomplete_pairs", "human_rows_rejected", "preference_dataset_rewritten", "labels_sha")
    assert {k: b[k] for k in keys} == {k: a[k] for k in keys}
    # 3 pairs x 2 principles x 2 orders = 12 scorings, in 6 batches of 2 (one commit each)
    assert (b["pairs"], b["comparisons"], b["inserted"], b["ai_pairs"], b["model_calls"]) == (3, 12, 12, 3, 6)
    assert rows(plane, "label_events", "event_id") == rows(ref, "label_events", "event_id")
    assert rows(plane, "preference_dataset", "pair_id") == rows(ref, "preference_dataset", "pair_id")
    assert history(plane, "label_events") == ["CREATE TABLE"] + ["WRITE"] * 6

    again = label(spark, LabelConfig(lake=str(plane), lake_engine="spark", **cfg))
    assert (again["scored"], again["model_calls"], again["preference_dataset_rewritten"]) == (0, 0, False)
    assert len(history(plane, "label_events")) == 7


def test_chains_of_thought_are_a_generation_wave_and_equal_the_delta_rs_path(spark, sampled):
    ref, plane = sampled
    cfg = dict(feedback_model="fake", cot=True, **BASE)
    a = label(spark, LabelConfig(lake=str(ref), **cfg))
    b = label(spark, LabelConfig(lake=str(plane), lake_engine="spark", **cfg))
    # 3 pairs x 2 orders: 6 chains of thought (3 batches), then 6 scorings (3 batches)
    assert (b["scored"], b["inserted"], b["cot_failed"], b["model_calls"]) == (6, 6, 0, 6)
    assert (a["scored"], a["inserted"], a["labels_sha"]) == (6, 6, b["labels_sha"])
    cots = lambda lake: [r for r in rows(lake, "generation_events", "event_id") if r["kind"] == "cot"]  # noqa: E731
    assert len(cots(plane)) == 6 and cots(plane) == cots(ref)
    labels = rows(plane, "label_events", "event_id")
    assert labels == rows(ref, "label_events", "event_id")
    assert {r["kind"] for r in labels} == {"ai_label_cot"} and all(0.4 <= r["p_a"] <= 0.6 for r in labels)
    assert {r["cot_event_id"] for r in labels} == {r["event_id"] for r in cots(plane)}


def test_a_failing_scoring_is_quarantined_once_and_fails_the_run(spark, sampled):
    _, plane = sampled
    red = sorted(r["text"] for r in Lake(plane).read("prompts").to_pylist() if r["kind"] == "red_team")
    text = red[0][:30]   # in that prompt's two comparisons only
    cfg = dict(feedback_model=f"fail-on:{text}", **BASE)
    first = label(spark, LabelConfig(lake=str(plane), lake_engine="spark", **cfg))
    assert (first["scored"], first["inserted"], first["failed"], first["quarantined"]) == (6, 4, 2, 2)
    errors, _ = judge(first, 0.1)
    assert errors and "2 of 6 scorings failed" in errors[0] and "fake scoring failure" in errors[0]
    quarantine = Lake(plane).read("quarantine").to_pylist()
    assert sorted(q["stage"] for q in quarantine if q["stage"] == "label") == ["label", "label"]
    assert first["ai_pairs"] == 2 and first["incomplete_pairs"] == 0   # the failing pair has no label at all

    again = label(spark, LabelConfig(lake=str(plane), lake_engine="spark", **cfg))
    assert (again["scored"], again["failed"], again["quarantined"]) == (2, 2, 0)   # retried, not logged twice
    assert len([q for q in Lake(plane).read("quarantine").to_pylist() if q["stage"] == "label"]) == 2


def test_after_a_resample_both_engines_label_the_newer_samples(spark, sampled):
    """Two samples of one round (a `--resample` with another seed): each engine labels the later one."""
    ref, plane = sampled
    older = {r["event_id"] for r in rows(plane, "generation_events", "event_id") if r["kind"] == "pair_sample"}
    for lake, engine in ((ref, "delta-rs"), (plane, "spark")):
        again = sample_pairs(spark, SamplePairsConfig(lake=str(lake), lake_engine=engine, resample=True, seed=7, **PAIRS))
        assert (again["samples"], again["ok"]) == (6, 6)
    newer = {r["event_id"] for r in rows(plane, "generation_events", "event_id") if r["kind"] == "pair_sample"} - older
    assert len(newer) == 6
    cfg = dict(feedback_model="fake", **BASE)
    a = label(spark, LabelConfig(lake=str(ref), **cfg))
    b = label(spark, LabelConfig(lake=str(plane), lake_engine="spark", **cfg))
    assert (a["pairs"], b["pairs"], a["labels_sha"]) == (3, 3, b["labels_sha"])
    for lake in (ref, plane):
        labelled = {i for r in rows(lake, "label_events", "event_id") for i in (r["response_a_id"], r["response_b_id"])}
        assert labelled == newer
