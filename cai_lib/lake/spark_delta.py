"""The lake on a Spark session that has Delta (Databricks, or Spark with delta-spark's jars).

Same methods as `cai_lib.lake.tables.Lake`, written with Spark's native Delta support: insert-only
MERGE through `delta.tables.DeltaTable`, reads through `format("delta")` (never plain parquet,
which would include removed files). `open_lake` picks this class only when the session has
Delta; locally (no Delta jars offline) every job uses delta-rs.

Not exercised by the local test suite: the Delta jars live on Maven, which these machines
cannot reach. The interface is the one the delta-rs adapter's tests pin down.
"""
from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa

from cai_lib.lake.tables import Lake, LakeBase, check_lake_root, spec_of


def spark_has_delta(spark) -> bool:
    if os.environ.get("DATABRICKS_RUNTIME_VERSION"):
        return True
    return "DeltaSparkSessionExtension" in (spark.conf.get("spark.sql.extensions", "") or "")


def open_lake(root, spark=None, mode: str | None = "write"):
    """The lake adapter for this session: native Spark Delta where available, else delta-rs. The
    folder is checked first (`mode`, see check_lake_root): a job fails before any model call."""
    if "://" not in str(root):   # a local folder (a cloud URI is the cluster's to check)
        check_lake_root(Path(root), mode)
    return SparkDeltaLake(spark, root) if spark is not None and spark_has_delta(spark) else Lake(root)


class SparkDeltaLake(LakeBase):
    def __init__(self, spark, root):
        from delta.tables import DeltaTable  # delta-spark's Python side; the jars come with the session
        self.spark, self.root, self._DeltaTable = spark, str(root).rstrip("/"), DeltaTable

    def path(self, name: str) -> str:
        spec_of(name)
        return f"{self.root}/{name}"

    def exists(self, name: str) -> bool:
        return self._DeltaTable.isDeltaTable(self.spark, self.path(name))

    def table(self, name: str):
        from pyspark.sql.pandas.types import from_arrow_schema
        spec = spec_of(name)
        if not self.exists(name):
            builder = self._DeltaTable.createIfNotExists(self.spark).location(self.path(name))
            builder = builder.addColumns(from_arrow_schema(spec.schema))
            if spec.append_only:
                builder = builder.property("delta.appendOnly", "true")
            builder.execute()
        return self._DeltaTable.forPath(self.spark, self.path(name))

    def version(self, name: str) -> int | None:
        if not self.exists(name):
            return None
        return int(self.table(name).history(1).select("version").first()[0])

    def read(self, name: str, columns: list[str] | None = None, version: int | None = None) -> pa.Table:
        spec = spec_of(name)
        schema = spec.schema if columns is None else pa.schema([spec.schema.field(c) for c in columns])
        if not self.exists(name):
            return schema.empty_table()
        reader = self.spark.read.format("delta")
        if version is not None:
            reader = reader.option("versionAsOf", version)
        df = reader.load(self.path(name))
        return df.select(*(columns or spec.schema.names)).toArrow().cast(schema)

    def count(self, name: str) -> int:
        return self.spark.read.format("delta").load(self.path(name)).count() if self.exists(name) else 0

    def _merge_insert(self, name: str, rows: pa.Table, key: str) -> int:
        before = self.version(name)
        target = self.table(name)
        (target.alias("t").merge(self.spark.createDataFrame(rows).alias("s"), f"t.{key} = s.{key}")
         .whenNotMatchedInsertAll().execute())
        last = target.history(1).first()
        if before is not None and int(last["version"]) == before:
            return 0
        return int((last["operationMetrics"] or {}).get("numTargetRowsInserted", 0))

    def _overwrite(self, name: str, rows: pa.Table) -> None:
        self.spark.createDataFrame(rows).write.format("delta").mode("overwrite").save(self.path(name))
