"""Score (chat, choice) items on Spark: the feedback model's log-probs of each answer choice."""
from __future__ import annotations

import functools
import json

import pyarrow as pa

from cai_lib.ids import canonical_json
from cai_lib.runtime.engines import engine_profile
from cai_lib.runtime.worker import SCORE_DDL, score_partition


def score_on_spark(spark, items: list[tuple[list, str]], backend_spec: dict, choices, *, batch_size: int) -> tuple[list[dict], int]:
    """Score (chat, suffix) items on Spark: each worker renders the chats with its model's
    template and scores the choices. Returns one {logprob_a, logprob_b, error} per item, in
    order, and the number of scoring calls."""
    if not items:
        return [], 0
    sc = spark.sparkContext
    table = pa.table({
        "task_idx": pa.array(range(len(items)), pa.int64()),
        "batch_no": pa.array([i // batch_size for i in range(len(items))], pa.int64()),
        "chat": [json.dumps(chat, ensure_ascii=False) for chat, _ in items],
        "suffix": [suffix for _, suffix in items],
    })
    calls = sc.accumulator(0)
    profile, slots = engine_profile(spark, backend_spec)   # an engine's cores or GPU, off local mode
    parts = min(-(-len(items) // batch_size), slots)
    fn = functools.partial(score_partition, spec_json=canonical_json(backend_spec),
                           choices_json=json.dumps(list(choices)), calls=calls)
    # whole batches per partition; each worker's backend batches its partition by batch_size
    df = spark.createDataFrame(table).repartition(parts, "batch_no")
    out = {r["task_idx"]: r for r in df.mapInArrow(fn, SCORE_DDL, profile=profile).toArrow().to_pylist()}
    if len(out) != len(items):
        raise RuntimeError(f"Spark returned {len(out)} scores for {len(items)} items")
    return [out[i] for i in range(len(items))], calls.value
