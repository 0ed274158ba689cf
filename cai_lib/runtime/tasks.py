"""Run generation tasks on Spark and record every result as an event.

Resumability rests on two rules. (1) A task's batch is fixed before any model call: pending
tasks are sorted (input length, then id) and cut into batches of `batch_size`. (2) The unit
of commit is a group of whole batches, committed in that order. A job killed mid-run has
committed a prefix of the batches; the rerun finds exactly the remaining suffix pending and
cuts it into the same batches, so a resumed run generates what an uninterrupted run would.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import pyarrow as pa

from cai_lib.ids import canonical_json, stable_id
from cai_lib.lake.tables import Lake
from cai_lib.runtime.worker import RESULT_DDL, generate_partition
from schemas import GENERATION_EVENTS


@dataclass(frozen=True)
class Task:
    """One generation to make. `event_id` is the id its successful result will carry."""
    event_id: str
    kind: str
    prompt_id: str
    parent_id: str | None
    round: int
    principle_id: str | None
    seed: int
    sampling: str  # Sampling.to_json()
    chat: list = field(hash=False, compare=False)
    attempt: int = 1


@dataclass
class RunStats:
    tasks: int = 0
    batches: int = 0
    model_calls: int = 0
    ok: int = 0
    failed: int = 0
    inserted: int = 0
    completion_tokens: int = 0
    commits: int = 0
    first_error: str | None = None   # the first failed task's error, so a failing run can say why

    def add(self, other: "RunStats") -> None:
        for k in vars(self):
            if k == "first_error":
                self.first_error = self.first_error or other.first_error
            else:
                setattr(self, k, getattr(self, k) + getattr(other, k))


def retry_plan(planned: list[Task], done, failures: dict[str, int], max_attempts: int) -> tuple[list[Task], int]:
    """The planned tasks still to run, each with its attempt number; and how many gave up.

    A task whose event exists is done; one that failed `max_attempts` times is left failed
    (its failures are events) and counted.
    """
    tasks, gave_up = [], 0
    for t in planned:
        if t.event_id in done:
            continue
        tried = failures.get(t.event_id, 0)
        if tried >= max_attempts:
            gave_up += 1
            continue
        tasks.append(dataclasses.replace(t, attempt=tried + 1))
    return tasks, gave_up


def most_tries(ids, done, failures: dict[str, int]) -> int:
    """The most failed attempts any of `ids` without a result has had (what --max-attempts must exceed)."""
    return max((failures.get(i, 0) for i in ids if i not in done), default=0)


def commit_progress(progress: Callable[[str], None] | None, total: int, what: str = "generations"):
    """An `on_commit` callback printing a bar per Delta commit (plain lines: DVC and cluster logs keep them).

    >>> commit_progress(print, 8)(RunStats(ok=3, failed=1, completion_tokens=90, commits=1))
      [##########..........] 4/8 generations, 1 failed, 90 tokens, 1 commits
    """
    if progress is None:
        return None

    def on_commit(stats: RunStats) -> None:
        done = stats.ok + stats.failed
        bar = "#" * round(20 * done / max(total, 1))
        progress(f"  [{bar:.<20}] {done}/{total} {what}, {stats.failed} failed, {stats.completion_tokens} tokens, "
                 f"{stats.commits} commits")
    return on_commit


def new_job_run_id() -> str:
    return uuid.uuid4().hex


def plan_batches(tasks: list[Task], batch_size: int) -> list[list[Task]]:
    """Deterministic batches: sort by input length (less padding), then id; cut in order."""
    ordered = sorted(tasks, key=lambda t: (len(canonical_json(t.chat)), t.event_id))
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]


def event_rows(tasks: list[Task], results: dict[int, dict], constants: dict[str, Any], job_run_id: str) -> pa.Table:
    now = datetime.now(timezone.utc)
    rows = []
    for i, t in enumerate(tasks):
        r = results[i]
        ok = r["error"] is None and r["text"] is not None
        rows.append({
            # a failed attempt gets its own id, so the success id stays free for a retry
            "event_id": t.event_id if ok else stable_id("failed_attempt", of=t.event_id, attempt=t.attempt),
            "target_event_id": t.event_id, "attempt": t.attempt, "status": "ok" if ok else "failed",
            "kind": t.kind, "prompt_id": t.prompt_id, "parent_id": t.parent_id, "round": t.round,
            "principle_id": t.principle_id, "seed": t.seed, "sampling": t.sampling,
            "text": r["text"] if ok else None, "finish_reason": r["finish_reason"],
            "prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"],
            "latency_ms": r["latency_ms"], "error": r["error"],
            "job_run_id": job_run_id, "created_at": now, **constants,
        })
    return pa.Table.from_pylist(rows, schema=GENERATION_EVENTS)  # typed even when a column is all null


def run_tasks(spark, lake: Lake, tasks: list[Task], backend_spec: dict, constants: dict[str, Any], *,
              batch_size: int, batches_per_commit: int, job_run_id: str,
              parse: Callable[[str, str], str] = lambda kind, text: text,
              on_commit: Callable[[RunStats], None] | None = None) -> tuple[RunStats, pa.Table]:
    """Generate `tasks` on Spark, commit each group of batches to generation_events.

    Returns the stats and the rows written (so the caller can chain the next round).
    """
    stats = RunStats(tasks=len(tasks))
    batches = plan_batches(tasks, batch_size)
    stats.batches = len(batches)
    spec_json = canonical_json(backend_spec)
    written = []
    sc = spark.sparkContext
    for g in range(0, len(batches), batches_per_commit):
        group = batches[g:g + batches_per_commit]
        flat = [t for b in group for t in b]
        table = pa.table({
            "task_idx": pa.array(range(len(flat)), pa.int64()),
            "batch_no": pa.array([bi for bi, b in enumerate(group) for _ in b], pa.int64()),
            "chat": [json.dumps(t.chat, ensure_ascii=False) for t in flat],
            "seed": pa.array([t.seed for t in flat], pa.int64()),
            "sampling": [t.sampling for t in flat],
        })
        calls = sc.accumulator(0)
        parts = min(len(group), max(1, sc.defaultParallelism))
        df = spark.createDataFrame(table).repartition(parts, "batch_no")
        fn = functools.partial(generate_partition, spec_json=spec_json, calls=calls)
        result = df.mapInArrow(fn, RESULT_DDL).toArrow()
        by_idx = {r["task_idx"]: r for r in result.to_pylist()}
        if len(by_idx) != len(flat):
            raise RuntimeError(f"Spark returned {len(by_idx)} results for {len(flat)} tasks")
        for i, t in enumerate(flat):
            if by_idx[i]["text"] is not None:
                by_idx[i]["text"] = parse(t.kind, by_idx[i]["text"])
        rows = event_rows(flat, by_idx, constants, job_run_id)
        inserted = lake.insert_new("generation_events", rows)
        step = RunStats(model_calls=calls.value, inserted=inserted, commits=1,
                        ok=sum(1 for s in rows.column("status").to_pylist() if s == "ok"),
                        completion_tokens=sum(x or 0 for x in rows.column("completion_tokens").to_pylist()))
        step.failed = len(flat) - step.ok
        if step.failed:
            step.first_error = next((e for e in rows.column("error").to_pylist() if e), "the backend returned no text")
        stats.add(step)
        written.append(rows)
        if on_commit:
            on_commit(stats)
    return stats, (pa.concat_tables(written) if written else None)
