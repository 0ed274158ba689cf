"""A generation task, a run's counts, and the event rows its results become (pure; the Spark plane,
cai_lib/runtime/spark_plane.py, plans the tasks, cuts them into batches and commits the rows)."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from cai_lib.ids import stable_id
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


def new_job_run_id() -> str:
    return uuid.uuid4().hex


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
