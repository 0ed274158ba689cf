"""The data plane at scale: sl-generate on the fake backend with real Spark + delta-spark.

    python bench/bench_scale.py                       # 10,000 / 100,000 / 182,831 red-team prompts x 4 rounds
    python bench/bench_scale.py --sizes 10000 --increment
    python bench/bench_scale.py --sizes 10000 182831 --label    # + pairs and labels of every prompt

Each size runs in its own process (its own Spark session, so peak memory is per size) on a synthetic
prompts table, and prints: wall time, events/s, peak RSS of the Python driver and of the JVM (driver +
executors in local mode), Delta files and versions of generation_events; the floor (the same rows
appended to a fresh Delta table in one Spark write, measured in the same process); with --increment,
a no-op rerun (its model calls) and +1% prompts; with --label, sample-pairs and label on the same plane
(two samples per prompt, then each pair scored in both orders) with their own floor (the label rows
appended to a fresh table). Not a timed test: it prints figures and ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def jvm_peak_kib() -> int:
    """VmHWM of this process's java children (the local Spark JVM)."""
    peak = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
            if f"PPid:\t{os.getpid()}\n" in text and "Name:\tjava" in text:
                peak = max(peak, int(text.split("VmHWM:")[1].split()[0]))
        except (OSError, IndexError):
            continue
    return peak


def prompt_text(i: int, chars: int) -> str:
    """Prompt i, padded with words to `chars` characters (0: as short as it gets).

    >>> prompt_text(7, 0), len(prompt_text(7, 400))
    ('bench red-team prompt number 7?', 400)
    """
    head = f"bench red-team prompt number {i}?"
    if chars <= len(head):
        return head
    words = " ".join(f"detail{(i + k) % 97}" for k in range(chars // 7 + 1))
    return (head + " " + words)[:chars - 1] + "?"


def make_prompts(spark, lake: Path, n: int, start: int = 0, chars: int = 0) -> None:
    """n synthetic red-team prompts (written by the lake's writer, delta-spark), built column by column (no
    per-row dicts: the driver's peak is the job's)."""
    import pyarrow as pa
    from cai_lib.ids import stable_id
    from cai_lib.lake.spark_delta import SparkDeltaLake
    from schemas import PROMPTS
    idx = range(start, start + n)
    cols = {"prompt_id": [stable_id("bench_prompt", i=i) for i in idx],
            "text": [prompt_text(i, chars) for i in idx],
            "kind": ["red_team"] * n, "source": ["bench"] * n, "source_row": list(idx), "source_format": ["jsonl"] * n,
            "category": [None] * n, "tags": [[]] * n, "split": ["train"] * n, "meta": [None] * n,
            "created_at": [datetime.now(timezone.utc)] * n}
    SparkDeltaLake(spark, lake).insert_new("prompts", pa.table({f.name: pa.array(cols[f.name], f.type) for f in PROMPTS},
                                                               schema=PROMPTS))


def reset_peak_rss() -> None:
    """Start this process's VmHWM afresh (Linux clear_refs), so the peak read after a run is that run's."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mib() -> float:
    return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 1024


def one(a) -> dict:
    """One size in this process."""
    from jobs.sl_generate import SLGenerateConfig, run
    from cai_lib.runtime.session import get_spark
    spark = get_spark(a.master, "cai-bench-scale", delta=True)
    lake = Path(tempfile.mkdtemp(prefix="cai-scale-", dir=a.tmp)) / "lake"
    make_prompts(spark, lake, a.one, chars=a.prompt_chars)
    reset_peak_rss()
    cfg = lambda: SLGenerateConfig(lake=str(lake), params="/nonexistent.yaml", backend="fake", base_model="fake",  # noqa: E731
                                   rounds=4, batch_size=a.batch_size, batches_per_commit=a.batches_per_commit,
                                   spark_master=a.master,
                                   constitution=str(ROOT / "constitutions/default.yaml"))
    result = {"prompts": a.one}
    if not a.label_only:
        result.update(sl_run(spark, lake, cfg))
    if a.label:
        result.update(label_run(spark, lake, a))
    if a.increment and not a.label_only:
        t0 = time.perf_counter()
        again = run(spark, cfg())
        result.update(noop_s=time.perf_counter() - t0, noop_model_calls=again["model_calls"])
        make_prompts(spark, lake, max(1, a.one // 100), start=a.one, chars=a.prompt_chars)
        t0 = time.perf_counter()
        more = run(spark, cfg())
        result.update(plus1_s=time.perf_counter() - t0, plus1_events=more["inserted"],
                      plus1_model_calls=more["model_calls"])
    spark.stop()
    return result


def sl_run(spark, lake: Path, cfg) -> dict:
    """sl-generate of every prompt, then its floor: the same rows appended to a fresh table in one write."""
    from deltalake import DeltaTable
    from jobs.sl_generate import run
    t0 = time.perf_counter()
    out = run(spark, cfg())
    wall = time.perf_counter() - t0
    table = DeltaTable(str(lake / "generation_events"))
    result = {"events": out["inserted"], "wall_s": wall, "events_per_s": out["inserted"] / wall,
              "driver_rss_mib": peak_rss_mib(),
              "jvm_rss_mib": jvm_peak_kib() / 1024, "files": len(table.file_uris()), "versions": table.version() + 1}
    rows = spark.read.format("delta").load(str(lake / "generation_events"))
    t0 = time.perf_counter()
    rows.write.format("delta").mode("append").save(str(lake.parent / "floor"))
    result["floor_s"] = time.perf_counter() - t0
    return result


def label_run(spark, lake: Path, a) -> dict:
    """sample-pairs, then label (one principle, both orders) of every prompt, on the Spark plane."""
    from jobs.label import LabelConfig
    from jobs.label import run as label
    from jobs.sample_pairs import SamplePairsConfig
    from jobs.sample_pairs import run as sample_pairs
    common = dict(lake=str(lake), params="/nonexistent.yaml", backend="fake", batch_size=a.batch_size,
                  batches_per_commit=a.batches_per_commit, spark_master=a.master,
                  constitution=str(ROOT / "constitutions/default.yaml"))
    reset_peak_rss()
    t0 = time.perf_counter()
    pairs = sample_pairs(spark, SamplePairsConfig(policy="fake", **common))
    out = {"pairs_s": time.perf_counter() - t0, "pair_samples": pairs["inserted"]}
    t0 = time.perf_counter()
    labels = label(spark, LabelConfig(feedback_model="fake", **common))
    out.update(label_s=time.perf_counter() - t0, labels=labels["inserted"], label_calls=labels["model_calls"],
               ai_pairs=labels["ai_pairs"], label_driver_rss_mib=peak_rss_mib())
    rows = spark.read.format("delta").load(str(lake / "label_events"))
    t0 = time.perf_counter()
    rows.write.format("delta").mode("append").save(str(lake.parent / "label_floor"))
    out["label_floor_s"] = time.perf_counter() - t0
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 182_831])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches-per-commit", type=int, default=64)
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--increment", action="store_true", help="also a no-op rerun and +1%% prompts")
    ap.add_argument("--label", action="store_true", help="also sample-pairs and label of every prompt")
    ap.add_argument("--label-only", action="store_true", help="pairs and labels only (no sl-generate)")
    ap.add_argument("--tmp", default=None, help="where the lakes go (default: system temp)")
    ap.add_argument("--prompt-chars", type=int, default=0, help="pad each prompt to this many characters (~400: "
                    "a realistic red-team prompt; every chat of its chain embeds it)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.label = a.label or a.label_only
    if a.one:
        print("RESULT " + json.dumps(one(a)), flush=True)
        return 0
    results = []
    for n in a.sizes:
        cmd = [sys.executable, __file__, "--one", str(n), "--batch-size", str(a.batch_size),
               "--batches-per-commit", str(a.batches_per_commit), "--master", a.master]
        cmd += ["--increment"] * a.increment + ["--label"] * a.label + ["--label-only"] * a.label_only
        cmd += ["--tmp", a.tmp] if a.tmp else []
        cmd += ["--prompt-chars", str(a.prompt_chars)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            return 1
        results.append(json.loads(line[7:]))
        r = results[-1]
        if a.label_only:
            print(f"{n:>8} prompts", end="", flush=True)
        else:
            print(f"{n:>8} prompts {r['events']:>9} events {r['wall_s']:>8.1f} s {r['events_per_s']:>8.0f} ev/s  "
                  f"driver {r['driver_rss_mib']:>6.0f} MiB  jvm {r['jvm_rss_mib']:>6.0f} MiB  {r['files']} files  "
                  f"{r['versions']} versions  floor {r['floor_s']:.1f} s (x{r['wall_s'] / r['floor_s']:.1f})"
                  + (f"  no-op {r['noop_s']:.1f} s ({r['noop_model_calls']} model calls)  +1% {r['plus1_s']:.1f} s "
                     f"= {100 * r['plus1_s'] / r['wall_s']:.1f}% of the run ({r['plus1_events']} events in "
                     f"{r['plus1_model_calls']} model calls)" if a.increment else ""), flush=True)
        if a.label:
            print(f"{'':>8} pairs: {r['pair_samples']} samples in {r['pairs_s']:.1f} s; labels: {r['labels']} "
                  f"({r['ai_pairs']} pairs x 2 orders) in {r['label_s']:.1f} s, {r['labels'] / r['label_s']:.0f}/s, "
                  f"{r['label_calls']} model calls, floor {r['label_floor_s']:.1f} s "
                  f"(x{r['label_s'] / r['label_floor_s']:.1f}), driver {r['label_driver_rss_mib']:.0f} MiB", flush=True)
    base = results[0]
    for prev, r in zip(results, results[1:]):
        if not a.label_only:
            per = (r["wall_s"] / r["events"]) / (base["wall_s"] / base["events"])
            marginal = 1000 * (r["wall_s"] - prev["wall_s"]) / max(1, r["events"] - prev["events"])
            print(f"per-event cost at {r['prompts']} vs {base['prompts']}: x{per:.2f} (goal <= 1.3); marginal "
                  f"{marginal:.3f} ms per event from {prev['prompts']} to {r['prompts']}; driver RSS x"
                  f"{r['driver_rss_mib'] / base['driver_rss_mib']:.2f} (goal <= 1.5), JVM RSS "
                  f"x{r['jvm_rss_mib'] / base['jvm_rss_mib']:.2f} ({base['jvm_rss_mib']:.0f} -> {r['jvm_rss_mib']:.0f} MiB)")
        if a.label:
            per = (r["label_s"] / r["labels"]) / (base["label_s"] / base["labels"])
            print(f"per-label cost at {r['prompts']} vs {base['prompts']}: x{per:.2f}; driver RSS while labelling "
                  f"x{r['label_driver_rss_mib'] / base['label_driver_rss_mib']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
