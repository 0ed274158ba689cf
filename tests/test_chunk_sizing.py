"""Chunks sized by time: the fake at a GPU's speed (`fake:latency=S`), the sizing rules with exact
values, and a Spark run on `local[1]` whose chunks follow the measured time."""
from __future__ import annotations

import pytest

from cai_lib.backends import Sampling
from cai_lib.backends.fake import FakeBackend, check_fake_model

CHATS = [[{"role": "user", "content": "Hello there"}], [{"role": "user", "content": "How are you"}]]


def test_the_latency_fake_sleeps_once_per_call_and_writes_the_plain_fakes_text(monkeypatch):
    slept = []
    monkeypatch.setattr("cai_lib.backends.fake.time.sleep", slept.append)
    fast, slow = FakeBackend("fake"), FakeBackend("fake:latency=0.2")
    sampling = Sampling(0.7, 0.9, 16)
    assert slow.generate(CHATS, sampling, [1, 2]) == fast.generate(CHATS, sampling, [1, 2])
    assert slow.generate(CHATS[:1], sampling, [1]) == fast.generate(CHATS[:1], sampling, [1])
    assert slow.choice_logprobs(["p1", "p2"], [" (A)", " (B)"]) == fast.choice_logprobs(["p1", "p2"], [" (A)", " (B)"])
    assert slept == [0.2, 0.2, 0.2]   # per call (two generates, one scoring), not per sequence
    assert slow.fingerprint == fast.fingerprint   # same ids: a bench's events are the plain fake's


@pytest.mark.parametrize("model", ["fake:latency=-1", "fake:latency=soon", "fake:latency=inf"])
def test_a_bad_latency_is_refused_on_the_driver(model):
    with pytest.raises(ValueError, match=rf"^fake model '{model}': the latency must be a number of seconds >= 0 "
                                         r"and finite, like fake:latency=0.2$"):
        check_fake_model("fake", model)


def plane(chunk_seconds: float = 30.0, ceiling: int = 64, slots: int = 2):
    from cai_lib.runtime.spark_plane import Plane
    return Plane(None, None, {}, {}, "run", 16, ceiling, chunk_seconds, slots=slots)   # slots given: no Spark


def test_chunks_hold_the_target_model_time_between_one_batch_and_the_ceiling():
    from cai_lib.runtime.chunking import target_batches
    # the bench's GPU-like fake: 0.2 s a batch, 30 s a chunk -> 150 batches, capped at the ceiling
    assert [target_batches(0.2, 30, c) for c in (256, 64, 1)] == [150, 64, 1]
    # a CPU model at 45 s a batch: one batch a chunk (a kill loses one batch), never none
    assert [target_batches(s, 30, 64) for s in (45.0, 29.0, 10.0, 0.3)] == [1, 1, 3, 64]
    assert target_batches(0.0, 30, 64) == 64   # a free model: the ceiling

    p = plane()
    assert p.per_chunk(700) == 59   # nothing measured: at most the ceiling, 12 chunks (a multiple of 2 slots)
    p.meter.record("generate", 45.0 * 4, 4)
    assert p.per_chunk(700) == 1
    p.meter.record("generate", 0.25 * 8, 8)   # the latest wave's measure counts
    assert (p.per_chunk(700), p.per_chunk(7)) == (59, 4)   # 120 -> ceiling 64 -> 12 even chunks; 7 -> 2 chunks
    p.meter.record("generate", 2.0 * 3, 3)
    assert p.per_chunk(700) == 15   # 30 s / 2 s; 47 chunks -> 48 for 2 slots -> ceil(700 / 48)
    fixed = plane(chunk_seconds=0, ceiling=4)   # today's fixed 16 x 4 = 64 per commit
    fixed.meter.record("generate", 45.0, 1)
    assert fixed.per_chunk(700) == 4


def test_a_wave_probes_one_batch_per_slot_then_cuts_the_rest():
    from cai_lib.runtime.chunking import probe_batches
    from cai_lib.runtime.spark_plane import fresh_chunks
    assert [probe_batches(b, 64, 2, 30) for b in (1, 2, 3, 700)] == [0, 0, 2, 2]
    assert probe_batches(700, 64, 2, 0) == 0   # a fixed count: chunk_seconds 0
    assert probe_batches(700, 1, 2, 30) == 0   # a ceiling of one batch: nothing to size
    # 100 rows in batches of 16 (7 batches, the last of 4 rows): 2 probe chunks, then chunks of 3 batches
    got = [(c.chunk, c.rows, c.batches) for c in fresh_chunks("p", 100, 16, 2, 3)]
    assert got == [(0, 16, 1), (1, 16, 1), (2, 48, 3), (3, 20, 2)]


@pytest.mark.parametrize("beside", [True, False], ids=["delta-beside-engines", "delta-needs-an-engine-slot"])
def test_chunks_follow_the_measured_model_time_and_commit_once_each(spark, small_lake, monkeypatch, beside):
    """local[1]: 3 prompts x 2 samples in batches of 1 at 0.5 s a call, 1.2 s a chunk: the probe (1 batch),
    then the other 5 batches cut by the measure (2, 2, 1). The probe runs while the wave's plan is
    recorded, and so do the first sized chunk jobs where Delta's jobs run beside the engines (forced here:
    `engines.delta_beside` finds it on a cluster whose executors keep a core no engine takes); their rows
    wait on the driver. Here the record waits until that many chunks' rows are on the driver, which would
    never happen if they waited for the record, and nothing commits before the plan has landed. The sized
    cut is not recorded, since the job holds the lake's lock and no other run can size them."""
    import threading

    from deltalake import DeltaTable

    from cai_lib.runtime import engines, spark_plane
    from jobs.sample_pairs import SamplePairsConfig
    from jobs.sample_pairs import run as sample_pairs
    from tests.conftest import ROOT
    active_after_commit = watch_commits(monkeypatch)
    record, on_driver, before_plan, held = spark_plane.record_plan, spark_plane.on_driver, [], []
    all_held, holding = threading.Event(), 2 if beside else 1

    def hold(spark, tables):   # the probe's rows, then each sized chunk's that started before the plan landed
        tables = list(tables)
        held.append(sum(t.num_rows for t in tables))
        if len(held) == holding:
            all_held.set()
        return on_driver(spark, tables)

    def record_after_the_held_chunks(lake, planned, table, sized=False, app_id=None):
        assert all_held.wait(120), f"a chunk waited for the plan's record (rows on the driver: {held})"
        before_plan.extend(h["operation"] for h in DeltaTable(str(small_lake / "generation_events")).history())
        record(lake, planned, table, sized, app_id)

    monkeypatch.setattr(engines, "engine_plan", lambda spark, spec: (None, 1, beside))
    monkeypatch.setattr(spark_plane, "on_driver", hold)
    monkeypatch.setattr(spark_plane, "record_plan", record_after_the_held_chunks)
    cfg = SamplePairsConfig(lake=str(small_lake), backend="fake", policy="fake:latency=0.5", max_new_tokens=24,
                            batch_size=1, batches_per_commit=64, chunk_seconds=1.2, params="/nonexistent.yaml",
                            constitution=str(ROOT / "constitutions/default.yaml"))
    s = sample_pairs(spark, cfg)
    assert (s["samples"], s["ok"], s["model_calls"]) == (6, 6, 6)
    assert before_plan == ["CREATE TABLE"]   # the held chunks had generated, and nothing had committed
    # on the driver: the probe's batch, and beside the engines the two sized chunk jobs started with it (one
    # slot, one queued); the last chunk (1 batch) started when one of them had committed, after the plan
    assert sorted(held) == ([1, 2, 2] if beside else [1])
    commits = [h for h in reversed(DeltaTable(str(small_lake / "generation_events")).history())
               if h["operation"] == "WRITE"]
    assert sorted(int(h["operationMetrics"]["numOutputRows"]) for h in commits) == [1, 1, 2, 2]
    # one slot, yet when a chunk had committed the next chunk's job was running already (how many later
    # commits see that depends on the machine's load); without the extra job in flight none does
    assert len(active_after_commit) == 4 and True in active_after_commit
    # the wave's plan (6 batches: the probe's chunk, 5 unsized) and no record of their sized chunks
    plans = [h for h in reversed(DeltaTable(str(small_lake / "work_batches")).history()) if h["operation"] == "WRITE"]
    assert [int(h["operationMetrics"]["numOutputRows"]) for h in plans] == [6]


def test_a_cut_on_the_driver_names_its_chunks_as_spark_does(spark):
    """sized_cut (the cut under the lake's lock, on the driver) hashes a chunk's keys to the app id Spark's
    keys_sha gives the same rows: the same keys always make the same append, whichever path cut them."""
    from cai_lib.runtime.app_ids import app_ids_of, batch_keys, keys_sha, sized_cut
    keys = [("p", b, f"ev{(7 * b + i) % 11:02d}\u00e9", 1 + i % 2) for b in range(5) for i in range(3)]   # not ASCII
    rows = spark.createDataFrame(keys, "plan_id string, batch_no long, event_id string, attempt int")
    chunks, ids, chunk_of = sized_cut(batch_keys(rows), 2, 7, "generation_events")
    assert [(c.chunk, c.rows, c.batches) for c in chunks] == [(7, 6, 2), (8, 6, 2), (9, 3, 1)]
    cut = spark.createDataFrame([(p, b, c) for (p, b), c in chunk_of.items()],
                                "plan_id string, batch_no long, chunk long")
    groups = rows.join(cut, ["plan_id", "batch_no"]).groupBy("plan_id", "chunk").agg(keys_sha().alias("sha"))
    assert app_ids_of(groups.collect(), "generation_events") == ids


def test_the_spread_column_cuts_batches_as_the_rule_does(spark):
    """spark_plane.spread_chunk (the cut's column) agrees with chunking.spread (the layout `pending`
    describes without reading the rows): chunk sizes and order, on a few shapes."""
    from pyspark.sql import functions as F

    from cai_lib.runtime.chunking import spread
    from cai_lib.runtime.spark_plane import spread_chunk
    for batches, per_chunk in ((998, 63), (5, 2), (11, 4), (7, 7), (1, 3)):
        rows = (spark.range(batches).withColumn("c", spread_chunk(F.col("id"), F.lit(batches), per_chunk))
                .groupBy("c").agg(F.count(F.lit(1)).alias("n"), F.min("id").alias("first")).orderBy("c").collect())
        assert [r["c"] for r in rows] == list(range(len(rows)))
        assert [r["n"] for r in rows] == spread(batches, per_chunk)
        assert [r["first"] for r in rows] == [sum(spread(batches, per_chunk)[:i]) for i in range(len(rows))]


def test_a_cut_another_run_recorded_first_is_the_one_that_runs(spark, small_lake, monkeypatch):
    """Two runs size the same batches at once, each by its own probe, which only runs without the lake's
    lock (a cloud lake): the cut that lands first is read back and run by both, so their appends share
    app ids. Here the other run's cut (a chunk per batch) lands just before this run's (one chunk of 5),
    which Delta then skips as the same attempts."""
    import contextlib

    from deltalake import DeltaTable
    from pyspark.sql import functions as F

    from cai_lib.runtime import spark_plane
    from jobs.sample_pairs import SamplePairsConfig
    from jobs.sample_pairs import run as sample_pairs
    from tests.conftest import ROOT
    record = spark_plane.record_plan

    def theirs_first(lake, planned, table, sized=False, app_id=None):
        if sized:
            record(lake, planned.withColumn("chunk", F.lit(spark_plane.SIZED) + F.col("batch_no")), table, sized=True)
        record(lake, planned, table, sized, app_id)

    monkeypatch.setattr(spark_plane, "record_plan", theirs_first)
    monkeypatch.setattr("cai_lib.lake.locks.job_lock", lambda *a, **k: contextlib.nullcontext())   # as on a cloud lake
    cfg = SamplePairsConfig(lake=str(small_lake), backend="fake", policy="fake", max_new_tokens=24, batch_size=1,
                            batches_per_commit=64, params="/nonexistent.yaml",
                            constitution=str(ROOT / "constitutions/default.yaml"))
    assert sample_pairs(spark, cfg)["ok"] == 6
    commits = [h for h in DeltaTable(str(small_lake / "generation_events")).history() if h["operation"] == "WRITE"]
    assert [int(h["operationMetrics"]["numOutputRows"]) for h in commits] == [1] * 6   # the probe, then theirs
    plans = [h for h in reversed(DeltaTable(str(small_lake / "work_batches")).history()) if h["operation"] == "WRITE"]
    assert [int(h["operationMetrics"]["numOutputRows"]) for h in plans] == [6, 5]   # the batches, then their cut


def test_with_one_slot_the_next_chunk_runs_while_the_last_one_commits():
    """run_chunks keeps one chunk job more in flight than there are slots: two writes meet at a barrier,
    which one write at a time would never pass."""
    import threading

    from cai_lib.runtime.spark_plane import Chunk, run_chunks
    meet, lines = threading.Barrier(2, timeout=10), []
    done = run_chunks([Chunk("p", c, 2, 1) for c in range(4)], lambda c: meet.wait(), 1, lines.append, "rows")
    assert done == 4 and lines[-1] == "  [####################] 8/8 rows committed in 4 of 4 commits"


def test_a_chunk_task_starts_on_the_first_free_slot(spark):
    """get_spark turns locality waiting off: on a 2-worker standalone cluster the chunk tasks, which read a
    few KB of rows, waited up to 3 s a locality level for the executor holding those rows (one worker idle
    4.3 s every round, bench/bench_plane_utilisation.py --standalone)."""
    assert spark.sparkContext.getConf().get("spark.locality.wait") == "0"


def watch_commits(monkeypatch) -> list[bool]:
    """For each generation chunk's append, in the order they return: whether another Spark job (the next
    chunk's) was active right after it had committed."""
    from cai_lib.lake.spark_delta import SparkDeltaLake
    append, seen = SparkDeltaLake.idempotent_append, []

    def watched(self, name, rows, app_id):
        append(self, name, rows, app_id)
        if name == "generation_events":
            seen.append(bool(self.spark.sparkContext.statusTracker().getActiveJobsIds()))

    monkeypatch.setattr(SparkDeltaLake, "idempotent_append", watched)
    return seen


def test_label_refuses_chunk_seconds_without_cot():
    """label sizes only its chains of thought by time (its scorings are cut by count): without --cot the
    flag would be ignored."""
    from cai_lib.config import ConfigError, load_config
    from jobs.label import LabelConfig
    with pytest.raises(ConfigError, match=r"^flag --chunk-seconds counts only when cot is True, and here cot is "
                                          r"False: it would be ignored"):
        load_config(LabelConfig, "label", ["--chunk-seconds", "5", "--params", "/dev/null"])
    assert load_config(LabelConfig, "label", ["--cot", "--chunk-seconds", "5", "--params", "/dev/null"]).chunk_seconds == 5
