"""How busy the Spark plane keeps its engines at GPU-like speed: `cai sample-pairs` on the fake backend
with `fake:latency=S` (every model call sleeps S seconds: 0.2 s is a GPU's batch of ~100-token answers),
against the bare backend's own throughput, in one run.

    python bench/bench_plane_utilisation.py                        # local[2], 8,000 prompts, latency 0.2
    python bench/bench_plane_utilisation.py --prompts 2000 --master local[1]
    python bench/bench_plane_utilisation.py --standalone      # a loopback standalone cluster laid out as a GPU
                       # cluster's: 2 workers x 3 cores, an engine task of 2 (one per worker), a core beside it
    python bench/bench_plane_utilisation.py --standalone --worker-cores 1 --engine-cpus 1   # a CPU cluster's:
                       # the engine is the worker's only core, which Delta's jobs then share

Utilisation = the job's samples per second / (slots x the bare backend's samples per second): 1.0 means
every engine generated all the time, from the job's start (pending, plans) to its last commit. Two
settings: the defaults (chunks of ~chunk_seconds of model time, at most batches_per_commit batches) and
the fixed count the plane used before (16 x 4 = 64 generations per commit). Not a timed test: it prints
a markdown table.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_prompts(spark, lake: Path, n: int) -> None:
    """n short synthetic red-team prompts, written by the lake's writer (delta-spark)."""
    import pyarrow as pa

    from cai_lib.ids import stable_id
    from cai_lib.lake.spark_delta import SparkDeltaLake
    from schemas import PROMPTS
    cols = {"prompt_id": [stable_id("bench_prompt", i=i) for i in range(n)],
            "text": [f"bench red-team prompt number {i}?" for i in range(n)],
            "kind": ["red_team"] * n, "source": ["bench"] * n, "source_row": list(range(n)),
            "source_format": ["jsonl"] * n, "category": [None] * n, "tags": [[]] * n, "split": ["train"] * n,
            "meta": [None] * n, "created_at": [datetime.now(timezone.utc)] * n}
    SparkDeltaLake(spark, lake).insert_new("prompts", pa.table({f.name: pa.array(cols[f.name], f.type) for f in PROMPTS},
                                                               schema=PROMPTS))


def bare_rate(latency: float, batch_size: int, calls: int = 10) -> tuple[float, float]:
    """(samples per second, seconds per call) of one engine: the fake backend called directly, no Spark."""
    from cai_lib.backends import Sampling
    from cai_lib.backends.fake import FakeBackend
    backend = FakeBackend(f"fake:latency={latency}")
    chats = [[{"role": "user", "content": f"bench red-team prompt number {i}?"}] for i in range(batch_size)]
    t0 = time.perf_counter()
    for k in range(calls):
        backend.generate(chats, Sampling(1.0, 0.9, 96), list(range(k, k + batch_size)))
    seconds = time.perf_counter() - t0
    return calls * batch_size / seconds, seconds / calls


def one_run(spark, lake: Path, latency: float, batch_size: int, batches_per_commit: int, chunk_seconds: float) -> dict:
    """sample-pairs over every prompt of `lake`: its summary, wall time and chunk sizes (rows per commit)."""
    from deltalake import DeltaTable

    from jobs.sample_pairs import SamplePairsConfig
    from jobs.sample_pairs import run as sample_pairs
    cfg = SamplePairsConfig(lake=str(lake), backend="fake", policy=f"fake:latency={latency}", batch_size=batch_size,
                            batches_per_commit=batches_per_commit, chunk_seconds=chunk_seconds, params="/dev/null",
                            constitution=str(ROOT / "constitutions/default.yaml"))
    t0 = time.perf_counter()
    summary = sample_pairs(spark, cfg, progress=None)
    wall = time.perf_counter() - t0
    sizes = [int(h["operationMetrics"]["numOutputRows"]) for h in DeltaTable(str(lake / "generation_events")).history()
             if h["operation"] == "WRITE"]
    return {"summary": summary, "wall": wall, "sizes": sizes}


def row(name: str, run: dict, rate: float, per_call: float, slots: int, batch_size: int) -> str:
    s, wall, sizes = run["summary"], run["wall"], run["sizes"]
    per_s = s["samples"] / wall
    idle = (slots * wall - s["model_calls"] * per_call) / max(len(sizes), 1)   # engine-seconds not generating
    chunks = f"{min(sizes) // batch_size}-{max(sizes) // batch_size}" if sizes else "-"
    return (f"| {name} | {s['samples']:,} | {len(sizes)} | {chunks} | {wall:.1f} s | {per_s:.1f}/s | "
            f"{slots} x {rate:.1f}/s | {per_s / (slots * rate):.3f}x | {idle:.2f} s |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8000, help="red-team prompts (2 samples each)")
    ap.add_argument("--latency", type=float, default=0.2, help="seconds per model call (GPU-like: 0.2)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--standalone", action="store_true",
                    help="run on a Spark standalone cluster on loopback: a master and two workers (tests/cluster.py)")
    # a GPU executor has cores beside its GPU's engine task, where Delta's jobs run (engines.delta_beside)
    ap.add_argument("--worker-cores", type=int, default=3, help="with --standalone: cores per worker (and executor)")
    ap.add_argument("--engine-cpus", type=int, default=2,
                    help="with --standalone: cores one engine task takes (spark.cai.engineCpus, cai_lib/runtime/engines.py)")
    a = ap.parse_args(argv)
    from cai_lib.env import set_offline_env
    from cai_lib.runtime.session import get_spark
    set_offline_env()
    from cai_lib.runtime.engines import engine_profile
    cluster = start_cluster(a.worker_cores, a.engine_cpus) if a.standalone else None
    master = cluster.master if cluster else a.master
    spark = get_spark(master, "bench-plane-utilisation", delta=True)
    profile, slots = engine_profile(spark, {"backend": "fake"})   # the plane's engines, as it counts them
    rate, per_call = bare_rate(a.latency, a.batch_size)
    from dataclasses import fields

    from jobs.sample_pairs import SamplePairsConfig
    default = {f.name: f.default for f in fields(SamplePairsConfig)}   # the job's own, as a user runs it
    bpc, chunk_seconds = default["batches_per_commit"], default["chunk_seconds"]
    settings = [(f"defaults (chunk_seconds {chunk_seconds:g}, at most {bpc} batches)", bpc, chunk_seconds),
                ("fixed 64 per commit (16 x 4, before)", 4, 0.0)]
    with tempfile.TemporaryDirectory() as tmp:
        base, warm = Path(tmp) / "base", Path(tmp) / "warm"
        make_prompts(spark, base, a.prompts)
        make_prompts(spark, warm, 4 * a.batch_size * slots)
        one_run(spark, warm, a.latency, a.batch_size, bpc, chunk_seconds)   # Python workers started, JIT warm
        lines = ["| settings | samples | commits | batches per chunk | wall | samples/s | bare engines | "
                 "utilisation | idle engine-s per commit |", "| --- " * 9 + "|"]
        for name, bpc, chunk_seconds in settings:
            lake = Path(tmp) / f"run-{bpc}"
            shutil.copytree(base, lake)
            run = one_run(spark, lake, a.latency, a.batch_size, bpc, chunk_seconds)
            lines.append(row(name, run, rate, per_call, slots, a.batch_size))
            print(lines[-1], flush=True)
    where = (f"standalone cluster {master} (2 workers x {a.worker_cores} cores, an engine task takes "
             f"{int(profile.taskResources['cpus'].amount) if profile else 1} cores)" if cluster else master)
    print(f"\n{a.prompts:,} prompts x 2 samples, batch {a.batch_size}, fake:latency={a.latency} "
          f"({per_call:.3f} s per bare call), {where}, {slots} slots\n")
    print("\n".join(lines))
    spark.stop()
    if cluster:
        cluster.stop()
    return 0


def start_cluster(cores: int, engine_cpus: int | None):
    """The tests' loopback standalone cluster, and this process set up as its driver: both executors
    registered before the first job, each of a worker's `cores`; engine tasks of `engine_cpus` cores."""
    import os

    from cai_lib.runtime.engines import ENGINE_CPUS
    from tests.cluster import CLUSTER_CONF, StandaloneCluster
    cluster = StandaloneCluster(Path(tempfile.mkdtemp(prefix="bench-cluster-")), cores=cores).start()
    conf = {**CLUSTER_CONF, "spark.cores.max": str(2 * cores), "spark.executor.cores": str(cores),
            **({ENGINE_CPUS: str(engine_cpus)} if engine_cpus else {})}
    os.environ.update(cluster.env())
    os.environ["PYSPARK_SUBMIT_ARGS"] = " ".join(f"--conf {k}={v}" for k, v in conf.items()) + " pyspark-shell"
    return cluster


if __name__ == "__main__":
    sys.exit(main())
