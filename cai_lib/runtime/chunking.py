"""The Spark plane's shapes (Chunk, Plane, Pending) and how much work one chunk carries: no Spark here.

A chunk is one Spark job and one Delta commit, with a fixed cost of about 1-2 s (scheduling, the Arrow
exchange, the commit on the driver). Sized by a count, that cost is hidden behind a slow model (a CPU:
tens of seconds per batch) and dominates a fast one (a GPU: a fraction of a second per batch). So a
wave learns the model's time per batch from its first chunks (or the wave before) and gives each later
chunk about `chunk_seconds` of model time, between one batch and `batches_per_commit` (the ceiling that
bounds what a kill loses and what one task holds in memory). The plane (`spark_plane.py`) records each
cut before it runs, so a measure never makes two runs cut the same work differently.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable


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


def target_batches(seconds_per_batch: float, chunk_seconds: float, ceiling: int) -> int:
    """Batches that hold about `chunk_seconds` of model time, between 1 and `ceiling`; the ceiling when a
    batch took no measurable time.

    >>> target_batches(0.2, 30, 256), target_batches(0.2, 30, 64), target_batches(45.0, 30, 64), target_batches(0.0, 30, 64)
    (150, 64, 1, 64)
    """
    if seconds_per_batch <= 0:
        return ceiling
    return max(1, min(ceiling, math.floor(chunk_seconds / seconds_per_batch)))


def probe_batches(fresh_batches: int, ceiling: int, slots: int, chunk_seconds: float) -> int:
    """How many of a wave's fresh batches are chunks of one batch (the probe, one per slot), the others
    planned unsized until the model's time per batch is known: none when nothing is sized by time (a
    fixed count: chunk_seconds 0, or a ceiling of 1) or the wave is a chunk per batch anyway. A function
    of the pending work and the settings only, never of a measure: two runs cut the same work alike.

    >>> probe_batches(700, 64, 2, 30), probe_batches(700, 1, 2, 30), probe_batches(700, 64, 2, 0)
    (2, 0, 0)
    >>> probe_batches(2, 64, 2, 30), probe_batches(3, 64, 2, 30)
    (0, 2)
    """
    if ceiling <= 1 or chunk_seconds <= 0 or fresh_batches <= slots:
        return 0
    return slots


def rest_layout(fresh_batches: int, probe: int, per_chunk: int) -> list[tuple[int, int]]:
    """[(first batch, batches)] of each chunk of a wave's fresh batches: the `probe` batches one per chunk,
    then the others in chunks of at most `per_chunk` (`spread`).

    >>> rest_layout(10, 2, 3), rest_layout(3, 0, 4), rest_layout(0, 0, 4), rest_layout(11, 0, 4)
    ([(0, 1), (1, 1), (2, 3), (5, 3), (8, 2)], [(0, 3)], [], [(0, 4), (4, 4), (8, 3)])
    """
    out = [(b, 1) for b in range(min(probe, fresh_batches))]
    first = len(out)
    for k in spread(fresh_batches - first, per_chunk):
        out.append((first, k))
        first += k
    return out


def spread(batches: int, per_chunk: int) -> list[int]:
    """The sizes of the chunks of `batches` batches: as few chunks as `per_chunk` allows, their sizes
    differing by one at most, so no short last chunk leaves one engine idle while another runs a full one
    (998 batches at most 63 a chunk: 16 chunks of 62-63, not 15 of 63 and one of 53). `spread_chunk` is
    the same rule as a Spark column.

    >>> spread(998, 63) == [63] * 6 + [62] * 10, spread(5, 2), spread(4, 2), spread(0, 2)
    (True, [2, 2, 1], [2, 2], [])
    """
    n = -(-batches // max(1, per_chunk))
    q, r = divmod(batches, n) if n else (0, 0)
    return [q + 1] * r + [q] * (n - r)


class Meter:
    """The model's measured seconds per batch, by kind of call ("generate", "score"): the latest wave's.
    Shared by a job run's waves (threads of one driver), so a wave after the first needs no probe."""

    def __init__(self):
        self._lock, self._seconds = threading.Lock(), {}

    def record(self, kind: str, seconds: float, batches: int) -> None:
        """Keep what `batches` model calls took in all, when there were any.

        >>> m = Meter(); m.record("generate", 3.0, 15); m.record("score", 1.0, 0); m.per_batch("generate"), m.per_batch("score")
        (0.2, None)
        """
        if batches > 0:
            with self._lock:
                self._seconds[kind] = seconds / batches

    def per_batch(self, kind: str) -> float | None:
        with self._lock:
            return self._seconds.get(kind)


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
    and how its work is cut (`slots`: chunk jobs at once, the engines the session runs unless given; off local
    mode each model task asks for its engine's cores or GPU through `profile`: engines.py)."""
    spark: Any
    lake: Any
    backend_spec: dict
    constants: dict
    job_run_id: str
    batch_size: int
    batches_per_commit: int   # the most batches in one chunk: what a kill loses, what one task holds
    chunk_seconds: float      # model time a generation chunk aims at (chunking.py); 0: batches_per_commit each
    progress: Callable[[str], None] | None = None
    slots: int = 0
    meter: Meter = field(default_factory=Meter)   # seconds per batch, learnt by the run's waves
    # the job holds the lake's lock (`lake.locks.job_lock`): no other run cuts the same batches meanwhile,
    # so a sized cut needs no record to agree on (spark_plane.cut_rest)
    exclusive: bool = False
    profile: Any = None
    beside: bool = False   # Delta's jobs find a core beside the running engines (engines.delta_beside)

    def __post_init__(self):
        if not self.slots:
            from cai_lib.runtime.engines import engine_plan
            profile, slots, beside = engine_plan(self.spark, self.backend_spec)
            object.__setattr__(self, "profile", profile)
            object.__setattr__(self, "slots", slots)
            object.__setattr__(self, "beside", beside)

    @property
    def queued(self) -> int:
        """Chunk jobs queued beyond the running ones: one per engine where Delta's jobs run beside them, so
        engines that finish together each find one; else one (a commit's jobs need an engine's slot)."""
        return self.slots if self.beside else 1

    def say(self, line: str) -> None:
        if self.progress:
            self.progress(line)

    def per_chunk(self, batches: int, kind: str = "generate") -> int:
        """Batches per chunk for a cut of `batches`: the measured model time's share of chunk_seconds (when
        there is a measure), at most batches_per_commit, in chunks of a multiple of the slots."""
        spb = self.meter.per_batch(kind) if self.chunk_seconds > 0 else None
        most = self.batches_per_commit if spb is None else target_batches(spb, self.chunk_seconds,
                                                                         self.batches_per_commit)
        return chunk_batches(max(1, batches), most, self.slots)


UNSIZED = -1          # work_batches' chunk of a batch planned before its chunk is sized (after the probe)
SIZED = 1 << 32       # the first chunk number of a sized rest (apart from the probe's, which are its batch numbers)


@dataclass
class Pending:
    """A wave's work: `todo`'s rows (plan_id, pos, batch_no, chunk), the `chunks` cut already, how many
    rows and batches wait with chunk UNSIZED until the first chunks have measured the model, and the
    record of the plan, which lands before any of the wave's chunks commits."""
    todo: Any
    gave_up: int
    chunks: list[Chunk]
    table: str = "generation_events"
    plan_filter: Any = None
    unsized_rows: int = 0
    unsized_batches: int = 0
    recorded: Any = None   # the Future of the plan's record in work_batches (None: nothing new planned)
    unsized_keys: Any = None   # the Future of the UNSIZED batches' keys (app_ids.batch_keys), under the lock

    @property
    def rows(self) -> int:
        return sum(c.rows for c in self.chunks) + self.unsized_rows

    def describe(self) -> str:
        later = f" + {self.unsized_batches} batches sized by time" if self.unsized_rows else ""
        return f"{len(self.chunks)} commits{later}"


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


def chunk_key(c: Chunk) -> tuple[str, int]:
    return c.plan_id, c.chunk
