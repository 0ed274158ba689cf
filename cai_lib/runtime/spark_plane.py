"""The Spark-native data plane: pending work is an anti-join, generation runs in the executors, and the
executors' rows go straight into `generation_events` with delta-spark, one commit per chunk of batches.

Per wave:
1. `pending` anti-joins the successful events away from the wave's steps and drops what gave up. An
   attempt a stopped run had already planned keeps its batch (`work_batches`), so a resumed run makes
   the model calls an uninterrupted run makes; the rest, and only the rest, is cut into new batches
   (input length, then id) and chunks of whole batches, so an increment fills batches of its own.
2. `run_wave` runs each chunk as its own Spark job: a `mapInArrow` task generates the chunk's
   batches and Delta's writer appends them (files from a failed or speculative task attempt are
   never committed: Spark's commit protocol adds only the winning attempt's files). As many chunk
   jobs run at once as there are executor slots, each starting when a slot frees, so no barrier
   holds the cluster and a kill loses only the chunks in flight.
3. Each commit is an idempotent append (see `chunk_app_ids`): its cost does not grow with the table (no
   MERGE scans it), and a chunk appended once is never appended again, by a retry or by another run.

Exactly-once rests on those appends; the job also holds `lake.locks.job_lock` while it runs, which only
saves a second run's duplicate model calls.
"""
from __future__ import annotations

import functools
import json
import time
from collections import defaultdict
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pyarrow as pa

from cai_lib.backends import Sampling
from cai_lib.ids import canonical_json
from cai_lib.runtime.tasks import RunStats, Task, event_rows
from cai_lib.runtime.worker import backend_for, generate_batch
from schemas import GENERATION_EVENTS


@dataclass(frozen=True)
class Chunk:
    """One chunk of a cut: the rows of one Spark job and one idempotent Delta append."""
    plan_id: str
    chunk: int
    rows: int
    batches: int


@dataclass(frozen=True)
class Plane:
    """What every wave of one job run shares: where it writes, which model it runs under which lineage,
    and how its work is cut (`slots`: chunk jobs at once, the executors' cores unless given)."""
    spark: Any
    lake: Any
    backend_spec: dict
    constants: dict
    job_run_id: str
    batch_size: int
    batches_per_commit: int
    progress: Callable[[str], None] | None = None
    slots: int = 0

    def __post_init__(self):
        if not self.slots:
            object.__setattr__(self, "slots", self.spark.sparkContext.defaultParallelism)

    def say(self, line: str) -> None:
        if self.progress:
            self.progress(line)


def keep_text(kind: str, text: str) -> str:
    """The default `parse` of a generation: its text as the model wrote it."""
    return text


@dataclass(frozen=True)
class Calls:
    """What a chunk's task needs to call the model and build its rows (picklable: it goes to the executors)."""
    spec_json: str
    make_chat: Callable[[dict], list]
    constants: dict = field(default_factory=dict)
    job_run_id: str = ""
    parse: Callable[[str, str], str] = keep_text


def successful(events):
    """(event_id, text) of the successful events."""
    from pyspark.sql import functions as F
    return events.where(F.col("status") == "ok").select(F.col("target_event_id").alias("event_id"), "text")


def failure_counts(events):
    """(event_id, tries): failed attempts of each id."""
    from pyspark.sql import functions as F
    return (events.where(F.col("status") != "ok").groupBy(F.col("target_event_id").alias("event_id"))
            .agg(F.count(F.lit(1)).cast("int").alias("tries")))


def most_tries(planned, events) -> int:
    """The most failed attempts any `planned` id (event_id column) without a success has had: what
    --max-attempts must exceed to retry the given-up ones."""
    from pyspark.sql import functions as F
    undone = planned.select("event_id").join(successful(events), "event_id", "left_anti")
    return undone.join(failure_counts(events), "event_id").agg(F.max("tries")).first()[0] or 0


def selected_prompts(lake, splits: list[str], limit: int | None, kinds: tuple[str, ...] = ("red_team", "helpful")):
    """The prompts of `kinds` in the splits with `chosen`: the first `limit` of each kind by id."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    if lake.count("prompts") == 0:
        raise ValueError(f"no prompts in lake {lake.root}: run `cai ingest --lake {lake.root}` first")
    prompts = lake.df("prompts").where(F.col("split").isin(splits) & F.col("kind").isin(*kinds))
    if limit is None:
        return prompts.withColumn("chosen", F.lit(True))
    rank = F.row_number().over(Window.partitionBy("kind").orderBy("prompt_id"))
    return prompts.withColumn("chosen", rank <= limit)


def chunk_batches(batches: int, batches_per_commit: int, slots: int) -> int:
    """Batches per chunk: at most batches_per_commit, and chunks in a multiple of `slots` when there are
    enough batches, so the wave's last round of chunk jobs keeps every slot busy.

    >>> chunk_batches(157, 64, 2), chunk_batches(3, 64, 2), chunk_batches(200, 64, 2), chunk_batches(1, 64, 2)
    (40, 2, 50, 1)
    """
    chunks = -(-batches // batches_per_commit)
    if batches >= slots:
        chunks = -(-chunks // slots) * slots
    return -(-batches // chunks)


def pending(plane: Plane, inputs, ok, failures, *, table: str, plan_id: str, max_attempts: int, plan_filter=None):
    """(todo, gave_up, chunks): the rows of `inputs` (event_id, round, input_len, ...) without a
    successful event in `ok`, with attempt, plan_id, pos, batch_no and chunk; how many are left failed
    after max_attempts; and their [Chunk] in order.

    An attempt planned before (by a run that was stopped before committing it) keeps its batch: a
    resumed run makes the same model calls as an uninterrupted one. Attempts never planned are cut into
    new batches in (input_len, event_id) order, so an increment's rows fill whole batches of their
    own; that plan is appended to `work_batches` before any of its chunks runs."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    lake, batch_size = plane.lake, plane.batch_size
    plans = lake.df("work_batches").where(F.col("target_table") == table)
    if plan_filter is not None:
        plans = plans.where(plan_filter)   # lets the read skip files of other rounds
    # one plan per attempt even if two runs that began at once each recorded one: the same one for every run
    plans = (plans.groupBy("event_id", "attempt").agg(F.min(F.struct("plan_id", "pos", "batch_no", "chunk")).alias("p"))
             .select("event_id", "attempt", "p.*"))
    marked = (inputs.join(ok.select("event_id"), "event_id", "left_anti")
              .join(failures, "event_id", "left").withColumn("tries", F.coalesce("tries", F.lit(0)))
              .withColumn("gave_up", F.col("tries") >= max_attempts)
              .withColumn("attempt", (F.col("tries") + 1).cast("int"))
              .join(plans.select("event_id", "attempt", "plan_id", "pos", "batch_no", "chunk"),
                    ["event_id", "attempt"], "left")
              .withColumn("fresh", F.col("plan_id").isNull() & ~F.col("gave_up")))
    # the new attempts' order: numbered apart from the planned ones (which keep their pos)
    order = F.row_number().over(Window.partitionBy("fresh").orderBy("input_len", "event_id")) - 1
    marked = marked.withColumn("pos", F.when(F.col("fresh"), order.cast("long")).otherwise(F.col("pos")))
    # Materialized apart from the tables it was read from: each chunk's append makes Spark re-run every
    # cached plan that reads generation_events (recacheByPath), which would redo the anti-join per chunk.
    marked = marked.localCheckpoint(eager=True)
    # one aggregate: how many gave up, how many are fresh, and the chunks of the attempts planned before
    groups = (marked.groupBy("gave_up", "fresh", "plan_id", "chunk")
              .agg(F.count(F.lit(1)).alias("n"), F.countDistinct("batch_no").alias("batches")).collect())
    gave_up = sum(r["n"] for r in groups if r["gave_up"])
    n_fresh = sum(r["n"] for r in groups if r["fresh"])
    per_chunk = chunk_batches(max(1, -(-n_fresh // batch_size)), plane.batches_per_commit, plane.slots)
    batch_no = F.floor(F.col("pos") / batch_size)
    todo = (marked.where(~F.col("gave_up"))
            .withColumn("plan_id", F.coalesce("plan_id", F.lit(plan_id)))
            .withColumn("batch_no", F.coalesce("batch_no", batch_no))
            .withColumn("chunk", F.coalesce("chunk", F.floor(batch_no / per_chunk))))
    if n_fresh:
        record_plan(lake, todo.where("fresh"), table)
    planned = [Chunk(r["plan_id"], r["chunk"], r["n"], r["batches"]) for r in groups if not r["gave_up"] and not r["fresh"]]
    return todo, gave_up, sorted(planned + fresh_chunks(plan_id, n_fresh, batch_size, per_chunk), key=chunk_key)


def cut(plane: Plane, rows, plan_id: str):
    """(rows with plan_id, pos, batch_no and chunk; their [Chunk]): batches in (input_len, event_id) order
    and chunks of whole batches, for work whose batching does not change its results (scoring: no
    sampling, so no plan is kept for a resume)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    n, batch_size = rows.count(), plane.batch_size
    per_chunk = chunk_batches(max(1, -(-n // batch_size)), plane.batches_per_commit, plane.slots)
    batch_no = F.floor(F.col("pos") / batch_size)
    out = (rows.withColumn("pos", (F.row_number().over(Window.orderBy("input_len", "event_id")) - 1).cast("long"))
           .withColumn("batch_no", batch_no).withColumn("chunk", F.floor(batch_no / per_chunk))
           .withColumn("plan_id", F.lit(plan_id)).localCheckpoint(eager=True))
    return out, fresh_chunks(plan_id, n, batch_size, per_chunk)


def fresh_chunks(plan_id: str, n: int, batch_size: int, per_chunk: int) -> list[Chunk]:
    """The chunks of n rows numbered 0..n-1 (pos) in batches of batch_size and chunks of per_chunk
    batches: a cut's chunks, known without reading its rows.

    >>> [(c.chunk, c.rows, c.batches) for c in fresh_chunks("p", 300, 64, 2)], fresh_chunks("p", 0, 64, 2)
    ([(0, 128, 2), (1, 128, 2), (2, 44, 1)], [])
    """
    rows = batch_size * per_chunk
    return [Chunk(plan_id, c, min(n, (c + 1) * rows) - c * rows, min(per_chunk, -(-(n - c * rows) // batch_size)))
            for c in range(-(-n // rows))]


def chunk_key(c: Chunk) -> tuple[str, int]:
    return c.plan_id, c.chunk


def chunk_rows(todo, c: Chunk):
    """One chunk of a cut, in one partition: the rows of one Spark task."""
    from pyspark.sql import functions as F
    return todo.where((F.col("plan_id") == c.plan_id) & (F.col("chunk") == c.chunk)).coalesce(1)


def chunk_app_ids(todo, table: str, key: tuple[str, ...] = ("event_id", "attempt")) -> dict[tuple[str, int], str]:
    """{(plan_id, chunk): the app id of its idempotent append to `table`}: `cai/<table>/<sha256 of the
    chunk's sorted keys>`, the content that decides its rows, never the run that cut it.

    Why the same rows can never land twice: a chunk writes one row per key (generation: the success or
    the failed-attempt row of each event_id#attempt; scoring: the label of each event_id that scored).
    Two runs cut the same chunks: an attempt planned before keeps its recorded cut (`work_batches`, one
    plan per attempt), and a fresh cut is a function of the pending rows (input_len, event_id order;
    sizes from their count and the settings), so two runs that see the same pending rows cut them alike,
    whatever plan_id each named; a run that sees the first one's plan reuses it. Same keys, same app id:
    Delta skips the second append. And why a retry is never skipped wrongly: once a chunk committed, each
    of its keys is done (a success, or a failed attempt n whose retry is attempt n+1; a scoring chunk
    commits only with at least one label), so no later pending set repeats a committed chunk's keys."""
    from pyspark.sql import functions as F
    keys = F.concat_ws("#", *(F.col(c).cast("string") for c in key))
    sha = F.sha2(F.concat_ws(",", F.array_sort(F.collect_list(keys))), 256)
    return {(r["plan_id"], r["chunk"]): f"cai/{table}/{r['sha']}"
            for r in todo.groupBy("plan_id", "chunk").agg(sha.alias("sha")).collect()}


def rows_app_id(rows, table: str, key: tuple[str, ...] = ("event_id",)) -> str:
    """The app id of appending all of `rows` at once: `chunk_app_ids` of them as one chunk."""
    from pyspark.sql import functions as F
    rows = rows.select(F.lit("all").alias("plan_id"), F.lit(0).alias("chunk"), *key)
    return chunk_app_ids(rows, table, key)[("all", 0)]


def record_plan(lake, planned, table: str) -> None:
    """Append the batches just cut to work_batches (one commit), before any of them runs: idempotent on
    the attempts it plans, so of two runs that cut the same pending rows at once only one plan lands."""
    from pyspark.sql import functions as F
    lake.table("work_batches")
    app_id = rows_app_id(planned, "work_batches", ("event_id", "attempt"))
    rows = planned.select(F.concat_ws("#", "event_id", F.col("attempt").cast("string")).alias("work_id"),
                          F.lit(table).alias("target_table"), "event_id", "attempt",
                          F.col("round").cast("int").alias("round"), "plan_id", "pos", "batch_no", "chunk",
                          F.current_timestamp().alias("created_at"))
    lake.idempotent_append("work_batches", rows, app_id)


def generate_events(batches: Iterator[pa.RecordBatch], calls: Calls, counters: dict) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: rows of one chunk -> their generation_events rows, one model call per batch."""
    rows = [r for b in batches for r in b.to_pylist()]
    if not rows:
        return
    backend, make_chat, parse = backend_for(calls.spec_json), calls.make_chat, calls.parse
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["plan_id"], r["batch_no"], r["sampling"])].append(r)
    for key in sorted(groups):
        items = sorted(groups[key], key=lambda r: r["pos"])
        tasks = [Task(r["event_id"], r["kind"], r["prompt_id"], r["parent_id"], r["round"], r["principle_id"],
                      r["seed"], r["sampling"], make_chat(r), r["attempt"]) for r in items]
        t0 = time.perf_counter()
        gens = generate_batch(backend, [t.chat for t in tasks], Sampling(**json.loads(key[2])), [t.seed for t in tasks])
        per_row_ms = (time.perf_counter() - t0) * 1000 / len(items)
        counters["calls"].add(1)
        results = {i: {"text": parse(t.kind, g.text) if g.text is not None else None, "error": g.error,
                       "finish_reason": g.finish_reason, "prompt_tokens": g.prompt_tokens,
                       "completion_tokens": g.completion_tokens, "latency_ms": per_row_ms}
                   for i, (t, g) in enumerate(zip(tasks, gens))}
        rows = event_rows(tasks, results, calls.constants, calls.job_run_id)
        ok = sum(1 for s in rows.column("status").to_pylist() if s == "ok")
        counters["ok"].add(ok)
        counters["failed"].add(rows.num_rows - ok)
        counters["tokens"].add(sum(x or 0 for x in rows.column("completion_tokens").to_pylist()))
        yield from rows.to_batches()


def run_wave(plane: Plane, todo, chunks: list[Chunk], make_chat: Callable[[dict], list],
             parse: Callable[[str, str], str] = keep_text) -> RunStats:
    """Generate and append every chunk of `todo`, `plane.slots` chunk jobs at a time; the wave's stats."""
    from pyspark.sql.pandas.types import from_arrow_schema
    sc, lake = plane.spark.sparkContext, plane.lake
    counters = {k: sc.accumulator(0) for k in ("calls", "ok", "failed", "tokens")}
    calls = Calls(canonical_json(plane.backend_spec), make_chat, plane.constants, plane.job_run_id, parse)
    fn = functools.partial(generate_events, calls=calls, counters=counters)
    out_schema = from_arrow_schema(GENERATION_EVENTS)
    lake.table("generation_events")   # created (with its schema and properties) before any chunk appends
    stats = RunStats(tasks=sum(c.rows for c in chunks), batches=sum(c.batches for c in chunks))
    app_ids = chunk_app_ids(todo, "generation_events")

    def write(c: Chunk) -> None:
        lake.idempotent_append("generation_events", chunk_rows(todo, c).mapInArrow(fn, out_schema), app_ids[chunk_key(c)])

    done = run_chunks(chunks, write, plane.slots, plane.progress, "generations")
    # counted in the tasks (Spark merges a task's counts only when that attempt succeeds)
    stats.model_calls, stats.commits = counters["calls"].value, done
    stats.ok, stats.failed, stats.completion_tokens = (counters[k].value for k in ("ok", "failed", "tokens"))
    stats.inserted = stats.ok + stats.failed
    if stats.failed:
        stats.first_error = first_error(lake, todo, plane.job_run_id)
    return stats


def run_step(plane: Plane, planned, *, kind: str, plan_id: str, make_chat: Callable[[dict], list], max_attempts: int,
             what: str) -> tuple[RunStats, int, int]:
    """One wave of `planned` generation rows of one `kind` (pair samples, eval answers): pending against
    their own events, generated and appended; (stats, gave up, the most tries of one id) for Failures.of."""
    from pyspark.sql import functions as F
    events = plane.lake.df("generation_events").where(F.col("kind") == kind)
    mine = events.join(planned.select(F.col("event_id").alias("target_event_id")), "target_event_id",
                       "left_semi").select("target_event_id", "status", "text").localCheckpoint(eager=True)
    todo, gave_up, chunks = pending(plane, planned, successful(mine), failure_counts(mine), table="generation_events",
                                    plan_id=plan_id, max_attempts=max_attempts)
    stats, n = RunStats(), sum(c.rows for c in chunks)
    if n:
        plane.say(f"{n} {what} in {len(chunks)} commits")
        stats = run_wave(plane, todo, chunks, make_chat)
    return stats, gave_up, most_tries(planned, plane.lake.df("generation_events").where(F.col("kind") == kind))


def run_chunks(chunks: list[Chunk], write: Callable[[Chunk], None], slots: int,
               progress: Callable[[str], None] | None, what: str) -> int:
    """Run `write(chunk)` for every chunk, `slots` at a time, each starting when one ends; the number
    committed. After a failure the chunks in flight finish (they are committed) and no more start."""
    total, rows, commits = sum(c.rows for c in chunks), 0, 0
    with ThreadPoolExecutor(max(1, slots)) as pool:
        futures = {pool.submit(write, c): c for c in chunks}
        remaining = set(futures)
        while remaining:
            finished, remaining = wait(remaining, return_when=FIRST_EXCEPTION)
            failed = [f for f in finished if f.exception() is not None]
            if failed:
                for f in remaining:
                    f.cancel()
                wait(remaining)
                raise failed[0].exception()
            for f in finished:
                rows += futures[f].rows
                commits += 1
            if progress:
                progress(f"  [{'#' * round(20 * rows / max(total, 1)):.<20}] {rows}/{total} "
                         f"{what} committed in {commits} of {len(chunks)} commits")
    return commits


def first_error(lake, todo, job_run_id: str) -> str:
    """The error of one failed attempt of this wave (read back only when some failed)."""
    from pyspark.sql import functions as F
    row = (lake.df("generation_events").where((F.col("job_run_id") == job_run_id) & (F.col("status") == "failed"))
           .join(todo.select(F.col("event_id").alias("target_event_id")), "target_event_id", "left_semi")
           .agg(F.min("error")).first())
    return (row[0] if row else None) or "the backend returned no text"
