"""AI feedback on the Spark-native data plane (`cai label`, `cai eval-labeler`): the pairs, the label
plan, what is pending and `preference_dataset` are Spark DataFrames, so the driver holds no per-label state.

The plan is the one `labels.plan_labels` makes (same ids, principles, CoT ids and seeds), computed in the
executors (`mapInArrow` over the pairs). A chunk of pending scorings is one Spark job: its task builds each
comparison prompt, scores the two choices a batch at a time, and its rows are appended to `label_events`
with delta-spark; a scoring that fails is a `quarantine` row instead (retried by every rerun).
`preference_dataset`'s AI rows are `preferences.ai_rows` run per pair in the executors.
"""
from __future__ import annotations

import functools
import threading
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

import pyarrow as pa

from cai_lib.constitution.model import Constitution
from cai_lib.feedback.labels import (ANSWER_PREFIX, CHOICES, COT_ANSWER_PREFIX, LabelJob, LabelSettings,
                                     conversation_text, feedback_chat, label_row, plan_labels)
from cai_lib.feedback.pairs import pair_id_of
from cai_lib.feedback.preferences import ai_rows
from cai_lib.ids import canonical_json, derive_seed, stable_id
from cai_lib.runtime.tasks import RunStats
from cai_lib.runtime.worker import backend_for, score_batch
from schemas import LABEL_EVENTS, PREFERENCE_DATASET

JOB_SCHEMA = pa.schema([
    ("event_id", pa.string()), ("pair_id", pa.string()), ("prompt_id", pa.string()), ("a_id", pa.string()),
    ("b_id", pa.string()), ("k", pa.int32()), ("principle_id", pa.string()), ("order", pa.string()),
    ("cot_id", pa.string()), ("cot_seed", pa.int64()),
])
# a scoring's outcome: a label_events row, or (error set) the ids its quarantine row needs
SCORED_SCHEMA = pa.schema([f.with_nullable(True) for f in LABEL_EVENTS]
                          + [pa.field("error", pa.string()), pa.field("quarantine_id", pa.string())])
LABEL_COLUMNS = ("event_id", "pair_id", "prompt_id", "response_a_id", "response_b_id", "order", "ensemble_index",
                 "p_a", "constitution_sha", "model_fingerprint", "response_a", "response_b", "prompt_text")
AI_SCHEMA = pa.schema([f.with_nullable(True) for f in PREFERENCE_DATASET])


def sampled_pairs(events, prompts, policy_fp: str | None):
    """(prompt_id, a_id, b_id): prompts in `prompts` with both pair samples (rounds 0 and 1) from one
    policy (`policy_fp`, or each policy that sampled). Of two samples of one round (a `--resample` with
    other settings), the latest: the larger (created_at, event_id), as `jobs/label.sampled_pairs` picks."""
    from pyspark.sql import functions as F
    ev = events.where((F.col("kind") == "pair_sample") & (F.col("status") == "ok"))
    if policy_fp is not None:
        ev = ev.where(F.col("model_fingerprint") == policy_fp)
    ev = ev.join(prompts.select("prompt_id"), "prompt_id", "left_semi")
    sample = lambda r: F.max(F.when(F.col("round") == r, F.struct("created_at", "event_id")))["event_id"]  # noqa: E731
    return (ev.groupBy("prompt_id", "model_fingerprint").agg(sample(0).alias("a_id"), sample(1).alias("b_id"))
            .where(F.col("a_id").isNotNull() & F.col("b_id").isNotNull()).select("prompt_id", "a_id", "b_id"))


def plan_partition(batches: Iterator[pa.RecordBatch], *, constitution: Constitution, fingerprint: str,
                   settings: LabelSettings, cot_sampling: str) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: (prompt_id, a_id, b_id) rows -> one row per label job of each pair (a pair_id
    column, where there is one, names the pairs; else it is `pairs.pair_id_of` of the three)."""
    for batch in batches:
        cols = [batch.column(c).to_pylist() for c in ("prompt_id", "a_id", "b_id")]
        ids = (batch.column("pair_id").to_pylist() if "pair_id" in batch.schema.names   # eval-labeler's pairs
               else [pair_id_of(p, a, b) for p, a, b in zip(*cols)])
        pairs = list(zip(ids, *cols))
        jobs = plan_labels(pairs, constitution, fingerprint, settings, cot_sampling)
        if jobs:
            yield pa.RecordBatch.from_pylist([
                {"event_id": j.event_id, "pair_id": j.pair_id, "prompt_id": j.prompt_id, "a_id": j.a_id,
                 "b_id": j.b_id, "k": j.k, "principle_id": j.principle_id, "order": j.order, "cot_id": j.cot_id,
                 "cot_seed": derive_seed(settings.seed, "cot", j.cot_id) if j.cot_id else None} for j in jobs],
                schema=JOB_SCHEMA)


def plan_jobs(pairs, constitution: Constitution, fingerprint: str, settings: LabelSettings, cot_sampling: str):
    from pyspark.sql.pandas.types import from_arrow_schema
    settings.template_sha(constitution)   # fails here, on the driver, if the templates are broken
    fn = functools.partial(plan_partition, constitution=constitution, fingerprint=fingerprint, settings=settings,
                           cot_sampling=cot_sampling)
    return pairs.mapInArrow(fn, from_arrow_schema(JOB_SCHEMA))


def with_texts(jobs, prompts, ok):
    """The jobs with the texts their prompts are built from (the prompt, both responses) and their
    length (the batch order). `ok` is (event_id, text) of the successful events."""
    from pyspark.sql import functions as F
    return with_input_len(jobs.join(prompts.select("prompt_id", F.col("text").alias("prompt_text")), "prompt_id")
                          .join(_texts(ok, "a_id", "a_text"), "a_id").join(_texts(ok, "b_id", "b_text"), "b_id"))


def with_input_len(jobs):
    """Jobs with their texts (prompt_text, a_text, b_text) and input_len, their sum of lengths (the batch order)."""
    from pyspark.sql import functions as F
    return jobs.withColumn("input_len", (F.length("prompt_text") + F.length("a_text") + F.length("b_text")).cast("long"))


def with_cot(jobs, cot_ok):
    """The jobs whose chain of thought succeeded, with its text (and its length in input_len)."""
    from pyspark.sql import functions as F
    return (jobs.join(_texts(cot_ok, "cot_id", "cot_text"), "cot_id")
            .withColumn("input_len", F.col("input_len") + F.length("cot_text")))


def _texts(ok, key: str, name: str):
    from pyspark.sql import functions as F
    return ok.select(F.col("event_id").alias(key), F.col("text").alias(name))


def label_chat(row: dict, *, template: str, constitution: Constitution, dialogue: bool = False) -> list:
    """The comparison (or CoT) chat of one job row, as `jobs/label.py` builds it on the driver
    (`dialogue`: prompt_text is already a whole conversation, as eval-labeler's HH-RLHF contexts are)."""
    a, b = row["a_text"], row["b_text"]
    shown = (a, b) if row["order"] == "ab" else (b, a)
    conversation = row["prompt_text"] if dialogue else conversation_text(row["prompt_text"])
    return feedback_chat(template, conversation, constitution.comparison_principle(row["principle_id"]).text, *shown)


def cot_inputs(todo, sampling: str):
    """Pending jobs as the generation rows of their chains of thought (spark_plane.pending's inputs)."""
    from pyspark.sql import functions as F
    return todo.select(F.col("cot_id").alias("event_id"), F.lit("cot").alias("kind"), "prompt_id",
                       F.lit(None).cast("string").alias("parent_id"), F.col("k").alias("round"), "principle_id",
                       F.col("cot_seed").alias("seed"), F.lit(sampling).alias("sampling"), "order", "prompt_text",
                       "a_text", "b_text", "input_len")


@dataclass(frozen=True)
class Scoring:
    """What a scoring chunk's task needs (picklable: it goes to the executors): the model, how a row becomes
    its chat, the label settings, the rows' lineage, their `kind` and the `stage` of their quarantine rows."""
    spec_json: str
    make_chat: Callable[[dict], list]
    settings: LabelSettings
    constants: dict[str, Any]
    job_run_id: str
    kind: str
    stage: str


def score_partition(batches: Iterator[pa.RecordBatch], *, work: Scoring, counters: dict) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: one chunk's job rows -> their label_events rows of `work.kind` (or the ids of their
    `work.stage` quarantine rows), a model call per batch."""
    rows = [r for b in batches for r in b.to_pylist()]
    if not rows:
        return
    backend, settings = backend_for(work.spec_json), work.settings
    by_batch: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        by_batch[r["batch_no"]].append(r)
    for batch_no in sorted(by_batch):
        items = sorted(by_batch[batch_no], key=lambda r: r["pos"])
        suffix = lambda r: r["cot_text"] + COT_ANSWER_PREFIX if settings.cot else ANSWER_PREFIX  # noqa: E731
        scored = score_batch(backend, [backend.render_chat(work.make_chat(r)) + suffix(r) for r in items], CHOICES)
        counters["calls"].add(1)
        yield pa.RecordBatch.from_pylist(scored_rows(work, items, scored), schema=SCORED_SCHEMA)


def scored_rows(work: Scoring, items: list[dict], scored: list) -> list[dict]:
    """One batch's outcomes: a label row per scoring, or the ids of its quarantine row when it failed."""
    now, out = datetime.now(timezone.utc), []
    for r, (logprobs, error) in zip(items, scored):
        job = LabelJob(r["event_id"], r["pair_id"], r["prompt_id"], r["a_id"], r["b_id"], r["k"],
                       r["principle_id"], r["order"], r["cot_id"])
        if error is None:
            try:
                out.append({**label_row(job, logprobs[0], logprobs[1], work.settings, work.kind, work.constants,
                                        work.job_run_id, now), "error": None, "quarantine_id": None})
                continue
            except ValueError as exc:   # no probability on either choice: quarantined, never guessed
                error = f"ValueError: {exc}"
        out.append({"event_id": job.event_id, "job_run_id": work.job_run_id, "created_at": now, "error": error,
                    "quarantine_id": stable_id("quarantine", stage=work.stage, label=job.event_id)})
    return out


def run_scoring(plane, todo, chunks: list, *, make_chat: Callable[[dict], list], settings: LabelSettings,
                kind: str | None = None, stage: str = "label") -> tuple[RunStats, int]:
    """Score every chunk of `todo` (spark_plane.cut), `plane.slots` chunk jobs at a time: a chunk's labels
    (of `kind`: ai_label or ai_label_cot by default) are appended to label_events, its failed scorings to
    quarantine as `stage` rows (those not there yet: a rerun retries them without logging them twice).
    The chunk is checkpointed once, so both come from one model pass. Returns the run's stats (tasks =
    scorings tried, inserted = labels appended) and the new quarantine rows."""
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema

    from cai_lib.runtime.app_ids import chunk_app_ids, rows_app_id
    from cai_lib.runtime.spark_plane import chunk_key, chunk_rows, run_chunks
    lake = plane.lake
    counters = {"calls": plane.spark.sparkContext.accumulator(0)}
    work = Scoring(canonical_json(plane.backend_spec), make_chat, settings, plane.constants, plane.job_run_id,
                   kind or ("ai_label_cot" if settings.cot else "ai_label"), stage)
    score = functools.partial(score_partition, work=work, counters=counters)
    out_schema, lock = from_arrow_schema(SCORED_SCHEMA), threading.Lock()
    stats = RunStats(tasks=sum(c.rows for c in chunks), batches=sum(c.batches for c in chunks))
    quarantined = [0]
    lake.table("label_events")
    lake.table("quarantine")
    app_ids = chunk_app_ids(todo, "label_events", ("event_id",))

    def write(c) -> None:
        scored = chunk_rows(todo, c).mapInArrow(score, out_schema, profile=plane.profile).localCheckpoint(eager=True)
        bad = quarantine_rows(scored, stage).localCheckpoint(eager=True)
        failed = bad.count()
        if failed < scored.count():   # an append of no label would keep this chunk's id from its retry
            lake.idempotent_append("label_events", scored.where(F.col("error").isNull()).select(*LABEL_EVENTS.names),
                                   app_ids[chunk_key(c)])
        if failed:
            new = bad.join(lake.df("quarantine").select("event_id"), "event_id", "left_anti").localCheckpoint(eager=True)
            n_new = new.count()
            if n_new:
                lake.idempotent_append("quarantine", new, rows_app_id(new, "quarantine"))
            first = bad.agg(F.min("reason")).first()[0]
            with lock:
                stats.failed, quarantined[0] = stats.failed + failed, quarantined[0] + n_new
                stats.first_error = stats.first_error or first

    stats.commits = run_chunks(chunks, write, plane.slots, plane.progress, "scorings", plane.queued)
    stats.model_calls = counters["calls"].value
    stats.ok = stats.inserted = stats.tasks - stats.failed
    return stats, quarantined[0]


def quarantine_rows(scored, stage: str):
    """The failed scorings of a chunk as `quarantine` rows of `stage`."""
    from pyspark.sql import functions as F
    return scored.where(F.col("error").isNotNull()).select(
        F.col("quarantine_id").alias("event_id"), F.lit(stage).alias("stage"), F.lit("label_events").alias("source"),
        F.lit(None).cast("long").alias("source_row"), F.lit("logprobs").alias("field"), F.col("error").alias("reason"),
        F.col("event_id").alias("payload"), "job_run_id", "created_at", F.lit(None).cast("string").alias("row_key"))


def ai_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: label rows (whole pairs, with their texts) -> preference_dataset's AI rows."""
    labels = [r for b in batches for r in b.to_pylist()]
    if not labels:
        return
    texts = {r[k + "_id"]: r[k] for r in labels for k in ("response_a", "response_b")}
    prompt_text = {r["prompt_id"]: r["prompt_text"] for r in labels}
    rows, _ = ai_rows(pa.Table.from_pylist(labels), texts, prompt_text)
    if rows:
        yield pa.RecordBatch.from_pylist(rows, schema=AI_SCHEMA)


def preference_rows(labels, ok, prompts, human: pa.Table):
    """preference_dataset as a DataFrame: each pair of `labels` whose every principle has both orders
    (target: `labels.aggregate_pair`), then the human rows; and how many pairs lack an order."""
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema
    joined = (labels.join(prompts.select("prompt_id", F.col("text").alias("prompt_text")), "prompt_id")
              .join(_texts(ok, "response_a_id", "response_a"), "response_a_id")
              .join(_texts(ok, "response_b_id", "response_b"), "response_b_id").select(*LABEL_COLUMNS))
    parts = max(1, labels.sparkSession.sparkContext.defaultParallelism)
    ai = joined.repartition(parts, "pair_id").mapInArrow(ai_partition, from_arrow_schema(AI_SCHEMA))
    incomplete = (labels.groupBy("pair_id", "ensemble_index").agg(F.countDistinct("order").alias("n"))
                  .where(F.col("n") < 2).select("pair_id").distinct().count())
    spark = labels.sparkSession
    rows = ai.unionByName(spark.createDataFrame(human.cast(AI_SCHEMA))) if human.num_rows else ai
    return rows, incomplete


def labels_sha(jobs) -> str:
    """`label.py`'s labels_sha (sha256 of the sorted label ids, comma-joined), computed in Spark."""
    from pyspark.sql import functions as F
    row = jobs.agg(F.sha2(F.concat_ws(",", F.array_sort(F.collect_list("event_id"))), 256)).first()
    return row[0][:12]


def human_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=PREFERENCE_DATASET)

