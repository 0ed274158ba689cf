"""Lake upkeep (`cai lake optimize`): compact small files, checkpoint the log, and vacuum files no
version needs any more, except the versions something pins.

Pinned versions are the ones a gate verdict judged (`gate_events.input_versions`) and the ones a
registered model was trained on (its run's Delta dataset inputs in MLflow). Vacuum keeps every file
those versions read, whatever the retention, so time travel to them
keeps working; older unpinned versions lose their removed files after `retention_hours`. The log
itself is never cleaned here, so every version stays listed.

OPTIMIZE and VACUUM run through delta-spark, the lake's one writer (`optimize_spark`; a table another
engine committed to is refused first, as the jobs refuse it: `cai_lib.lake.writers`). delta-spark's VACUUM
has a retention and nothing else, so the retention is stretched back to the oldest pinned version's commit:
the pinned versions keep their files, and so does every version after the oldest pin (delta-spark
checkpoints its log itself, every 10 commits).

Safe beside running jobs: upkeep holds every locking job's lake lock while it runs (`locks.upkeep_lock`),
so it refuses, naming the job, while one runs, and a job started meanwhile is refused naming upkeep; it
does not wait (a generation job can run for hours). Delta's retention check stays on, and a retention
below a table's `delta.deletedFileRetentionDuration` (Delta's default 7 days = 168 h) is refused before
any work: that is the window in which a writer may still need a removed or not yet committed file (an
append in flight on a lake no local lock guards, a reader pinned to an older version).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from cai_lib.lake.locks import upkeep_lock
from cai_lib.lake.tables import Lake
from schemas import TABLES


@dataclass
class TableUpkeep:
    name: str
    version_before: int
    version_after: int
    files_before: int
    files_after: int
    vacuumed: int
    kept_versions: list[int] = field(default_factory=list)
    retention_hours: int | None = None   # the retention VACUUM ran with (stretched to keep the pinned versions)

    def line(self) -> str:
        """`generation_events  files 41 -> 3, vacuumed 38, version 12 -> 13, pinned versions kept: 4, 9`"""
        kept = ", ".join(map(str, self.kept_versions)) or "none"
        spark = f" (delta-spark, retention {self.retention_hours} h)"
        return (f"{self.name:<22} files {self.files_before} -> {self.files_after}, vacuumed {self.vacuumed}, "
                f"version {self.version_before} -> {self.version_after}, pinned versions kept: {kept}{spark}")


def gate_pins(lake: Lake) -> dict[str, set[int]]:
    """{table: versions} judged by any gate verdict."""
    pins: dict[str, set[int]] = {}
    if not lake.exists("gate_events"):
        return pins
    for raw in lake.read("gate_events", columns=["input_versions"])["input_versions"].to_pylist():
        for table, version in json.loads(raw or "{}").items():
            if table in TABLES and isinstance(version, int):
                pins.setdefault(table, set()).add(version)
    return pins


def registry_pins(lake: Lake) -> dict[str, set[int]]:
    """{table: versions} of this lake that registered model versions were trained on (MLflow)."""
    import mlflow
    client = mlflow.MlflowClient()
    root = Path(lake.root).resolve()
    pins: dict[str, set[int]] = {}
    for mv in client.search_model_versions(max_results=10_000):
        if not mv.run_id:
            continue
        for d in client.get_run(mv.run_id).inputs.dataset_inputs:
            src = json.loads(d.dataset.source or "{}")
            path, version = src.get("path"), src.get("delta_table_version")
            if path and version is not None and Path(path).resolve().parent == root and Path(path).name in TABLES:
                pins.setdefault(Path(path).name, set()).add(int(version))
    return pins


DEFAULT_RETENTION = "interval 7 days"   # Delta's default delta.deletedFileRetentionDuration


class RetentionError(ValueError):
    """--retention-hours below what a table keeps its removed files for."""


def interval_hours(interval: str) -> float:
    """Hours of a Delta interval property.

    >>> interval_hours("interval 7 days"), interval_hours("interval 1 hour"), interval_hours("interval 90 minutes")
    (168, 1, 1.5)
    """
    m = re.fullmatch(r"\s*interval\s+(\d+)\s+(second|minute|hour|day|week)s?\s*", interval.lower())
    if not m:
        raise ValueError(f"cannot read the Delta interval {interval!r} (expected e.g. 'interval 7 days')")
    return int(m.group(1)) * {"second": 1 / 3600, "minute": 1 / 60, "hour": 1, "day": 24, "week": 168}[m.group(2)]


def check_retention(lake: Lake, names: list[str], retention_hours: float) -> None:
    """Refuse a retention below any table's delta.deletedFileRetentionDuration, naming the flag and the minimum."""
    floors = {n: (lake.delta_table(n).metadata().configuration or {}).get("delta.deletedFileRetentionDuration",
                                                                             DEFAULT_RETENTION) for n in names}
    name, most = max(((n, interval_hours(v)) for n, v in floors.items()), key=lambda x: x[1], default=(None, 0))
    if retention_hours < most:
        raise RetentionError(
            f"--retention-hours {retention_hours:g} is below the {most:g} h that table {name} of lake {lake.root} keeps "
            f"removed files (its delta.deletedFileRetentionDuration, {floors[name]!r}): a vacuum with less could delete "
            f"files a running job still writes or reads. Fix: pass --retention-hours {math.ceil(most)} or more")


def optimize(lake: Lake, pins: dict[str, set[int]], retention_hours: int = 168,
             dry_run: bool = False, spark_session=None) -> list[TableUpkeep]:
    """Compact, checkpoint and vacuum each existing table; `pins` versions keep their files.
    `spark_session()` gives the delta-spark session (started only when a table exists). Refused
    (RetentionError) below a table's retention floor, (ForeignWriterError) for a table another engine
    committed to, and (JobLockedError) while a job runs."""
    from cai_lib.lake.writers import check_writers
    from cai_lib.runtime.tasks import new_job_run_id
    existing = [n for n in TABLES if lake.exists(n)]
    check_retention(lake, existing, retention_hours)
    check_writers(lake.root, existing)
    with upkeep_lock(lake.root, new_job_run_id()):
        return _optimize_tables(lake, pins, retention_hours, dry_run, spark_session)


def _optimize_tables(lake: Lake, pins: dict[str, set[int]], retention_hours: int, dry_run: bool,
                     spark_session) -> list[TableUpkeep]:
    out = []
    for name in TABLES:
        if lake.exists(name):
            out.append(optimize_spark(spark_session(), lake, name, pins.get(name, set()), retention_hours, dry_run))
    return out


def spark_retention_hours(commit_times_ms: dict[int, int], kept: list[int], retention_hours: int,
                          now_ms: int) -> int:
    """The VACUUM retention that keeps `kept` versions' files: Delta deletes a removed file once its
    remove commit is older than the retention, and a version's files are removed by later commits, so a
    retention reaching back past the oldest pinned version's commit (plus an hour) keeps them all.

    >>> spark_retention_hours({3: 0, 5: 7_200_000}, [3, 5], 0, 10_800_000), spark_retention_hours({}, [], 168, 0)
    (4, 168)
    """
    if not kept:
        return retention_hours
    oldest = min(commit_times_ms[v] for v in kept)
    return max(retention_hours, math.ceil((now_ms - oldest) / 3_600_000) + 1)


def optimize_spark(spark, lake: Lake, name: str, pinned: set[int], retention_hours: int,
                   dry_run: bool) -> TableUpkeep:
    """OPTIMIZE and VACUUM one delta-spark table through Spark, with the retention that keeps `pinned`."""
    import time

    from delta.tables import DeltaTable
    from pyspark.sql import functions as F
    path = str(lake.path(name))
    dt = DeltaTable.forPath(spark, path)
    files = lambda: int(dt.detail().select("numFiles").first()[0])  # noqa: E731
    history = {int(r["version"]): int(r["ts"]) for r in
               dt.history().select("version", F.unix_millis("timestamp").alias("ts")).collect()}
    before, files_before = max(history), files()
    if not dry_run:
        dt.optimize().executeCompaction()
    kept = sorted(v for v in pinned if v in history)
    hours = spark_retention_hours(history, kept, retention_hours, int(time.time() * 1000))
    # Delta's retention check stays on (check_retention refused less already). VACUUM lists the table's
    # folders in this many tasks (default 10,000: 83 s for a 5-file table on local[1], 3.6 s with the
    # session's own parallelism)
    confs = {"spark.sql.sources.parallelPartitionDiscovery.parallelism": str(spark.sparkContext.defaultParallelism)}
    saved = {k: spark.conf.get(k, None) for k in confs}
    for k, v in confs.items():
        spark.conf.set(k, v)
    try:
        doomed = spark.sql(f"VACUUM delta.`{path}` RETAIN {hours} HOURS DRY RUN").count()
        if not dry_run:
            spark.sql(f"VACUUM delta.`{path}` RETAIN {hours} HOURS").collect()
    finally:
        for k, v in saved.items():
            spark.conf.unset(k) if v is None else spark.conf.set(k, v)
    after = int(dt.history(1).select("version").first()[0])
    return TableUpkeep(name, before, after, files_before, files(), doomed, kept, hours)
