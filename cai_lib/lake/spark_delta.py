"""The lake's one writer: delta-spark, on a Spark session that has Delta (Databricks, or Spark with
delta-spark's jars). Every job writes through it.

Event tables take insert-only MERGEs on their key (`insert_new`) and idempotent appends (`idempotent_append`:
txnAppId/txnVersion, so a chunk written twice, by a retry or a second run, lands once); derived tables are
replaced whole. Reads go through `format("delta")` (never plain parquet, which would include removed files),
and `df()` serves the Spark-native data plane, which reads and appends DataFrames without bringing rows to
the driver. `cai_lib.lake.tables.Lake` reads the same tables without a JVM.
"""
from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pyarrow as pa

from cai_lib.lake.tables import (COMMIT_ATTEMPTS, CommitRaceError, LakeBase, LakeError, added_columns, check_lake_target,
                                 conform, first_of_each_key, is_uri, read_schema, spec_of)
from schemas import TABLES

# delta-spark 4.4.1's own `configure_spark_with_delta_pip` asks for 4.4.1's jar, which Maven Central
# does not serve (Ivy: unresolved dependency); the 4.4.0 jar is the newest for Spark 4.2 / Scala 2.13.
DELTA_PACKAGE = "io.delta:delta-spark_4.2_2.13:4.4.0"
# How long an event table remembers an idempotent append's app id (its SetTransaction): far longer than
# any run, its retries and a second run beside it; after that the jobs' anti-joins already skip what the
# append wrote. A plain table property: the protocol stays reader 1 / writer 2, which delta-rs reads.
TXN_RETENTION = "interval 30 days"
TXN_VERSION = 1   # one app id per chunk's content, written once: any recorded version means "landed"


def spark_has_delta(spark) -> bool:
    if os.environ.get("DATABRICKS_RUNTIME_VERSION"):
        return True
    return "DeltaSparkSessionExtension" in (spark.conf.get("spark.sql.extensions", "") or "")


def open_lake(root, spark, mode: str | None = "write"):
    """The lake as its one writer sees it: delta-spark on `spark`, which must have Delta. The folder is
    checked first (`mode`, see check_lake_root): a job fails before any model call."""
    check_lake_target(root, mode)
    if mode in ("write", "create") and not is_uri(root):
        from cai_lib.lake.writers import check_writers
        check_writers(Path(root), TABLES)   # another engine's commit: refused before any model call
    require_delta(spark)
    return SparkDeltaLake(spark, root)


def has_commit(log: Path) -> bool:
    """Whether a local Delta log holds a commit or a checkpoint (files named by a 20-digit version), as
    isDeltaTable asks: a `_delta_log` folder that is empty, or holds only a commit still being written (Delta
    writes a hidden temp file, then renames it), is not a table yet.

    >>> import tempfile; log = Path(tempfile.mkdtemp()) / "_delta_log"
    >>> has_commit(log), log.mkdir(), has_commit(log)
    (False, None, False)
    >>> _ = (log / ".00000000000000000000.json.1c2d.tmp").write_text("{}"); has_commit(log)
    False
    >>> _ = (log / "00000000000000000000.json").write_text("{}"); has_commit(log)
    True
    """
    try:
        names = os.listdir(log)
    except OSError:   # no log folder (or not readable): not a table here
        return False
    return any(len(n) > 20 and n[:20].isdigit() and n[20] == "." for n in names)


def content_checksum(df) -> tuple:
    """(rows, xor of each row's 64-bit hash over all columns): equal for equal row sets in any order."""
    from pyspark.sql import functions as F
    row = df.agg(F.count(F.lit(1)), F.bit_xor(F.xxhash64(*df.columns))).first()
    return int(row[0]), int(row[1] or 0)


def require_delta(spark) -> None:
    """Raise, naming the fix, when a session asked to write with delta-spark has no Delta."""
    if spark is None or not spark_has_delta(spark):
        raise RuntimeError(
            "this Spark session has no Delta (spark.sql.extensions lacks DeltaSparkSessionExtension), so it cannot "
            f"write the lake with delta-spark. Fix: pass spark-submit --packages {DELTA_PACKAGE} --conf "
            "spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension --conf "
            "spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog")


class SparkDeltaLake(LakeBase):
    def __init__(self, spark, root):
        from delta.tables import DeltaTable  # delta-spark's Python side; the jars come with the session
        # a local folder as an absolute path: delta-spark reads a relative one ("lake/prompts") as a table name
        root = str(root).rstrip("/") if is_uri(root) else str(Path(root).resolve())
        self.spark, self.root, self._DeltaTable = spark, root, DeltaTable
        self._seen: set[str] = set()   # tables seen as Delta tables: one stays one for the life of a job

    def path(self, name: str) -> str:
        spec_of(name)
        return f"{self.root}/{name}"

    def exists(self, name: str) -> bool:
        """Whether `name` is a Delta table. A local one by its log's files (isDeltaTable took 0.5-3 s on a
        stage's fresh JVM, the first call of a job the slowest); a cloud one by isDeltaTable. A yes is
        remembered (a gate asked 16 times); a no is asked again, since another writer may create it."""
        if name not in self._seen:
            found = (has_commit(Path(self.path(name)) / "_delta_log") if not is_uri(self.root)
                     else self._DeltaTable.isDeltaTable(self.spark, self.path(name)))
            if found:
                self._seen.add(name)
        return name in self._seen

    def table(self, name: str):
        from pyspark.sql.pandas.types import from_arrow_schema
        spec = spec_of(name)
        if not self.exists(name):
            builder = self._DeltaTable.createIfNotExists(self.spark).location(self.path(name))
            builder = builder.addColumns(from_arrow_schema(spec.schema))
            if spec.append_only:
                builder = (builder.property("delta.appendOnly", "true")
                           .property("delta.setTransactionRetentionDuration", TXN_RETENTION))
            try:
                builder.execute()
            except Exception:   # another writer created it first (both wrote version 0): theirs stands
                if not self._appears(name):
                    raise
        table = self._DeltaTable.forPath(self.spark, self.path(name))
        stored = {f.name for f in table.toDF().schema.fields}
        added = [f for f in from_arrow_schema(spec.schema).fields if f.name not in stored]
        if added:   # a newer release added nullable columns (added_columns refuses a NOT NULL one): evolve in place
            added_columns(spec, pa.schema([spec.schema.field(n) for n in stored if n in spec.schema.names]))
            cols = ", ".join(f"`{f.name}` {f.dataType.simpleString()}" for f in added)
            self.spark.sql(f"ALTER TABLE delta.`{self.path(name)}` ADD COLUMNS ({cols})")
            table = self._DeltaTable.forPath(self.spark, self.path(name))   # an object made before would refuse
        return table

    def _appears(self, name: str, wait_s: float = 10.0) -> bool:
        """Whether table `name` exists or shows up within `wait_s`: a writer that lost the race to create it
        can look while the winner's folder is there but its version 0 is not yet (Delta then refuses the
        loser's create as DELTA_CREATE_TABLE_WITH_NON_EMPTY_LOCATION)."""
        deadline = time.monotonic() + wait_s
        while not self.exists(name):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    def version(self, name: str) -> int | None:
        if not self.exists(name):
            return None
        # forPath, not table(): reading a version needs neither table()'s create check nor its schema check
        return int(self._DeltaTable.forPath(self.spark, self.path(name)).history(1).select("version").first()[0])

    def read(self, name: str, columns: list[str] | None = None, version: int | None = None) -> pa.Table:
        schema = read_schema(name, columns)
        if not self.exists(name):
            return schema.empty_table()
        return self.df(name, version).select(*schema.names).toArrow().cast(schema)

    def df(self, name: str, version: int | None = None):
        """The table as a Spark DataFrame (an empty one with its schema if it does not exist yet)."""
        from pyspark.sql.pandas.types import from_arrow_schema
        if not self.exists(name):
            return self.spark.createDataFrame([], from_arrow_schema(spec_of(name).schema))
        reader = self.spark.read.format("delta")
        if version is not None:
            reader = reader.option("versionAsOf", version)
        return reader.load(self.path(name))

    def replace_df(self, name: str, rows, built_from: str | None = None) -> bool:
        """`replace` for a DataFrame: overwrite a derived table unless it already holds exactly these
        rows (same count and the same order-free checksum of every column) and its last commit says the
        same `built_from` (the commit's userMetadata: what the rows were derived from); True when it wrote
        (created the table, or committed: Delta makes no commit for an empty table overwritten with no rows)."""
        spec = spec_of(name)
        if spec.append_only:
            raise LakeError(f"{name} is an append-only event table: it is never replaced")
        rows = rows.select(*spec.schema.names)
        existed = self.exists(name)
        if (existed and self.built_from(name) == built_from
                and content_checksum(self.df(name)) == content_checksum(rows)):
            return False
        self.table(name)
        before = self.version(name)
        self._write(rows, name, "overwrite", built_from)
        return not existed or self.version(name) != before

    def append_df(self, name: str, rows, built_from: str | None = None) -> None:
        """Append `rows` to a derived table in one commit that records `built_from` (see replace_df)."""
        self.table(name)
        self._write(rows.select(*spec_of(name).schema.names), name, "append", built_from)

    def built_from(self, name: str) -> str | None:
        """The userMetadata of the table's last commit: what replace_df / append_df said its rows were
        derived from. Any other commit (OPTIMIZE, a delta-rs write) has none, so it never matches."""
        if not self.exists(name):
            return None
        return self.table(name).history(1).select("userMetadata").first()[0]

    def _write(self, rows, name: str, mode: str, built_from: str | None) -> None:
        writer = rows.write.format("delta").mode(mode)
        if built_from is not None:
            writer = writer.option("userMetadata", built_from)
        writer.save(self.path(name))

    def idempotent_append(self, name: str, rows, app_id: str) -> None:
        """Append `rows` to event table `name` once per `app_id` (Delta's idempotent write: txnAppId +
        txnVersion): when the table has recorded `app_id`, from a retry or another run, Delta commits
        nothing and does not run `rows`' query (no model call). Two appends of one id at once: the
        loser's commit fails with ConcurrentTransactionException, and its retry finds the id recorded.
        The table must exist (`table(name)` once, before the chunks: it sets the properties a plain append
        would not); checking it here would cost two log reads on the driver for every chunk."""
        writer = (rows.write.format("delta").mode("append").option("txnAppId", app_id)
                  .option("txnVersion", TXN_VERSION))
        try:
            writer.save(self.path(name))
        except Exception as exc:   # captured py4j errors: Delta's exception is known by its class name
            if "ConcurrentTransactionException" not in f"{type(exc).__name__} {exc}":
                raise
            writer.save(self.path(name))

    def count(self, name: str) -> int:
        return self.spark.read.format("delta").load(self.path(name)).count() if self.exists(name) else 0

    def insert_new(self, name: str, rows: pa.Table) -> int:
        """Insert the rows whose key is not in event table `name` yet (an insert-only MERGE on the key, so a
        rerun or a retry writes nothing twice, and nothing new makes no new version); how many it inserted."""
        spec = spec_of(name)
        if not spec.append_only:
            raise LakeError(f"{name} is a derived table: rebuild it with replace(), not insert_new()")
        rows = conform(name, rows)
        if rows.num_rows == 0:
            return 0
        source = self.spark.createDataFrame(first_of_each_key(rows, spec.key))
        target = self.table(name)

        def merge() -> int:
            result = (target.alias("t").merge(source.alias("s"), f"t.{spec.key} = s.{spec.key}")
                      .whenNotMatchedInsertAll().execute())
            return int(result.first()["num_inserted_rows"])   # this MERGE's own count, whatever else committed
        return retrying(name, self.path(name), merge)

    def replace(self, name: str, rows: pa.Table) -> bool:
        """Replace derived table `name` with `rows` unless it already holds exactly them (sorted by key, so
        the same events always give the same table and an unchanged rebuild writes nothing); True if written."""
        spec = spec_of(name)
        if spec.append_only:
            raise LakeError(f"{name} is an append-only event table: it is never replaced")
        rows = conform(name, rows).sort_by(spec.key)
        if self.exists(name) and self.read(name).sort_by(spec.key).equals(rows):
            return False
        self.table(name)
        frame = self.spark.createDataFrame(rows)
        retrying(name, self.path(name), lambda: frame.write.format("delta").mode("overwrite").save(self.path(name)))
        return True


CONFLICTS = ("ConcurrentAppendException", "ConcurrentDeleteReadException", "ConcurrentDeleteDeleteException",
             "ConcurrentTransactionException", "ConcurrentWriteException", "MetadataChangedException")


def retrying(name: str, path: str, commit):
    """Run `commit` again when another writer of the table committed first (Delta's optimistic conflict
    check). An insert-only MERGE is idempotent (a retry inserts only what is still missing) and a derived
    table is a projection, so a lost race costs one retry, never the model work the rows carry."""
    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        try:
            return commit()
        except Exception as exc:   # captured py4j errors: Delta's conflict is known by its class name
            conflict = next((c for c in CONFLICTS if c in f"{type(exc).__name__} {exc}"), None)
            if conflict is None:
                raise
            if attempt == COMMIT_ATTEMPTS:
                raise CommitRaceError(f"{name}: lost the commit race {COMMIT_ATTEMPTS} times in a row to another "
                                      f"writer of {path} ({conflict}). Fix: let the other run finish, then rerun this "
                                      "job: it writes only what is still missing") from None
            time.sleep(random.uniform(0.05, 0.25) * attempt)   # jitter: two losers do not collide again
