"""The Spark-native data plane: sl-generate's events and sl_dataset appended by the executors with
delta-spark, one idempotent append per chunk; exactly once when Spark retries a task; one run per job
and lake; delta-rs reading every version delta-spark wrote (time travel included)."""
from __future__ import annotations

import pytest
from deltalake import DeltaTable

from cai_lib.lake.locks import JobLockedError
from cai_lib.lake.tables import Lake
from jobs.sl_generate import SLGenerateConfig, run
from tests.conftest import ROOT, copy_lake

SETTINGS = dict(backend="fake", base_model="fake", rounds=1, batch_size=2, batches_per_commit=1,
                params="/nonexistent.yaml", constitution=str(ROOT / "constitutions/default.yaml"))
EVENT_COLUMNS = ["event_id", "target_event_id", "status", "kind", "prompt_id", "parent_id", "round",
                 "principle_id", "seed", "sampling", "text", "template_sha", "constitution_sha"]


def events(lake) -> list[dict]:
    return sorted(Lake(lake).read("generation_events").select(EVENT_COLUMNS).to_pylist(), key=lambda r: r["event_id"])


def sl_rows(lake) -> list[dict]:
    return sorted(Lake(lake).read("sl_dataset").to_pylist(), key=lambda r: r["prompt_id"])


@pytest.fixture(scope="module")
def reference(spark, tmp_path_factory):
    """An undisturbed sl-generate run (fake model): what a disturbed or resumed run must write too."""
    from tests.conftest import make_small_lake
    ref = make_small_lake(tmp_path_factory.mktemp("plane-reference"))
    return ref, run(spark, SLGenerateConfig(lake=str(ref), **SETTINGS))


def test_the_plane_appends_one_chunk_per_commit_and_reruns_for_free(spark, reference):
    lake, summary = reference
    # 3 red-team + 2 helpful prompts, 1 round: 5 answers, 3 critiques, 3 revisions
    keys = ("generations", "model_calls", "ok", "failed", "inserted", "completion_tokens", "sl_dataset_rows")
    assert {k: summary[k] for k in keys} == {
        "generations": 11, "model_calls": 7, "ok": 11, "failed": 0, "inserted": 11, "completion_tokens": 33,
        "sl_dataset_rows": 5}
    got = events(lake)
    assert len({r["event_id"] for r in got}) == 11 and {r["status"] for r in got} == {"ok"}
    final = {r["prompt_id"]: r["final_event_id"] for r in sl_rows(lake)}
    revisions = {r["prompt_id"]: r["event_id"] for r in got if r["kind"] == "revision"}
    helpful = {r["prompt_id"]: r["event_id"] for r in got if r["kind"] == "helpful_response"}
    assert final == {**revisions, **helpful} and len(revisions) == 3 and len(helpful) == 2

    table = DeltaTable(str(lake / "generation_events"))
    ops = [(h["operation"], h.get("operationParameters", {}).get("mode")) for h in table.history()]
    # version 0 creates the table; then one blind append per chunk (batches of 2): 3 + 2 + 2, no MERGE
    assert sorted(ops, key=str) == sorted([("CREATE TABLE", None)] + [("WRITE", "Append")] * 7, key=str), ops
    assert table.version() == 7 and table.protocol().min_reader_version == 1

    again = run(spark, SLGenerateConfig(lake=str(lake), **SETTINGS))
    assert (again["model_calls"], again["inserted"], again["sl_dataset_rewritten"]) == (0, 0, False)
    assert DeltaTable(str(lake / "generation_events")).version() == 7

    # delta-rs reads every version delta-spark wrote, as Spark does
    path = lake / "generation_events"
    for v in range(DeltaTable(str(path)).version() + 1):
        spark_rows = spark.read.format("delta").option("versionAsOf", v).load(str(path)).count()
        assert DeltaTable(str(path), version=v).to_pyarrow_dataset().count_rows() == spark_rows, v
    assert spark.read.format("delta").option("versionAsOf", 3).load(str(lake / "generation_events")).count() == 5


@pytest.mark.parametrize("fault", ["raise-once", "exit-once"])
def test_a_task_that_dies_after_its_model_call_is_retried_and_its_rows_land_once(
        spark, small_lake, reference, tmp_path, fault):
    """raise-once: the task fails after generating; exit-once: its Python worker dies mid-stage. Spark
    runs the task again; only the winning attempt's files are committed."""
    ref, _ = reference
    lake = copy_lake(small_lake, tmp_path / "faulty")
    marker = tmp_path / "fault-happened"
    cfg = {**SETTINGS, "base_model": f"fake:fault={fault}@{marker}"}
    summary = run(spark, SLGenerateConfig(lake=str(lake), **cfg))
    assert marker.exists()   # the fault did fire, in the first model call
    assert (summary["ok"], summary["failed"]) == (11, 0)
    got = events(lake)
    assert len({r["event_id"] for r in got}) == len(got) == 11
    assert got == events(ref)   # same ids and texts as an undisturbed run (the fake's text ignores the id)
    table = DeltaTable(str(lake / "generation_events"))
    assert table.to_pyarrow_dataset().count_rows() == 11
    assert len(table.file_uris()) == 7   # one file per committed chunk: the failed attempt's file is not in the table


def test_a_second_run_of_a_job_refuses_while_one_runs_and_a_dead_runs_lock_is_taken_over(spark, small_lake):
    from tests.test_locks import holding
    holder = holding(small_lake, "sl-generate", "run-1")   # another process holds the kernel lock
    try:
        with pytest.raises(JobLockedError, match=r"another `cai sl-generate` is writing lake .*job run run-1 "
                                                 rf"\(pid {holder.pid} on.*wait for it to finish, then rerun"):
            run(spark, SLGenerateConfig(lake=str(small_lake), **SETTINGS))
        assert not Lake(small_lake).exists("generation_events")   # refused before any model call
    finally:
        holder.kill()   # a dead run: the kernel drops its lock at once
        holder.wait()
    summary = run(spark, SLGenerateConfig(lake=str(small_lake), **SETTINGS))
    assert summary["ok"] == 11 and not (small_lake / ".cai-locks" / "sl-generate.json").exists()


def test_an_increment_fills_batches_of_its_own_and_a_stopped_runs_batches_are_kept(
        spark, small_lake, reference, tmp_path):
    """Batches are cut from the pending attempts only, so two new prompts make one model call per wave;
    an attempt a stopped run planned (work_batches) runs in the batch it was planned in."""
    import json

    from pyspark.sql import functions as F

    from cai_lib.lake.spark_delta import SparkDeltaLake
    from tests.conftest import DEMO_RED, ingest, write_jsonl
    lake = copy_lake(small_lake, tmp_path / "planned")
    # a run that planned wave 0 as one batch of all five answers, then stopped before generating
    wave0 = [r for r in events(reference[0]) if r["round"] == 0]
    plan = [{"work_id": f"{r['event_id']}#1", "target_table": "generation_events", "event_id": r["event_id"],
             "attempt": 1, "round": 0, "plan_id": "stopped-run/0", "pos": i, "batch_no": 0, "chunk": 0}
            for i, r in enumerate(sorted(wave0, key=lambda r: r["event_id"]))]
    spark_lake = SparkDeltaLake(spark, lake)
    spark_lake.table("work_batches")
    fields = spark_lake.df("work_batches").schema.fields
    (spark.createDataFrame(plan).selectExpr("*", "current_timestamp() AS created_at")
     .select(*[F.col(f.name).cast(f.dataType) for f in fields]).write.format("delta").mode("append")
     .save(spark_lake.path("work_batches")))
    summary = run(spark, SLGenerateConfig(lake=str(lake), **SETTINGS))
    # wave 0 in the kept batch (1 call, 1 commit); waves 1 and 2 cut anew: 3 rows in batches of 2
    assert (summary["model_calls"], summary["ok"]) == (1 + 2 + 2, 11)
    assert DeltaTable(str(lake / "generation_events")).version() == 1 + 2 + 2

    red = [json.loads(x) for x in DEMO_RED.read_text().splitlines()[1:9:4]]   # two prompts not yet in the lake
    ingest(lake, write_jsonl(tmp_path / "more.jsonl", red), "red_team")
    more = run(spark, SLGenerateConfig(lake=str(lake), **SETTINGS))
    # 2 answers, 2 critiques, 2 revisions: one full batch per wave, whatever the old prompts' lengths
    assert (more["generations"], more["model_calls"], more["ok"], more["sl_dataset_rows"]) == (6, 3, 6, 7)
    assert DeltaTable(str(lake / "generation_events")).version() == 5 + 3


def test_a_rerun_plans_only_the_prompts_without_a_sl_dataset_row_and_appends_theirs(spark, small_lake, tmp_path):
    """sl_dataset's commits record what they were built from: while its last commit says this run's
    plan, a rerun plans (and joins and appends) only the prompts without a row; any other commit
    (OPTIMIZE here) makes the next run rebuild it from every prompt, once."""
    import json

    from cai_lib.lake.spark_delta import SparkDeltaLake
    from tests.conftest import DEMO_RED, ingest, write_jsonl
    lake = copy_lake(small_lake, tmp_path / "spark")
    first = run(spark, SLGenerateConfig(lake=str(lake), **SETTINGS))
    assert (first["planned_prompts"], first["sl_dataset_rows"]) == (5, 5)
    sl = SparkDeltaLake(spark, lake)
    built = sl.built_from("sl_dataset")
    assert json.loads(built)["sl_dataset"]["splits"] == ["train"]

    # a run that wrote every event but stopped before sl_dataset took in one prompt: that prompt is open
    kept = sl.df("sl_dataset").orderBy("prompt_id").limit(4).localCheckpoint(eager=True)
    sl.replace_df("sl_dataset", kept, built)
    resumed = run(spark, SLGenerateConfig(lake=str(lake), **SETTINGS))
    assert (resumed["planned_prompts"], resumed["model_calls"], resumed["sl_dataset_rows"]) == (1, 0, 5)
    history = DeltaTable(str(lake / "sl_dataset")).history(1)[0]
    assert (history["operation"], history["operationParameters"]["mode"]) == ("WRITE", "Append")
    assert history["operationMetrics"]["numOutputRows"] == "1" and history["userMetadata"] == built

    noop = run(spark, SLGenerateConfig(lake=str(lake), **SETTINGS))
    assert (noop["planned_prompts"], noop["model_calls"], noop["sl_dataset_rewritten"]) == (0, 0, False)

    red = [json.loads(x) for x in DEMO_RED.read_text().splitlines()[1:9:4]]   # two prompts not yet in the lake
    ref = copy_lake(small_lake, tmp_path / "reference")
    for target in (lake, ref):
        ingest(target, write_jsonl(tmp_path / "more.jsonl", red), "red_team")
    more = run(spark, SLGenerateConfig(lake=str(lake), **SETTINGS))
    assert (more["planned_prompts"], more["generations"], more["sl_dataset_rows"]) == (2, 6, 7)
    run(spark, SLGenerateConfig(lake=str(ref), **SETTINGS))   # a fresh run derives every row at once
    assert sl_rows(lake) == sl_rows(ref) and events(lake) == events(ref)

    sl.table("sl_dataset").optimize().executeCompaction()
    rebuilt = run(spark, SLGenerateConfig(lake=str(lake), **SETTINGS))
    assert (rebuilt["planned_prompts"], rebuilt["model_calls"], rebuilt["sl_dataset_rewritten"]) == (7, 0, True)
    assert sl.built_from("sl_dataset") == built and sl_rows(lake) == sl_rows(ref)
    assert run(spark, SLGenerateConfig(lake=str(lake), **SETTINGS))["planned_prompts"] == 0
