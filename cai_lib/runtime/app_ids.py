"""How a chunk's append is named: the app id of Delta's idempotent write, a hash of the keys that decide
its rows (never of the run that cut it), which is why the same rows never land twice (`chunk_app_ids`)."""
from __future__ import annotations

import hashlib


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


def keys_hash(keys) -> str:
    """`keys_sha` on the driver: the sha256 of the sorted keys joined by commas (a key is `event_id#attempt`).
    Python sorts str by code point, which is the order of their UTF-8 bytes, Spark's `array_sort` order.

    >>> keys_hash(["b#1", "a#2"]) == hashlib.sha256(b"a#2,b#1").hexdigest()
    True
    """
    return hashlib.sha256(",".join(sorted(keys)).encode()).hexdigest()


def batch_keys(rows) -> dict[tuple[str, int], list[str]]:
    """{(plan_id, batch_no): its keys (event_id#attempt)}: one job, while the probe runs, so that cutting
    the batches into chunks later needs none (`sized_cut`)."""
    from pyspark.sql import functions as F
    key = F.concat_ws("#", F.col("event_id"), F.col("attempt").cast("string"))
    groups = rows.groupBy("plan_id", "batch_no").agg(F.collect_list(key).alias("keys")).collect()
    return {(r["plan_id"], r["batch_no"]): r["keys"] for r in groups}


def sized_cut(keys: dict[tuple[str, int], list[str]], per_chunk: int, first: int, table: str):
    """([Chunk], {(plan_id, chunk): app id}, {(plan_id, batch_no): chunk}) of batches given by their keys:
    each plan's batches in order, numbered from `first` in chunks of at most per_chunk (`chunking.spread`).

    >>> cut, ids, of = sized_cut({("p", 3): ["a#1"], ("p", 5): ["b#1", "c#1"], ("p", 4): ["d#1"]}, 2, 100, "t")
    >>> [(c.chunk, c.rows, c.batches) for c in cut], of, ids[("p", 101)] == "cai/t/" + keys_hash(["b#1", "c#1"])
    ([(100, 2, 2), (101, 2, 1)], {('p', 3): 100, ('p', 4): 100, ('p', 5): 101}, True)
    """
    from cai_lib.runtime.chunking import Chunk, spread
    by_plan: dict[str, list[int]] = {}
    for plan_id, batch_no in sorted(keys):
        by_plan.setdefault(plan_id, []).append(batch_no)
    chunks, ids, chunk_of = [], {}, {}
    for plan_id, batches in by_plan.items():
        at = 0
        for k, size in enumerate(spread(len(batches), per_chunk)):
            members = [key for b in batches[at:at + size] for key in keys[(plan_id, b)]]
            chunks.append(Chunk(plan_id, first + k, len(members), size))
            ids[(plan_id, first + k)] = f"cai/{table}/{keys_hash(members)}"
            chunk_of.update({(plan_id, b): first + k for b in batches[at:at + size]})
            at += size
    return chunks, ids, chunk_of
