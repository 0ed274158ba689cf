"""The lake: Delta tables, their one writer, the JVM-free readers, and SQL over them.

spark_delta  the one writer (delta-spark): insert-only MERGE, idempotent appends, replace; DataFrames of the tables
tables       `Lake` (delta-rs): the JVM-free reader (time travel), and the contract checks both share
writers      who wrote a table: another engine's commit is refused before any model call; `cai lake adopt`
locks        one running job of a kind per lake (kernel-held flock)
queries      what jobs read on the driver: the training prompts no evaluation may use
sql          DuckDB over every table, by name (`cai sql`)
spark_sql    Spark SQL over the same tables (`cai sql --engine spark`)
upkeep       `cai lake optimize`: compact, checkpoint, vacuum all but the pinned versions' files
health       which tables open; a broken one's bad commit, last good version and restore (`cai lake`)
"""
