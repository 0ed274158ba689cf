"""Where model work runs: the Spark session, the code inside its Python workers, the data plane.

session  the local Spark session the jobs share (one model per reused Python worker)
jvm_cache its driver JVM's quick start: a class-data-sharing archive and the jars Ivy resolved, kept between runs
worker   runs inside Spark's Python workers: one loaded backend per process, generate or score a partition
tasks    a generation `Task`, a run's counts, and the `generation_events` rows its results become
scoring  (chat, choice) items -> Spark -> log-probs of each answer choice (AI feedback)
chunking the plane's pure parts: the Plane context, Chunk, and the rules that size chunks by measured model time
engines  off local mode, the cores (or GPU) one engine's task asks for, and how many engines the cluster runs
app_ids  how a chunk's idempotent append is named: a hash of the keys that decide its rows
plans    the plan a wave records in work_batches before it commits, and reading it back
inflight the plane's chunk jobs in flight on driver threads, one more than the slots
spark_plane  the Spark-native data plane: anti-join pending work, generate in the executors, append with delta-spark
broken_state one sentence for a run broken by the machine's state (full disk, read-only lake, dead executor)
"""
