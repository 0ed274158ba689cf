"""The lake: Delta tables, the engines that read and write them, and SQL over them.

tables       `Lake` (delta-rs): create from `schemas/`, read (time travel), insert-only MERGE, replace
spark_delta  the same interface on a Spark session with Delta (Databricks, delta-spark)
queries      what a generation job reads before it plans: prompts by split, events already there
sql          DuckDB over every table, by name (`cai sql`)
health       which tables open; a broken one's bad commit, last good version and restore (`cai lake`)
"""
