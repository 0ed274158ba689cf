"""SL-CAI on the Spark-native data plane: the chain planned, its pending steps found and `sl_dataset`
projected as Spark DataFrames, so the driver holds no per-event state.

The plan is the one `chain.plan_chain` makes (same ids, seeds, principles), computed in the executors
(`mapInArrow` over the prompts); each step row also names the events its chat is built from (the
answer it critiques or revises, the critique it follows), so a wave's inputs are joins in Spark.

Only open prompts are planned. `sl_dataset`'s commits record what its rows were derived from
(`built_from`: the plan's inputs and the splits); when its last commit says this run's and each row's
final event is still in generation_events (a restore may have set it aside), each of its rows is a
prompt whose chain is complete under these settings, so a rerun plans, joins and appends only the
prompts without a row (new ones, incomplete chains): a no-op plans nothing.
"""
from __future__ import annotations

import functools
from typing import Iterator

import pyarrow as pa

from cai_lib.ids import canonical_json, stable_id
from cai_lib.sl.chain import SLContext, chat_for, plan_chain, step_inputs

# Part of built_from: bump it when plan_chain's ids or sl_dataset_df's rows change for the same inputs,
# so a table written by the older code is rebuilt rather than extended.
PLAN_FORMAT = 1

STEP_SCHEMA = pa.schema([
    ("event_id", pa.string()), ("kind", pa.string()), ("prompt_id", pa.string()), ("parent_id", pa.string()),
    ("round", pa.int32()), ("principle_id", pa.string()), ("seed", pa.int64()), ("sampling", pa.string()),
    ("wave", pa.int32()), ("chain_pos", pa.int32()), ("is_final", pa.bool_()),
    ("response_id", pa.string()),   # the answer a critique or revision works on
    ("critique_id", pa.string()),   # the critique a revision follows
])


def plan_partition(batches: Iterator[pa.RecordBatch], ctx: SLContext) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: (prompt_id, kind) rows -> one row per planned step of each prompt's chain."""
    for batch in batches:
        rows = []
        for pid, kind in zip(batch.column("prompt_id").to_pylist(), batch.column("kind").to_pylist()):
            chain = plan_chain(ctx, pid, kind)
            for i, st in enumerate(chain):
                response, critique = step_inputs(chain, i)
                rows.append({
                    "event_id": st.event_id, "kind": st.kind, "prompt_id": pid, "parent_id": st.parent_id,
                    "round": st.round, "principle_id": st.principle_id, "seed": st.seed, "sampling": st.sampling,
                    "wave": st.wave, "chain_pos": i, "is_final": i == len(chain) - 1, "response_id": response,
                    "critique_id": critique})
        if rows:
            yield pa.RecordBatch.from_pylist(rows, schema=STEP_SCHEMA)


def plan_steps(spark, ctx: SLContext, prompts):
    """Every planned step of every prompt in `prompts` (a DataFrame with prompt_id, kind, chosen)."""
    from pyspark.sql.pandas.types import from_arrow_schema
    ctx.template_sha   # noqa: B018 - hash the templates once here, not in every task
    steps = prompts.select("prompt_id", "kind").mapInArrow(functools.partial(plan_partition, ctx=ctx),
                                                           from_arrow_schema(STEP_SCHEMA))
    return steps.join(prompts.select("prompt_id", "chosen"), "prompt_id")


def built_from(ctx: SLContext, splits: list[str]) -> str:
    """What sl_dataset is derived from: the chain plan's inputs (constitution, model, templates,
    rounds, seed, few-shot, sampling) and the splits: the same string, the same derivation of the rows."""
    s = ctx.settings
    plan = stable_id("sl_plan", format=PLAN_FORMAT, constants=ctx.constants(), rounds=s.rounds, seed=s.seed,
                     few_shot=s.few_shot, sampling=[x.to_json() for x in (s.answer, s.critique, s.revision)])
    return canonical_json({"sl_dataset": {"plan": plan, "splits": sorted(splits)}})


def open_prompts(lake, prompts, built: str):
    """(the prompts of `prompts` without a sl_dataset row, whether sl_dataset's rows stand): when
    sl_dataset's last commit was built from `built` and every row's final event is still a successful
    generation event, its rows stand and only the others are open; otherwise every prompt is open and
    sl_dataset must be rebuilt (after regenerating what is missing)."""
    if lake.built_from("sl_dataset") != built or rows_lost_events(lake):
        return prompts, False
    return prompts.join(lake.df("sl_dataset").select("prompt_id"), "prompt_id", "left_anti"), True


def rows_lost_events(lake) -> bool:
    """Whether a sl_dataset row names a final event that generation_events no longer holds as a success
    (`cai lake restore` set its commit aside). The final event suffices, in one join: restore sets aside
    every commit after a version, and a chain's final event is committed after all of its ancestors."""
    from cai_lib.runtime.spark_plane import successful
    finals = lake.df("sl_dataset").select("final_event_id").withColumnRenamed("final_event_id", "event_id")
    return not finals.join(successful(lake.df("generation_events")).select("event_id"), "event_id",
                           "left_anti").isEmpty()


def wave_inputs(steps, ok, prompts, wave: int):
    """The steps of `wave` whose parent succeeded, with the texts their chats are built from and the
    length their batches are sorted by. `ok` is (event_id, text) of the successful events."""
    from pyspark.sql import functions as F
    mine = steps.where(F.col("wave") == wave)
    if wave > 0:
        mine = mine.join(ok.select(F.col("event_id").alias("parent_id")), "parent_id", "left_semi")
    texts = lambda name, col: ok.select(F.col("event_id").alias(col), F.col("text").alias(name))  # noqa: E731
    out = (mine.join(prompts.select("prompt_id", F.col("text").alias("prompt_text")), "prompt_id")
           .join(texts("response_text", "response_id"), "response_id", "left")
           .join(texts("critique_text", "critique_id"), "critique_id", "left"))
    return out.withColumn("input_len", F.length("prompt_text") + F.coalesce(F.length("response_text"), F.lit(0))
                          + F.coalesce(F.length("critique_text"), F.lit(0)))


def step_chat_of(ctx: SLContext):
    """A picklable row -> chat function for the executors."""
    return functools.partial(_chat_of_row, ctx)


def _chat_of_row(ctx: SLContext, row: dict) -> list:
    return chat_for(ctx, row["kind"], row["principle_id"], row["prompt_text"], row["response_text"],
                    row["critique_text"])


def sl_dataset_df(ctx: SLContext, steps, ok, prompts):
    """sl_dataset as a DataFrame: the final step of each complete chain (a step runs only after its
    parent succeeded, so a successful final step means a complete chain) with its chain's ids."""
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema
    from schemas import SL_DATASET
    chains = steps.groupBy("prompt_id").agg(
        F.sort_array(F.collect_list(F.struct("chain_pos", "event_id"))).alias("chain"),
        F.sort_array(F.collect_list(F.when(F.col("kind") == "revision", F.struct("chain_pos", "principle_id"))))
        .alias("principles"),
        F.max("round").alias("rounds"))
    final = (steps.where("is_final").select("prompt_id", F.col("event_id").alias("final_event_id"), "kind")
             .join(ok.select(F.col("event_id").alias("final_event_id"), F.col("text").alias("response")),
                   "final_event_id"))
    rows = (final.join(chains, "prompt_id")
            .join(prompts.select("prompt_id", F.col("text").alias("prompt"), "category", "split"), "prompt_id")
            .select("prompt_id", "prompt", "response",
                    F.when(F.col("kind") == "revision", "revision").otherwise(F.col("kind")).alias("source_kind"),
                    "category", "split", "rounds", "final_event_id",
                    F.transform("chain", lambda x: x["event_id"]).alias("chain_event_ids"),
                    F.transform("principles", lambda x: x["principle_id"]).alias("principle_ids"),
                    F.lit(ctx.constitution.sha256).alias("constitution_sha"), F.lit(ctx.model_id).alias("model_id"),
                    F.lit(ctx.model_fingerprint).alias("model_fingerprint")))
    schema = from_arrow_schema(SL_DATASET)
    return rows.select(*[F.col(f.name).cast(f.dataType) for f in schema.fields])
