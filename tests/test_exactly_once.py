"""Exactly-once across runs: every append of the Spark plane is a Delta idempotent write (txnAppId from the
chunk's content), so a chunk written twice lands once, and two whole runs at once, unlocked, write every
id once. Tables written this way stay reader 1 / writer 2 and open in delta-rs."""
from __future__ import annotations

import contextlib
import threading

import pytest
from deltalake import DeltaTable

from cai_lib.lake.spark_delta import SparkDeltaLake
from cai_lib.runtime import spark_plane
from jobs.label import LabelConfig
from jobs.label import run as label
from jobs.sample_pairs import SamplePairsConfig
from jobs.sample_pairs import run as sample_pairs
from tests.conftest import ROOT, copy_lake, make_small_lake

BASE = dict(backend="fake", params="/nonexistent.yaml", constitution=str(ROOT / "constitutions/default.yaml"),
            batch_size=2, batches_per_commit=1)
PAIRS = dict(policy="fake", max_new_tokens=24, **BASE)


def ops(lake, table: str) -> list[str]:
    return [h["operation"] for h in reversed(DeltaTable(str(lake / table)).history())]


def ids(lake, table: str) -> list[str]:
    return DeltaTable(str(lake / table)).to_pyarrow_table(columns=["event_id"])["event_id"].to_pylist()


@pytest.fixture
def twice(monkeypatch):
    """Every idempotent append is made twice, as a retry of the whole write would."""
    once = SparkDeltaLake.idempotent_append

    def again(self, name, rows, app_id):
        once(self, name, rows, app_id)
        once(self, name, rows, app_id)

    monkeypatch.setattr(SparkDeltaLake, "idempotent_append", again)


@pytest.fixture(scope="module")
def sampled_lake(tmp_path_factory):
    return make_small_lake(tmp_path_factory.mktemp("exactly_once"))


def test_a_generation_chunk_written_twice_lands_once_without_a_second_model_call(spark, sampled_lake, twice):
    lake = copy_lake(sampled_lake, sampled_lake.parent / "gen_twice")
    s = sample_pairs(spark, SamplePairsConfig(lake=str(lake), **PAIRS))
    # 3 red-team prompts x 2 samples in batches of 2: 3 chunks, each appended once; the second write of each
    # found its app id and ran nothing
    assert (s["samples"], s["ok"], s["model_calls"]) == (6, 6, 3)
    got = ids(lake, "generation_events")
    assert len(got) == len(set(got)) == 6
    assert ops(lake, "generation_events") == ["CREATE TABLE"] + ["WRITE"] * 3
    assert len(ids(lake, "work_batches")) == 6 and ops(lake, "work_batches") == ["CREATE TABLE", "WRITE"]
    dt = DeltaTable(str(lake / "generation_events"))   # delta-rs reads it, protocol unchanged
    assert (dt.protocol().min_reader_version, dt.protocol().min_writer_version) == (1, 2)
    assert dt.metadata().configuration == {"delta.appendOnly": "true", "delta.enableDeletionVectors": "false",
                                           "delta.setTransactionRetentionDuration": "interval 30 days"}


def test_a_label_chunk_written_twice_lands_once(spark, sampled_lake, twice):
    lake = copy_lake(sampled_lake, sampled_lake.parent / "label_twice")
    sample_pairs(spark, SamplePairsConfig(lake=str(lake), **PAIRS))
    s = label(spark, LabelConfig(lake=str(lake), feedback_model="fake", ensemble=1, human_pairs=[], **BASE))
    got = ids(lake, "label_events")
    # 3 pairs x 1 principle x 2 orders = 6 labels in batches of 2: 3 chunks, one commit each
    assert len(got) == len(set(got)) == 6 and (s["inserted"], s["model_calls"]) == (6, 3)
    assert ops(lake, "label_events") == ["CREATE TABLE"] + ["WRITE"] * 3


def test_two_whole_runs_at_once_without_the_lock_write_every_id_once(spark, sampled_lake, monkeypatch):
    """Both runs find the same pending samples and cut them before either records its plan (a barrier
    holds each at record_plan): under different plan ids, their chunks still have one app id each."""
    lake = copy_lake(sampled_lake, sampled_lake.parent / "two_runs")
    monkeypatch.setattr("cai_lib.lake.locks.job_lock", lambda *a, **k: contextlib.nullcontext())
    record, meet = spark_plane.record_plan, threading.Barrier(2, timeout=120)

    def record_together(*args, **kwargs):
        meet.wait()
        record(*args, **kwargs)

    monkeypatch.setattr(spark_plane, "record_plan", record_together)
    out, errors = [], []

    def one_run():
        try:
            out.append(sample_pairs(spark, SamplePairsConfig(lake=str(lake), **PAIRS)))
        except Exception as exc:   # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    runs = [threading.Thread(target=one_run) for _ in range(2)]
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    assert errors == [] and sorted(s["samples"] for s in out) == [6, 6]
    got = ids(lake, "generation_events")
    assert len(got) == len(set(got)) == 6
    assert ops(lake, "generation_events").count("WRITE") == 3
    assert len(ids(lake, "work_batches")) == 6   # one plan recorded: the other run's was the same attempts
