"""Chunk jobs in flight on the driver's threads: each Spark job (a chunk's generation and append, or a
probe's rows back to the driver) runs on a thread of its own, one more at once than the slots, so the
next job's task waits queued while the driver commits the last one; and the rows the driver holds while
a wave's plan lands (`Held`)."""
from __future__ import annotations

import threading
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Callable

import pyarrow as pa

from cai_lib.runtime.chunking import Chunk, chunk_key

HELD_ROWS = 1 << 16   # rows of chunks started before their wave's plan landed that may wait on the driver at once


def run_chunks(chunks: list[Chunk], write: Callable[[Chunk], None], slots: int,
               progress: Callable[[str], None] | None, what: str, queued: int = 1) -> int:
    """Run `write(chunk)` for every chunk, `slots + queued` at a time, each starting when one ends; the
    number committed. After a failure the chunks in flight finish (they are committed) and no more start.

    More than the slots: a chunk's commit runs on the driver after its task has freed the slot, and a
    queued chunk job's task takes that slot at once instead of waiting for the commit. One queued job
    where a commit's own jobs need an engine's slot (local mode); one per engine where they run beside
    the engines (`engines.delta_beside`), so engines that finish together each find one."""
    total, rows, commits = sum(c.rows for c in chunks), 0, 0
    with ThreadPoolExecutor(max(1, slots) + max(1, queued)) as pool:
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


def collect_chunks(chunks: list[Chunk], frame: Callable[[Chunk], object], slots: int) -> dict:
    """{chunk key: its rows as an Arrow table}: each chunk's job run to the driver, slots + 1 at a time."""
    with ThreadPoolExecutor(max(1, slots) + 1) as pool:
        return dict(zip(map(chunk_key, chunks), pool.map(lambda c: frame(c).toArrow(), chunks)))


def started(fn: Callable, *args) -> Future:
    """fn(*args) on a thread of its own: its Future."""
    out: Future = Future()

    def run() -> None:
        try:
            out.set_result(fn(*args))
        except BaseException as exc:   # noqa: BLE001 - handed to whoever waits on the future
            out.set_exception(exc)
    threading.Thread(target=run, name=f"cai-{getattr(fn, '__name__', 'task')}", daemon=True).start()
    return out


class Held:
    """How many rows chunk jobs may bring back to the driver at once, there to wait for their wave's plan
    to land (`spark_plane.run_wave`): an engine never waits for the plan's record, and the driver's
    memory holds at most `limit` rows of them (about 1 KB each); past that, a chunk job waits for the plan.

    >>> held = Held(10)
    >>> held.take(6), held.take(6), held.give(6), held.take(6)
    (True, False, None, True)
    """

    def __init__(self, limit: int):
        self.left, self._lock = limit, threading.Lock()

    def take(self, rows: int) -> bool:
        with self._lock:
            if rows > self.left:
                return False
            self.left -= rows
            return True

    def give(self, rows: int) -> None:
        with self._lock:
            self.left += rows


def on_driver(spark, tables):
    """Arrow tables held on the driver as one DataFrame of one partition: one append task."""
    return spark.createDataFrame(pa.concat_tables(list(tables))).coalesce(1)
