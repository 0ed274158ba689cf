"""The lake: Delta tables, the engines that read and write them, and SQL over them.

tables       `Lake` (delta-rs): create from `schemas/`, read (time travel), insert-only MERGE, replace
spark_delta  the same interface on a Spark session with Delta (Databricks, delta-spark), and DataFrames of the tables
locks        one running job of a kind per lake (the Spark plane appends without a MERGE)
queries      what a generation job reads before it plans: prompts by split, events already there
sql          DuckDB over every table, by name (`cai sql`)
spark_sql    Spark SQL over the same tables (`cai sql --engine spark`)
upkeep       `cai lake optimize`: compact, checkpoint, vacuum all but the pinned versions' files
health       which tables open; a broken one's bad commit, last good version and restore (`cai lake`)
"""
