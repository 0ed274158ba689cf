"""The local Spark session the jobs share, set up for one model per Python worker.

With `delta=True` the session carries delta-spark: its jars resolve from Maven Central through
`spark.jars.packages` (cached by Ivy in ~/.ivy2), the catalog and SQL extensions are Delta's, and
new tables keep to what delta-rs also reads and writes (reader 1 / writer 2: no deletion vectors).
"""
from __future__ import annotations

import os
import re
import sys

from cai_lib.env import set_offline_env
from cai_lib.lake.spark_delta import DELTA_PACKAGE, require_delta
from cai_lib.runtime.jvm_cache import driver_java_options, keep_dump_at_exit, remember_jars, resolved_jars

DELTA_CONF = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
    "spark.databricks.delta.properties.defaults.enableDeletionVectors": "false",   # delta-rs reads every table
    # small state: one task rebuilds a snapshot, not 50 (measured: 1.1 s per append instead of 5-8 s)
    "spark.databricks.delta.snapshotPartitions": "1",
    "spark.databricks.delta.writeChecksumFile.enabled": "false",
}


LOG_LEVEL_ENV = "CAI_SPARK_LOG_LEVEL"
TASK_ATTEMPTS = 2   # a task that fails (a crashed Python worker, a lost executor) runs once more


def local_master(master: str) -> str:
    """`local[N]` as `local[N,attempts]`: local mode ignores spark.task.maxFailures and would never
    retry a failed task, unlike a cluster.

    >>> local_master("local[2]"), local_master("local[*]"), local_master("local[2,4]"), local_master("spark://h:7077")
    ('local[2,2]', 'local[*,2]', 'local[2,4]', 'spark://h:7077')
    """
    m = re.fullmatch(r"local\[(\d+|\*)\]", master)
    return f"local[{m.group(1)},{TASK_ATTEMPTS}]" if m else master


def get_spark(master: str = "local[1]", app_name: str = "cai", delta: bool = False):
    """getOrCreate a session; Python workers are reused so each keeps its loaded model."""
    set_offline_env()
    # Workers must run this interpreter (the venv), or they would not find torch or cai_lib.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(app_name)
    # under spark-submit the JVM already exists and --master decides; only set ours otherwise
    starts_jvm = "PYSPARK_GATEWAY_PORT" not in os.environ and SparkContext._active_spark_context is None
    if "PYSPARK_GATEWAY_PORT" not in os.environ:
        builder = builder.master(local_master(master))
    dump = final = jars = None
    if starts_jvm:
        options, dump, final = driver_java_options(DELTA_PACKAGE if delta else "")
        if options:
            builder = builder.config("spark.driver.extraJavaOptions", options)
    if delta:
        jars = resolved_jars(DELTA_PACKAGE) if starts_jvm else None
        builder = builder.config(*(("spark.jars", jars) if jars else ("spark.jars.packages", DELTA_PACKAGE)))
        for key, value in DELTA_CONF.items():
            builder = builder.config(key, value)
    spark = (
        builder
        .config("spark.python.worker.reuse", "true")  # one model load per worker, not per task
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.driver.memory", "4g")
        .config("spark.task.maxFailures", str(TASK_ATTEMPTS))
        # a chunk task is model calls over a few KB of rows: waiting for the executor that holds its rows
        # (3 s a locality level by default) left an engine idle 4.3 s a round on a 2-worker cluster
        .config("spark.locality.wait", "0")
        .getOrCreate()
    )
    # `cai` sets OFF unless --debug: a failed task's Java stack (hundreds of lines, logged by every executor
    # that saw it) would bury the one-line error the CLI prints; the error itself still carries it
    spark.sparkContext.setLogLevel(os.environ.get(LOG_LEVEL_ENV, "ERROR"))
    if dump is not None:
        keep_dump_at_exit(spark, dump, final)
    if starts_jvm and delta and not jars:
        # only a JVM this call started: under spark-submit spark.jars also holds the user's own --jars
        remember_jars(DELTA_PACKAGE, spark.sparkContext.getConf().get("spark.jars"))
    if delta:
        require_delta(spark)
    return spark


def default_parallelism(spark) -> int:
    return max(1, spark.sparkContext.defaultParallelism)
