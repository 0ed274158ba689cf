"""The local Spark session the jobs share, set up for one model per Python worker."""
from __future__ import annotations

import os
import sys

from cai_lib.env import set_offline_env


def get_spark(master: str = "local[1]", app_name: str = "cai"):
    """getOrCreate a session; Python workers are reused so each keeps its loaded model."""
    set_offline_env()
    # Workers must run this interpreter (the venv), or they would not find torch or cai_lib.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(app_name)
    if "PYSPARK_GATEWAY_PORT" not in os.environ:
        # Under spark-submit the JVM already exists and --master decides; only set ours otherwise.
        builder = builder.master(master)
    spark = (
        builder
        .config("spark.python.worker.reuse", "true")  # one model load per worker, not per task
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.driver.memory", "4g")
        .config("spark.task.maxFailures", "2")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def default_parallelism(spark) -> int:
    return max(1, spark.sparkContext.defaultParallelism)
