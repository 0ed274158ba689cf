"""The plan a wave records before any of its chunks commits (`work_batches`): every attempt's batch and
chunk, so a run resumed after a kill makes the same model calls, and two runs that cut the same rows at
once land one plan."""
from __future__ import annotations

from cai_lib.runtime.app_ids import rows_app_id
from cai_lib.runtime.chunking import UNSIZED


def record_plan(lake, planned, table: str, sized: bool = False, app_id: str | None = None) -> None:
    """Append the batches just cut to work_batches (one commit), before any of them commits: idempotent on
    the attempts it plans, so of two runs that cut the same pending rows at once only one plan lands.
    `sized`: the chunks of batches planned UNSIZED, rows of their own (work_id `...#sized`, app id apart).
    `app_id`: the append's, when the caller has it (`pending` gets it from its aggregate: one job less)."""
    from pyspark.sql import functions as F
    lake.table("work_batches")
    tag = F.lit("#sized" if sized else "")
    app_id = app_id or rows_app_id(planned.withColumn("tag", tag), "work_batches", ("event_id", "attempt", "tag"))
    rows = planned.select(F.concat("event_id", F.lit("#"), F.col("attempt").cast("string"), tag).alias("work_id"),
                          F.lit(table).alias("target_table"), "event_id", "attempt",
                          F.col("round").cast("int").alias("round"), "plan_id", "pos", "batch_no", "chunk",
                          F.current_timestamp().alias("created_at"))
    lake.idempotent_append("work_batches", rows, app_id)


def plans_of(lake, table: str, plan_filter=None):
    """(event_id, attempt, plan_id, pos, batch_no, chunk): the recorded plan of each attempt at `table`'s
    rows; one per attempt even if two runs that began at once each recorded one: the same for every run.
    An attempt's chunk is its sized one when its batch's rest was sized (`cut_rest`), else as planned."""
    from pyspark.sql import functions as F
    plans = lake.df("work_batches").where(F.col("target_table") == table)
    if plan_filter is not None:
        plans = plans.where(plan_filter)   # lets the read skip files of other rounds
    # of one plan's rows for an attempt, a sized chunk before UNSIZED (false sorts first)
    plan = F.struct("plan_id", "pos", "batch_no", (F.col("chunk") == UNSIZED).alias("unsized"), "chunk")
    return (plans.groupBy("event_id", "attempt").agg(F.min(plan).alias("p"))
            .select("event_id", "attempt", "p.plan_id", "p.pos", "p.batch_no", "p.chunk"))
