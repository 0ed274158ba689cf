"""Spark SQL over the lake (`cai sql --engine spark`): each Delta table is a temp view named after the
table, read with delta-spark (its current snapshot), so a query gives what the DuckDB engine gives.

Reads only: SQL on raw paths (`SELECT * FROM parquet.`/x``) is switched off for the query, so only the
lake's views are in reach; the session itself is the user's (a trusted shell, or a notebook).
"""
from __future__ import annotations

import pyarrow as pa

from cai_lib.quality import signals as quality
from schemas import TABLES


def register_views(spark, root) -> None:
    """A temp view per table; a table not written yet is an empty one with its schema."""
    from delta.tables import DeltaTable
    from pyspark.sql.pandas.types import from_arrow_schema
    root = str(root).rstrip("/")
    for name, spec in TABLES.items():
        path = f"{root}/{name}"
        df = (spark.read.format("delta").load(path) if DeltaTable.isDeltaTable(spark, path)
              else spark.createDataFrame([], from_arrow_schema(spec.schema)))
        df.createOrReplaceTempView(name)
    spark.udf.register("is_refusal", lambda text: quality.is_refusal(text or ""), "boolean")


def query(spark, root, sql: str) -> pa.Table:
    """Run `sql` over the lake's tables; any SQL error is one ValueError naming the lake's tables."""
    from pyspark.errors import AnalysisException, PySparkException
    register_views(spark, root)
    before = spark.conf.get("spark.sql.runSQLOnFiles", "true")
    spark.conf.set("spark.sql.runSQLOnFiles", "false")
    try:
        return spark.sql(sql).toArrow()
    except AnalysisException as exc:
        raise ValueError(f"{str(exc).splitlines()[0]}\nLake tables: {', '.join(TABLES)}") from None
    except PySparkException as exc:
        raise ValueError(str(exc).splitlines()[0]) from None
    finally:
        spark.conf.set("spark.sql.runSQLOnFiles", before)
