"""The Spark-native data plane: pending work is an anti-join, generation runs in the executors, and the
executors' rows go straight into `generation_events` with delta-spark, one commit per chunk of batches.

Per wave:
1. `pending` numbers the wave's eligible steps in a fixed order (input length, then id) over all of
   them, done or not, so a batch is the same batch in every run; it anti-joins the successful
   events away, drops what gave up, and cuts the rest into batches and chunks of whole batches.
2. `run_wave` runs each chunk as its own Spark job: a `mapInArrow` task generates the chunk's
   batches and Delta's writer appends them (files from a failed or speculative task attempt are
   never committed: Spark's commit protocol adds only the winning attempt's files). As many chunk
   jobs run at once as there are executor slots, each starting when a slot frees, so no barrier
   holds the cluster and a kill loses only the chunks in flight.
3. Each commit is a blind append: its cost does not grow with the table (no MERGE scans it).

Two runs of one job on one lake would both append the same pending ids, so the job holds
`lake.locks.job_lock` while it runs.
"""
from __future__ import annotations

import functools
import json
import time
from collections import defaultdict
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any, Callable, Iterator

import pyarrow as pa

from cai_lib.backends import Sampling
from cai_lib.ids import canonical_json
from cai_lib.runtime.tasks import RunStats, Task, event_rows
from cai_lib.runtime.worker import backend_for, generate_batch
from schemas import GENERATION_EVENTS


def successful(events):
    """(event_id, text) of the successful events."""
    from pyspark.sql import functions as F
    return events.where(F.col("status") == "ok").select(F.col("target_event_id").alias("event_id"), "text")


def failure_counts(events):
    """(event_id, tries): failed attempts of each id."""
    from pyspark.sql import functions as F
    return (events.where(F.col("status") != "ok").groupBy(F.col("target_event_id").alias("event_id"))
            .agg(F.count(F.lit(1)).cast("int").alias("tries")))


def pending(inputs, ok, failures, *, max_attempts: int, batch_size: int, batches_per_commit: int):
    """(todo, gave_up, chunks): the steps of `inputs` still to run with attempt, batch_no and chunk; how
    many are left failed after max_attempts; and [(chunk, rows, batches)] in order (numbers per chunk)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    order = (inputs.select("event_id", "input_len")
             .withColumn("idx", F.row_number().over(Window.orderBy("input_len", "event_id")) - 1)
             .select("event_id", "idx"))
    marked = (inputs.join(ok.select("event_id"), "event_id", "left_anti").join(order, "event_id")
              .join(failures, "event_id", "left").withColumn("tries", F.coalesce("tries", F.lit(0)))
              .withColumn("gave_up", F.col("tries") >= max_attempts)
              .withColumn("attempt", F.col("tries") + 1)
              .withColumn("batch_no", (F.col("idx") / batch_size).cast("long"))
              .withColumn("chunk", (F.col("idx") / (batch_size * batches_per_commit)).cast("long")))
    # Materialized apart from the table it was read from: each chunk's append makes Spark re-run every
    # cached plan that reads generation_events (recacheByPath), which would redo the anti-join per chunk.
    marked = marked.repartition("chunk").localCheckpoint(eager=True)
    counts = marked.groupBy("chunk", "gave_up").agg(F.count(F.lit(1)).alias("n"),
                                                    F.countDistinct("batch_no").alias("batches")).collect()
    gave_up = sum(r["n"] for r in counts if r["gave_up"])
    chunks = sorted((r["chunk"], r["n"], r["batches"]) for r in counts if not r["gave_up"])
    return marked.where(~F.col("gave_up")), gave_up, chunks


def generate_events(batches: Iterator[pa.RecordBatch], spec_json: str, make_chat: Callable[[dict], list],
                    parse: Callable[[str, str], str], constants: dict[str, Any], job_run_id: str,
                    counters: dict) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: rows of one chunk -> their generation_events rows, one model call per batch."""
    rows = [r for b in batches for r in b.to_pylist()]
    if not rows:
        return
    backend = backend_for(spec_json)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["batch_no"], r["sampling"])].append(r)
    for key in sorted(groups):
        items = sorted(groups[key], key=lambda r: r["idx"])
        tasks = [Task(r["event_id"], r["kind"], r["prompt_id"], r["parent_id"], r["round"], r["principle_id"],
                      r["seed"], r["sampling"], make_chat(r), r["attempt"]) for r in items]
        t0 = time.perf_counter()
        gens = generate_batch(backend, [t.chat for t in tasks], Sampling(**json.loads(key[1])), [t.seed for t in tasks])
        per_row_ms = (time.perf_counter() - t0) * 1000 / len(items)
        counters["calls"].add(1)
        results = {i: {"text": parse(t.kind, g.text) if g.text is not None else None, "error": g.error,
                       "finish_reason": g.finish_reason, "prompt_tokens": g.prompt_tokens,
                       "completion_tokens": g.completion_tokens, "latency_ms": per_row_ms}
                   for i, (t, g) in enumerate(zip(tasks, gens))}
        rows = event_rows(tasks, results, constants, job_run_id)
        ok = sum(1 for s in rows.column("status").to_pylist() if s == "ok")
        counters["ok"].add(ok)
        counters["failed"].add(rows.num_rows - ok)
        counters["tokens"].add(sum(x or 0 for x in rows.column("completion_tokens").to_pylist()))
        yield from rows.to_batches()


def run_wave(spark, lake, todo, chunks: list[tuple[int, int, int]], *, make_chat: Callable[[dict], list],
             backend_spec: dict, constants: dict[str, Any], job_run_id: str,
             parse: Callable[[str, str], str] = lambda kind, text: text, slots: int | None = None,
             progress: Callable[[str], None] | None = None) -> RunStats:
    """Generate and append every chunk of `todo`, `slots` chunk jobs at a time; the wave's stats."""
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema
    sc = spark.sparkContext
    counters = {k: sc.accumulator(0) for k in ("calls", "ok", "failed", "tokens")}
    fn = functools.partial(generate_events, spec_json=canonical_json(backend_spec), make_chat=make_chat,
                           parse=parse, constants=constants, job_run_id=job_run_id, counters=counters)
    out_schema = from_arrow_schema(GENERATION_EVENTS)
    path = lake.path("generation_events")
    lake.table("generation_events")   # created (with its schema and properties) before any chunk appends
    stats = RunStats(tasks=sum(n for _, n, _ in chunks), batches=sum(b for _, _, b in chunks))
    done = {"rows": 0, "commits": 0}

    def write(chunk: int) -> None:
        part = todo.where(F.col("chunk") == chunk).coalesce(1)
        part.mapInArrow(fn, out_schema).write.format("delta").mode("append").save(path)

    sizes = {c: n for c, n, _ in chunks}
    with ThreadPoolExecutor(max(1, slots or sc.defaultParallelism)) as pool:
        futures = {pool.submit(write, c): c for c, _, _ in chunks}
        remaining = set(futures)
        while remaining:
            finished, remaining = wait(remaining, return_when=FIRST_EXCEPTION)
            failed = [f for f in finished if f.exception() is not None]
            if failed:   # let the chunks in flight finish (they are committed), start no more
                for f in remaining:
                    f.cancel()
                wait(remaining)
                raise failed[0].exception()
            for f in finished:
                done["rows"] += sizes[futures[f]]
                done["commits"] += 1
            if progress:
                total = stats.tasks
                progress(f"  [{'#' * round(20 * done['rows'] / max(total, 1)):.<20}] {done['rows']}/{total} "
                         f"generations committed in {done['commits']} of {len(chunks)} commits")
    # counted in the tasks (Spark merges a task's counts only when that attempt succeeds)
    stats.model_calls, stats.commits = counters["calls"].value, done["commits"]
    stats.ok, stats.failed, stats.completion_tokens = (counters[k].value for k in ("ok", "failed", "tokens"))
    stats.inserted = stats.ok + stats.failed
    if stats.failed:
        stats.first_error = first_error(lake, todo, job_run_id)
    return stats


def first_error(lake, todo, job_run_id: str) -> str:
    """The error of one failed attempt of this wave (read back only when some failed)."""
    from pyspark.sql import functions as F
    row = (lake.df("generation_events").where((F.col("job_run_id") == job_run_id) & (F.col("status") == "failed"))
           .join(todo.select(F.col("event_id").alias("target_event_id")), "target_event_id", "left_semi")
           .agg(F.min("error")).first())
    return (row[0] if row else None) or "the backend returned no text"
