"""The Spark-native data plane: pending work is an anti-join, generation runs in the executors, and the
executors' rows go straight into `generation_events` with delta-spark, one commit per chunk of batches.

Per wave:
1. `pending` anti-joins the successful events away from the wave's steps and drops what gave up. An
   attempt a stopped run had already planned keeps its batch (`work_batches`), so a resumed run makes
   the model calls an uninterrupted run makes; the rest, and only the rest, is cut into new batches
   (input length, then id) and chunks of whole batches, so an increment fills batches of its own.
   A chunk carries about `chunk_seconds` of model time (`chunking.py`), at most `batches_per_commit`
   batches: the wave's first batches (one per slot) are chunks of one batch (the probe) and the others
   are planned UNSIZED; once the probe (or an earlier wave) has measured the model, `cut_rest` cuts
   them into chunks; unless the job holds the lake's lock, it records that cut, which every run then reads
   back and runs.
2. `run_wave` runs each chunk as its own Spark job: a `mapInArrow` task generates the chunk's
   batches and Delta's writer appends them (files from a failed or speculative task attempt are
   never committed: Spark's commit protocol adds only the winning attempt's files). One more chunk
   job runs at once than there are executor slots, each starting when one ends, so a slot whose task
   is done takes the next queued task while the driver commits the finished chunk, no barrier holds
   the cluster, and a kill loses only the chunks in flight. Nothing of a wave commits before its plan has
   landed; a chunk job that starts while it lands brings its rows to the driver to wait for it there, so
   no engine waits for the record.
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
from concurrent.futures import wait
from typing import Callable, Iterator

import pyarrow as pa

from cai_lib.backends import Sampling
from cai_lib.ids import canonical_json
from cai_lib.runtime.plans import plans_of, record_plan  # noqa: F401
from cai_lib.runtime.inflight import (HELD_ROWS, Held, collect_chunks, on_driver, run_chunks,  # noqa: F401
                                      started)
from cai_lib.runtime.app_ids import (app_ids_of, batch_keys, chunk_app_ids, keys_sha, rows_app_id,  # noqa: F401
                                     sized_cut)
from cai_lib.runtime.chunking import (SIZED, UNSIZED, Calls, Chunk, Pending, Plane, chunk_batches,  # noqa: F401
                                      chunk_key, keep_text, probe_batches, rest_layout)
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


def most_tries(planned, events, gave_up: int) -> int:
    """The most failed attempts any `planned` id (event_id column) without a success has had: what
    --max-attempts must exceed to retry the given-up ones. Only the message of work that gave up shows it
    (Failures.describe), so with `gave_up` 0 it is 0 and no Spark job reads the events."""
    if not gave_up:
        return 0
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


def pending(plane: Plane, inputs, ok, failures, *, table: str, plan_id: str, max_attempts: int, plan_filter=None):
    """The wave's Pending work: the rows of `inputs` (event_id, round, input_len, ...) without a successful
    event in `ok`, with attempt, plan_id, pos, batch_no and chunk; how many are left failed after
    max_attempts; their chunks in order, and the batches left UNSIZED until the probe has run.

    An attempt planned before (by a run that was stopped before committing it) keeps its batch: a
    resumed run makes the same model calls as an uninterrupted one. Attempts never planned are cut into
    new batches in (input_len, event_id) order, so an increment's rows fill whole batches of their
    own; that plan is appended to `work_batches` (`Pending.recorded`: on a thread of its own, while the
    probe generates) before any of its chunks commits."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    lake, batch_size = plane.lake, plane.batch_size
    plans = plans_of(lake, table, plan_filter)
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
    # one aggregate: how many gave up, how many are fresh, the chunks of the attempts planned before, and
    # the fresh ones' plan's app id (record_plan's: keys event_id#attempt#tag, tag "" for an unsized plan)
    groups = (marked.withColumn("tag", F.lit("")).groupBy("gave_up", "fresh", "plan_id", "chunk")
              .agg(F.count(F.lit(1)).alias("n"), F.countDistinct("batch_no").alias("batches"),
                   keys_sha(("event_id", "attempt", "tag")).alias("sha")).collect())
    gave_up = sum(r["n"] for r in groups if r["gave_up"])
    n_fresh = sum(r["n"] for r in groups if r["fresh"])
    fresh_batches = -(-n_fresh // batch_size)
    probe = probe_batches(fresh_batches, plane.batches_per_commit, plane.slots, plane.chunk_seconds)
    batch_no = F.floor(F.col("pos") / batch_size)
    fresh_chunk = (F.when(batch_no < probe, batch_no).otherwise(F.lit(UNSIZED)) if probe
                   else spread_chunk(batch_no, F.lit(fresh_batches), plane.per_chunk(fresh_batches)))
    todo = (marked.where(~F.col("gave_up"))
            .withColumn("plan_id", F.coalesce("plan_id", F.lit(plan_id)))
            .withColumn("batch_no", F.coalesce("batch_no", batch_no))
            .withColumn("chunk", F.coalesce("chunk", fresh_chunk)))
    # recorded while the probe runs; nothing of the wave commits before it has landed (run_wave)
    plan_app_id = next((f"cai/work_batches/{r['sha']}" for r in groups if r["fresh"]), None)
    recorded = started(record_plan, lake, todo.where("fresh"), table, False, plan_app_id) if n_fresh else None
    kept = [r for r in groups if not r["gave_up"] and not r["fresh"]]
    layout = fresh_chunks(plan_id, n_fresh, batch_size, probe, 1 if probe else plane.per_chunk(fresh_batches))
    chunks = [Chunk(r["plan_id"], r["chunk"], r["n"], r["batches"]) for r in kept if r["chunk"] != UNSIZED]
    out = Pending(todo, gave_up, sorted(chunks + (layout[:probe] if probe else layout), key=chunk_key), table,
                  plan_filter, recorded=recorded)
    unsized = [(r["n"], r["batches"]) for r in kept if r["chunk"] == UNSIZED]
    unsized += [(c.rows, c.batches) for c in layout[probe:]] if probe else []
    out.unsized_rows, out.unsized_batches = sum(n for n, _ in unsized), sum(b for _, b in unsized)
    if out.unsized_rows and plane.exclusive:   # read while the probe runs: cut_rest then needs no Spark job
        out.unsized_keys = started(batch_keys, todo.where(F.col("chunk") == UNSIZED))
    return out


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
           .withColumn("batch_no", batch_no).withColumn("chunk", spread_chunk(batch_no, F.lit(-(-n // batch_size)),
                                                                               per_chunk))
           .withColumn("plan_id", F.lit(plan_id)).localCheckpoint(eager=True))
    return out, fresh_chunks(plan_id, n, batch_size, 0, per_chunk)


def spread_chunk(idx, batches, per_chunk: int):
    """Column: the chunk of batch `idx` (0-based) of `batches` (columns) cut as `chunking.spread` cuts them."""
    from pyspark.sql import functions as F
    n = F.ceil(batches / per_chunk)
    q = F.floor(batches / n)
    big = (batches - q * n) * (q + 1)   # the first (batches mod n) chunks hold q + 1 batches
    return F.when(idx < big, F.floor(idx / (q + 1))).otherwise(batches - q * n + F.floor((idx - big) / q))


def chunk_column(chunk_of: dict[tuple[str, int], int]):
    """Column: the chunk of each row from {(plan_id, batch_no): chunk}, a chunk being a range of its plan's
    batches (`sized_cut`): one CASE branch per chunk, evaluated in each chunk's task (no join, no job)."""
    from pyspark.sql import functions as F
    ranges: dict[tuple[str, int], list[int]] = {}
    for (plan_id, batch_no), chunk in chunk_of.items():
        ranges.setdefault((plan_id, chunk), []).append(batch_no)
    out = F
    for (plan_id, chunk), batches in sorted(ranges.items()):
        out = out.when((F.col("plan_id") == plan_id) & F.col("batch_no").between(min(batches), max(batches)),
                       F.lit(chunk))
    return out.otherwise(F.lit(UNSIZED))


def fresh_chunks(plan_id: str, n: int, batch_size: int, probe: int, per_chunk: int) -> list[Chunk]:
    """The chunks of n rows numbered 0..n-1 (pos) in batches of batch_size: the first `probe` batches one
    per chunk, then chunks of per_chunk batches (chunking.rest_layout): known without reading the rows.

    >>> [(c.chunk, c.rows, c.batches) for c in fresh_chunks("p", 300, 64, 0, 2)], fresh_chunks("p", 0, 64, 0, 2)
    ([(0, 128, 2), (1, 128, 2), (2, 44, 1)], [])
    >>> [(c.chunk, c.rows, c.batches) for c in fresh_chunks("p", 300, 64, 2, 2)]
    [(0, 64, 1), (1, 64, 1), (2, 128, 2), (3, 44, 1)]
    """
    return [Chunk(plan_id, c, min(n, (first + k) * batch_size) - first * batch_size, k)
            for c, (first, k) in enumerate(rest_layout(-(-n // batch_size), probe, per_chunk))]


def chunk_rows(todo, c: Chunk):
    """One chunk of a cut, in one partition: the rows of one Spark task."""
    from pyspark.sql import functions as F
    return todo.where((F.col("plan_id") == c.plan_id) & (F.col("chunk") == c.chunk)).coalesce(1)


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
        seconds = time.perf_counter() - t0
        per_row_ms = seconds * 1000 / len(items)
        counters["calls"].add(1)
        counters["seconds"].add(seconds)
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


def run_wave(plane: Plane, wave: Pending, make_chat: Callable[[dict], list],
             parse: Callable[[str, str], str] = keep_text) -> RunStats:
    """Generate and append every chunk of the wave, chunk jobs running while earlier ones commit; the
    wave's stats. Its UNSIZED batches are cut by the model's time per batch: measured by an earlier wave,
    or by this wave's first chunks (the probe), which run while `pending` records the wave's plan: their
    rows wait on the driver, since nothing of a wave commits before its plan, then land in one append
    beside the sized chunks (its app id hashes all their keys, which any run with the same pending rows
    probes alike). Any chunk job that starts before the plan has landed does the same (`Held`: a bounded
    number of rows)."""
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema
    sc, lake = plane.spark.sparkContext, plane.lake
    counters = {k: sc.accumulator(0) for k in ("calls", "ok", "failed", "tokens")}
    counters["seconds"] = sc.accumulator(0.0)
    calls = Calls(canonical_json(plane.backend_spec), make_chat, plane.constants, plane.job_run_id, parse)
    fn = functools.partial(generate_events, calls=calls, counters=counters)
    out_schema = from_arrow_schema(GENERATION_EVENTS)
    lake.table("generation_events")   # created (with its schema and properties) before any chunk appends
    stats = RunStats(tasks=wave.rows, batches=sum(c.batches for c in wave.chunks) + wave.unsized_batches)
    held = Held(HELD_ROWS)

    def generated(rows) -> Callable[[Chunk], object]:
        return lambda c: chunk_rows(rows, c).mapInArrow(fn, out_schema, profile=plane.profile)

    def append_once(rows, app_id: str) -> None:
        plan_landed(wave)
        lake.idempotent_append("generation_events", rows, app_id)

    def write(c: Chunk, rows, app_id: str) -> None:
        """A chunk job that starts while the plan lands runs to the driver, its rows appended once it has
        landed: the engine does not wait for the record (about 2 s a wave on a cluster). Only where Delta's
        jobs run beside the engines: elsewhere the record's jobs need an engine's slot, and would wait for
        the chunk's task, and every commit for them."""
        if not plane.beside or wave.recorded is None or wave.recorded.done() or not held.take(c.rows):
            return append_once(rows, app_id)
        try:
            append_once(on_driver(plane.spark, [rows.toArrow()]), app_id)
        finally:
            held.give(c.rows)

    def write_all(chunks: list[Chunk], frame: Callable[[Chunk], object], app_ids: dict) -> int:
        return run_chunks(chunks, lambda c: write(c, frame(c), app_ids[chunk_key(c)]), plane.slots, plane.progress,
                          "generations", plane.queued)

    appended = None
    try:
        if not wave.unsized_rows:
            done = write_all(wave.chunks, generated(wave.todo), chunk_app_ids(wave.todo, "generation_events"))
        elif plane.meter.per_batch("generate") is not None or not wave.chunks:   # measured before: no barrier
            rows, chunks, _ = cut_rest(plane, wave)   # app ids of the union: kept and new chunks hashed as one cut
            rows = rows.unionByName(wave.todo.where(F.col("chunk") != UNSIZED))
            done = write_all(wave.chunks + chunks, generated(rows), chunk_app_ids(rows, "generation_events"))
        else:   # the probe (and kept chunks) first, their rows back on the driver; the rest cut by their time
            probed = collect_chunks(wave.chunks, generated(wave.todo), plane.slots)
            plane.meter.record("generate", counters["seconds"].value, counters["calls"].value)

            def append_probed() -> int:   # one commit (one task) on a thread of its own: no chunk job waits for it
                warm_state(plane.spark, lake.path("generation_events"))
                app_id = rows_app_id(wave.todo.where(F.col("chunk") != UNSIZED), "generation_events",
                                     ("event_id", "attempt"))
                append_once(on_driver(plane.spark, probed.values()), app_id)
                return 1
            appended = started(append_probed)
            rows, chunks, sized_ids = cut_rest(plane, wave)
            done = write_all(chunks, generated(rows), sized_ids) + appended.result()
    finally:
        # no thread of the wave's (the plan's record, the batches' keys, the probe's append) runs on after it
        wait([f for f in (wave.recorded, wave.unsized_keys, appended) if f is not None])
    plan_landed(wave)
    plane.meter.record("generate", counters["seconds"].value, counters["calls"].value)
    # counted in the tasks (Spark merges a task's counts only when that attempt succeeds)
    stats.model_calls, stats.commits = counters["calls"].value, done
    stats.ok, stats.failed, stats.completion_tokens = (counters[k].value for k in ("ok", "failed", "tokens"))
    stats.inserted = stats.ok + stats.failed
    if stats.failed:
        stats.first_error = first_error(lake, wave.todo, plane.job_run_id)
    return stats


def warm_state(spark, path: str) -> None:
    """Compute the Delta table's state (its snapshot's files and app ids, what the first idempotent append
    checks) now, while the plan lands, not when the first chunk job starts: DESCRIBE DETAIL needs it, and
    Delta keeps it with the snapshot until the next commit."""
    spark.sql(f"DESCRIBE DETAIL delta.`{path}`").collect()


def plan_landed(wave: Pending) -> None:
    """Return once the wave's plan has landed in work_batches (raising what recording it raised)."""
    if wave.recorded is not None:
        wave.recorded.result()


def cut_rest(plane: Plane, wave: Pending):
    """(rows, chunks, their app ids) of the wave's UNSIZED batches, cut into chunks by the measured time.

    Unlocked (a cloud lake, where `job_lock` holds nothing), two runs may size the same batches at once, each
    by its own probe: the cut is recorded in work_batches (first writer wins: one idempotent append per set
    of attempts) and read back, so both run the one cut that landed and their appends share app ids.
    Under the job's lock (`plane.exclusive`) no other run can size them, and the cut is neither recorded
    nor read back: its batches are recorded already (`pending`), so a run resumed after a kill makes the
    same model calls whichever way it groups them, and its pending set holds none that committed. There the
    cut is made on the driver from the batches' keys, which `pending` reads while the probe runs
    (`sized_cut`): the probe barrier runs no Spark job (it took 0.6-2 s at GPU-like speed, more on a cluster)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    per_chunk = plane.per_chunk(wave.unsized_batches)
    rest = wave.todo.where(F.col("chunk") == UNSIZED)
    if wave.unsized_keys is not None:   # under the lock: cut on the driver, from the batches' keys
        chunks, ids, chunk_of = sized_cut(wave.unsized_keys.result(), per_chunk, SIZED, "generation_events")
        rows = rest.withColumn("chunk", chunk_column(chunk_of))
    else:   # recorded, read back, and hashed by Spark
        plan_landed(wave)   # the cut's record lands after the batches' own (pending's)
        # each plan's unsized batches numbered 0.. (a resumed plan's may have gaps), then spread in chunks
        idx = F.dense_rank().over(Window.partitionBy("plan_id").orderBy("batch_no")) - 1
        last = F.max("idx").over(Window.partitionBy("plan_id"))
        sized = rest.withColumn("idx", idx).withColumn("chunk", F.lit(SIZED) + spread_chunk(F.col("idx"), last + 1,
                                                                                            per_chunk)).drop("idx")
        record_plan(plane.lake, sized, wave.table, sized=True)
        kept = plans_of(plane.lake, wave.table, wave.plan_filter)
        rows = (rest.drop("plan_id", "pos", "batch_no", "chunk").join(kept, ["event_id", "attempt"])
                .localCheckpoint(eager=True))
        groups = rows.groupBy("plan_id", "chunk").agg(F.count(F.lit(1)).alias("n"),
                                                      F.countDistinct("batch_no").alias("batches"),
                                                      keys_sha().alias("sha")).collect()
        chunks, ids = [Chunk(r["plan_id"], r["chunk"], r["n"], r["batches"]) for r in groups], app_ids_of(
            groups, "generation_events")
    plane.say(f"  {wave.unsized_batches} batches in {len(chunks)} commits "
              f"({plane.meter.per_batch('generate') or 0:.3f} s a batch measured)")
    return rows, sorted(chunks, key=chunk_key), ids


def run_step(plane: Plane, planned, *, kind: str, plan_id: str, make_chat: Callable[[dict], list], max_attempts: int,
             what: str) -> tuple[RunStats, int, int]:
    """One wave of `planned` generation rows of one `kind` (pair samples, eval answers): pending against
    their own events, generated and appended; (stats, gave up, the most tries of one id) for Failures.of."""
    from pyspark.sql import functions as F
    events = plane.lake.df("generation_events").where(F.col("kind") == kind)
    mine = events.join(planned.select(F.col("event_id").alias("target_event_id")), "target_event_id",
                       "left_semi").select("target_event_id", "status", "text").localCheckpoint(eager=True)
    wave = pending(plane, planned, successful(mine), failure_counts(mine), table="generation_events",
                   plan_id=plan_id, max_attempts=max_attempts)
    stats = RunStats()
    if wave.rows:
        plane.say(f"{wave.rows} {what} in {wave.describe()}")
        stats = run_wave(plane, wave, make_chat)
    return stats, wave.gave_up, most_tries(planned, plane.lake.df("generation_events").where(F.col("kind") == kind),
                                           wave.gave_up)


def first_error(lake, todo, job_run_id: str) -> str:
    """The error of one failed attempt of this wave (read back only when some failed)."""
    from pyspark.sql import functions as F
    row = (lake.df("generation_events").where((F.col("job_run_id") == job_run_id) & (F.col("status") == "failed"))
           .join(todo.select(F.col("event_id").alias("target_event_id")), "target_event_id", "left_semi")
           .agg(F.min("error")).first())
    return (row[0] if row else None) or "the backend returned no text"
