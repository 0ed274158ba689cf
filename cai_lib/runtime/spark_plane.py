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
   the cluster, and a kill loses only the chunks in flight.
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
from typing import Callable, Iterator

import pyarrow as pa

from cai_lib.backends import Sampling
from cai_lib.ids import canonical_json
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
    own; that plan is appended to `work_batches` before any of its chunks runs."""
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
    # one aggregate: how many gave up, how many are fresh, and the chunks of the attempts planned before
    groups = (marked.groupBy("gave_up", "fresh", "plan_id", "chunk")
              .agg(F.count(F.lit(1)).alias("n"), F.countDistinct("batch_no").alias("batches")).collect())
    gave_up = sum(r["n"] for r in groups if r["gave_up"])
    n_fresh = sum(r["n"] for r in groups if r["fresh"])
    fresh_batches = -(-n_fresh // batch_size)
    probe = probe_batches(fresh_batches, plane.batches_per_commit, plane.slots, plane.chunk_seconds)
    batch_no = F.floor(F.col("pos") / batch_size)
    fresh_chunk = (F.when(batch_no < probe, batch_no).otherwise(F.lit(UNSIZED)) if probe
                   else F.floor(batch_no / plane.per_chunk(fresh_batches)))
    todo = (marked.where(~F.col("gave_up"))
            .withColumn("plan_id", F.coalesce("plan_id", F.lit(plan_id)))
            .withColumn("batch_no", F.coalesce("batch_no", batch_no))
            .withColumn("chunk", F.coalesce("chunk", fresh_chunk)))
    if n_fresh:
        record_plan(lake, todo.where("fresh"), table)
    kept = [r for r in groups if not r["gave_up"] and not r["fresh"]]
    layout = fresh_chunks(plan_id, n_fresh, batch_size, probe, 1 if probe else plane.per_chunk(fresh_batches))
    chunks = [Chunk(r["plan_id"], r["chunk"], r["n"], r["batches"]) for r in kept if r["chunk"] != UNSIZED]
    out = Pending(todo, gave_up, sorted(chunks + (layout[:probe] if probe else layout), key=chunk_key), table,
                  plan_filter)
    unsized = [(r["n"], r["batches"]) for r in kept if r["chunk"] == UNSIZED]
    unsized += [(c.rows, c.batches) for c in layout[probe:]] if probe else []
    out.unsized_rows, out.unsized_batches = sum(n for n, _ in unsized), sum(b for _, b in unsized)
    return out


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
    return out, fresh_chunks(plan_id, n, batch_size, 0, per_chunk)


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
    return app_ids_of(todo.groupBy("plan_id", "chunk").agg(keys_sha(key).alias("sha")).collect(), table)


def app_ids_of(groups, table: str) -> dict[tuple[str, int], str]:
    """{(plan_id, chunk): app id} from aggregated rows with plan_id, chunk and sha (`keys_sha`)."""
    return {(r["plan_id"], r["chunk"]): f"cai/{table}/{r['sha']}" for r in groups}


def keys_sha(key: tuple[str, ...] = ("event_id", "attempt")):
    """An aggregate: the sha256 of a group's sorted keys (`chunk_app_ids`' content hash)."""
    from pyspark.sql import functions as F
    keys = F.concat_ws("#", *(F.col(c).cast("string") for c in key))
    return F.sha2(F.concat_ws(",", F.array_sort(F.collect_list(keys))), 256)


def rows_app_id(rows, table: str, key: tuple[str, ...] = ("event_id",)) -> str:
    """The app id of appending all of `rows` at once: `chunk_app_ids` of them as one chunk."""
    from pyspark.sql import functions as F
    rows = rows.select(F.lit("all").alias("plan_id"), F.lit(0).alias("chunk"), *key)
    return chunk_app_ids(rows, table, key)[("all", 0)]


def record_plan(lake, planned, table: str, sized: bool = False) -> None:
    """Append the batches just cut to work_batches (one commit), before any of them runs: idempotent on
    the attempts it plans, so of two runs that cut the same pending rows at once only one plan lands.
    `sized`: the chunks of batches planned UNSIZED, rows of their own (work_id `...#sized`, app id apart)."""
    from pyspark.sql import functions as F
    lake.table("work_batches")
    tag = F.lit("#sized" if sized else "")
    app_id = rows_app_id(planned.withColumn("tag", tag), "work_batches", ("event_id", "attempt", "tag"))
    rows = planned.select(F.concat("event_id", F.lit("#"), F.col("attempt").cast("string"), tag).alias("work_id"),
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
    or by this wave's first chunks (the probe), which then run first."""
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

    def write_all(rows, chunks: list[Chunk], app_ids: dict | None = None) -> int:
        app_ids = chunk_app_ids(rows, "generation_events") if app_ids is None else app_ids
        return run_chunks(chunks, lambda c: lake.idempotent_append(
            "generation_events", chunk_rows(rows, c).mapInArrow(fn, out_schema, profile=plane.profile),
            app_ids[chunk_key(c)]),
            plane.slots, plane.progress, "generations")

    if not wave.unsized_rows:
        done = write_all(wave.todo, wave.chunks)
    elif plane.meter.per_batch("generate") is not None or not wave.chunks:   # measured before: no barrier
        rows, chunks, _ = cut_rest(plane, wave)   # app ids of the union: kept and new chunks hashed as one cut
        done = write_all(rows.unionByName(wave.todo.where(F.col("chunk") != UNSIZED)), wave.chunks + chunks)
    else:   # the probe (and kept chunks) first, then the rest cut by their measured time
        done = write_all(wave.todo, wave.chunks)
        plane.meter.record("generate", counters["seconds"].value, counters["calls"].value)
        done += write_all(*cut_rest(plane, wave))
    plane.meter.record("generate", counters["seconds"].value, counters["calls"].value)
    # counted in the tasks (Spark merges a task's counts only when that attempt succeeds)
    stats.model_calls, stats.commits = counters["calls"].value, done
    stats.ok, stats.failed, stats.completion_tokens = (counters[k].value for k in ("ok", "failed", "tokens"))
    stats.inserted = stats.ok + stats.failed
    if stats.failed:
        stats.first_error = first_error(lake, wave.todo, plane.job_run_id)
    return stats


def cut_rest(plane: Plane, wave: Pending):
    """(rows, chunks, their app ids) of the wave's UNSIZED batches, cut into chunks by the measured time.

    Unlocked (a cloud lake, where `job_lock` holds nothing), two runs may size the same batches at once, each
    by its own probe: the cut is recorded in work_batches (first writer wins: one idempotent append per set
    of attempts) and read back, so both run the one cut that landed and their appends share app ids.
    Under the job's lock (`plane.exclusive`) no other run can size them, and the cut is neither recorded
    nor read back: its batches are recorded already (`pending`), so a run resumed after a kill makes the
    same model calls whichever way it groups them, and its pending set holds none that committed. That
    saves the probe barrier two Delta round trips (1.7 s of its 2.7 s, measured at GPU-like speed)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    per_chunk = plane.per_chunk(wave.unsized_batches)
    rest = wave.todo.where(F.col("chunk") == UNSIZED)
    first = F.min("batch_no").over(Window.partitionBy("plan_id"))
    sized = rest.withColumn("chunk", F.lit(SIZED) + F.floor((F.col("batch_no") - first) / per_chunk))
    if plane.exclusive:
        rows = sized.localCheckpoint(eager=True)
    else:
        record_plan(plane.lake, sized, wave.table, sized=True)
        kept = plans_of(plane.lake, wave.table, wave.plan_filter)
        rows = (rest.drop("plan_id", "pos", "batch_no", "chunk").join(kept, ["event_id", "attempt"])
                .localCheckpoint(eager=True))
    groups = rows.groupBy("plan_id", "chunk").agg(F.count(F.lit(1)).alias("n"),
                                                  F.countDistinct("batch_no").alias("batches"),
                                                  keys_sha().alias("sha")).collect()
    chunks = [Chunk(r["plan_id"], r["chunk"], r["n"], r["batches"]) for r in groups]
    plane.say(f"  {wave.unsized_batches} batches in {len(chunks)} commits "
              f"({plane.meter.per_batch('generate') or 0:.3f} s a batch measured)")
    return rows, sorted(chunks, key=chunk_key), app_ids_of(groups, "generation_events")


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


def run_chunks(chunks: list[Chunk], write: Callable[[Chunk], None], slots: int,
               progress: Callable[[str], None] | None, what: str) -> int:
    """Run `write(chunk)` for every chunk, `slots + 1` at a time, each starting when one ends; the number
    committed. After a failure the chunks in flight finish (they are committed) and no more start.

    One more than the slots: a chunk's commit runs on the driver after its task has freed the slot, and the
    extra chunk job's task, queued by then, takes that slot at once instead of waiting for the commit."""
    total, rows, commits = sum(c.rows for c in chunks), 0, 0
    with ThreadPoolExecutor(max(1, slots) + 1) as pool:
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
