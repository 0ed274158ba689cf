"""Jobs, unchanged, on a Spark standalone cluster: a master and two workers on loopback (127.0.0.1 and
127.0.0.2, 3 cores each; tests/cluster.py), started once for this module from pyspark's own launcher classes.
Each job takes the executors its confs ask for: one core each (CLUSTER_CONF) unless a test says otherwise.

sl-generate with `--master spark://127.0.0.1:PORT` writes the ids, texts and sl_dataset a `local[1]` run
writes, and both workers' executors do the work. The run has speculative execution on (Spark runs it only
on a cluster, never in local mode): every chunk's first task attempt is slow (`fake:slow=S`), so Spark
launches a copy of it on the other worker (a copy never runs on the host of the original), the copy wins,
and each id still lands once.

sample-pairs with 3-core executors and engine tasks of 2 cores (`spark.cai.engineCpus`, stage-level
scheduling: cai_lib/runtime/engines.py): Spark's event log shows each executor ran one engine task at a
time, and Delta's jobs ran on the spare core while an engine generated.

train-sl through `spark-submit launch/cai_task.py` with `--num-processes 2 --distributed cluster` runs its
two ranks as TorchDistributor's barrier tasks, one on each worker's executor (gloo over loopback), on a tiny
random Llama: each step's loss is logged once (by rank 0), one version is registered, and the losses equal a
1-process run's with the same global batch within tests/test_distributed_training.py's 1e-4."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cai_lib.lake.tables import Lake
from cai_lib.runtime.engines import ENGINE_CPUS
from jobs.sl_generate import SLGenerateConfig, run
from tests.cluster import CLUSTER_CONF, StandaloneCluster
from tests.conftest import ROOT, copy_lake

SLOW_S = 4   # a first task attempt's sleep per model call; a speculative copy starts after 0.5 s
SETTINGS = dict(backend="fake", base_model="fake", rounds=1, batch_size=2, batches_per_commit=1,
                params="/dev/null", constitution=str(ROOT / "constitutions/default.yaml"))


def flags(settings: dict) -> list[str]:
    out = []
    for k, v in settings.items():
        out += ["--" + k.replace("_", "-"), str(v)]
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One cluster for every test here: starting the JVMs is most of a test's time."""
    running = StandaloneCluster(tmp_path_factory.mktemp("standalone"), cores=3).start()
    yield running
    running.stop()


def new_app(cluster: StandaloneCluster, before: set[str]) -> str:
    """The one application the workers served since `before` (the job just run)."""
    (app,) = cluster.apps() - before
    return app


@pytest.mark.slow
def test_sl_generate_on_a_standalone_cluster_writes_what_local_writes(spark, small_lake, tmp_path, cluster):
    before = cluster.apps()
    on_cluster = copy_lake(small_lake, tmp_path / "cluster")
    speculation = {**CLUSTER_CONF, "spark.speculation": "true", "spark.speculation.task.duration.threshold": "500ms",
                   "spark.speculation.interval": "100ms"}
    submit = " ".join(f"--conf {k}={v}" for k, v in speculation.items()) + " pyspark-shell"
    job = subprocess.run([sys.executable, "-m", "jobs.cli", "sl-generate", "--lake", str(on_cluster),
                          "--spark-master", cluster.master,
                          *flags({**SETTINGS, "base_model": f"fake:slow={SLOW_S}"})], cwd=ROOT,
                         env={**cluster.env(), "PYSPARK_SUBMIT_ARGS": submit}, capture_output=True, text=True,
                         timeout=600)
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-4000:]
    assert "sl-generate: prompts=5, generations=11, model_calls=7, ok=11, failed=0" in job.stdout
    # each worker started an executor for the job, and each executor ran Python tasks
    logs = cluster.executor_logs(new_app(cluster, before))
    for i in range(2):
        assert "Running task" in logs[i], i
    # speculative copies ran (attempt 1 of a task that never failed: nothing failed in this run)
    assert re.search(r"Running task \d+\.1 in stage", logs[0] + logs[1]), "no speculative attempt ran"

    local = copy_lake(small_lake, tmp_path / "local")   # the same job on local[1]
    run(spark, SLGenerateConfig(lake=str(local), **SETTINGS))
    text = lambda lake: dict(zip(*[Lake(lake).read("generation_events")[c].to_pylist()  # noqa: E731
                                   for c in ("event_id", "text")]))
    assert text(on_cluster) == text(local) and len(text(local)) == 11
    assert Lake(on_cluster).count("generation_events") == 11   # each id once, whichever attempt won
    # the same rows; model_id is the id the run was given ("fake:slow=4": same fingerprint, same ids)
    rows = lambda lake: Lake(lake).read("sl_dataset").drop_columns(["model_id"]).sort_by("prompt_id")  # noqa: E731
    assert rows(on_cluster).equals(rows(local)) and rows(local).num_rows == 5
    assert set(Lake(on_cluster).read("sl_dataset")["model_id"].to_pylist()) == {f"fake:slow={SLOW_S}"}


def spark_events(folder: Path) -> list[dict]:
    """The one application's event log in `folder` (uncompressed, not rolled)."""
    (log,) = folder.iterdir()
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.slow
def test_engine_tasks_take_their_cores_and_delta_jobs_run_beside_them(small_lake, tmp_path, cluster):
    lake, events = copy_lake(small_lake, tmp_path / "engines"), tmp_path / "events"
    events.mkdir()
    conf = {**CLUSTER_CONF, "spark.cores.max": "6", "spark.executor.cores": "3", ENGINE_CPUS: "2",
            "spark.eventLog.enabled": "true", "spark.eventLog.dir": events.as_uri(),
            "spark.eventLog.compress": "false", "spark.eventLog.rolling.enabled": "false"}
    submit = " ".join(f"--conf {k}={v}" for k, v in conf.items()) + " pyspark-shell"
    pairs = dict(backend="fake", policy="fake:latency=0.5", batch_size=1, batches_per_commit=1, params="/dev/null")
    job = subprocess.run([sys.executable, "-m", "jobs.cli", "sample-pairs", "--lake", str(lake), "--spark-master",
                          cluster.master, *flags(pairs)], cwd=ROOT,
                         env={**cluster.env(), "PYSPARK_SUBMIT_ARGS": submit}, capture_output=True, text=True,
                         timeout=600)
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-4000:]
    assert "sample-pairs: prompts=3, samples=6, model_calls=6, ok=6, failed=0" in job.stdout
    log = spark_events(events)
    (engine,) = [e["Resource Profile Id"] for e in log if e["Event"] == "SparkListenerResourceProfileAdded"
                 and e["Task Resource Requests"].get("cpus", {}).get("Amount") == 2]
    profile = {e["Stage Info"]["Stage ID"]: e["Stage Info"]["Resource Profile Id"] for e in log
               if e["Event"] == "SparkListenerStageSubmitted"}
    tasks = [(profile[e["Stage ID"]], e["Task Info"]["Executor ID"], e["Task Info"]["Launch Time"],
              e["Task Info"]["Finish Time"]) for e in log if e["Event"] == "SparkListenerTaskEnd"]
    engines = sorted(t[1:] for t in tasks if t[0] == engine)
    assert len(engines) == 6 and len({x for x, _, _ in engines}) == 2, engines   # 6 model calls, both executors
    # one engine task at a time on an executor: 2 of its 3 cores each (a task's finish time is stamped when the
    # driver handles its end, a few ms after its cores were offered to the next: two engines would overlap by
    # a model call, 500 ms)
    assert all(a[2] - 100 <= b[1] for a, b in zip(engines, engines[1:]) if a[0] == b[0]), engines
    # Delta's jobs (the default profile) ran on an executor's spare core while its engine task generated
    assert any(p != engine and x == y and s0 < e1 and s1 < e0 for p, x, s0, e0 in tasks for y, s1, e1 in engines)


# ---------------------------------------------------------------- train-sl on the cluster's executors

SFT = ["--max-steps", "3", "--batch-size", "4", "--max-length", "64", "--torch-threads", "1", "--seed", "7",
       "--learning-rate", "3e-3"]
TOL = 1e-4   # tests/test_distributed_training.py's: the ranks sum the same per-row gradients in another order


def tiny_causal_lm(folder: Path) -> Path:
    """A 1-layer random Llama (hidden 16) on the default tokenizer: a model folder train-sl loads in a second."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from cai_lib.backends.models import resolve_model
    tok = AutoTokenizer.from_pretrained(resolve_model("default"))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def losses(uri: str) -> list[float]:
    """The step losses the one train-sl run in MLflow at `uri` logged, in step order, once per step."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri, registry_uri=uri)   # not the registry the in-process run configured
    (version,) = client.search_model_versions("name='cai-sl'")   # one registered version
    history = sorted(client.get_metric_history(version.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in history] == [1, 2, 3], "each step's loss logged once (by rank 0 alone)"
    return [m.value for m in history]


@pytest.mark.slow
def test_train_sl_runs_its_ranks_on_the_cluster_executors(spark, tmp_path, cluster):
    from synthetic_lake import build_clean_lake

    from jobs.cli import main as cai
    lake = build_clean_lake(tmp_path / "lake")
    assert cai(["gate", "sl", "--lake", str(lake.root), "--docs-dir", str(tmp_path / "docs")]) == 0
    (tmp_path / "params.yaml").write_text("{}\n")   # the job's own defaults
    common = ["--lake", str(lake.root), "--params", str(tmp_path / "params.yaml"), "--artifact-dir",
              str(tmp_path / "artifacts"), "--base-model", str(tiny_causal_lm(tmp_path / "tiny")), *SFT]
    cluster_uri, one_uri = f"sqlite:///{tmp_path}/cluster.db", f"sqlite:///{tmp_path}/one.db"
    before = cluster.apps()
    confs = [a for k, v in CLUSTER_CONF.items() for a in ("--conf", f"{k}={v}")]
    job = subprocess.run([str(Path(sys.executable).parent / "spark-submit"), "--master", cluster.master, *confs,
                          "launch/cai_task.py", "train-sl", *common, "--tracking-uri", cluster_uri,
                          "--num-processes", "2", "--distributed", "cluster", "--work-dir", str(tmp_path / "work"),
                          "--metrics", str(tmp_path / "cluster.json")],
                         cwd=ROOT, env=cluster.env(), capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-5000:]
    assert "on 2 processes (cluster)" in job.stdout
    # the barrier stage's two tasks (task r = rank r: TorchDistributor sets RANK to the partition id) ran one
    # on each worker's executor, 127.0.0.1 and 127.0.0.2; neither could finish unless both joined the gloo group
    logs = cluster.executor_logs(new_app(cluster, before))
    hosts = {i: re.findall(r"Starting executor ID \d+ on host (\S+)", logs[i]) for i in range(2)}
    assert hosts == {0: ["127.0.0.1"], 1: ["127.0.0.2"]}, hosts
    ranks = {i: re.findall(r"BarrierTaskContext: Task (\d+) from Stage \d+\(Attempt 0\) finished global sync",
                           logs[i]) for i in range(2)}
    assert sorted(ranks[0] + ranks[1]) == ["0", "1"] and len(ranks[0]) == len(ranks[1]) == 1, ranks
    assert cai(["train-sl", *common, "--tracking-uri", one_uri, "--metrics", str(tmp_path / "one.json")]) == 0
    two, one = losses(cluster_uri), losses(one_uri)
    print(f"\nSFT losses 1 process: {one}\nSFT losses 2 ranks on the cluster: {two}")
    assert max(abs(a - b) for a, b in zip(one, two)) < TOL and one[-1] < one[0] - 0.01   # it trained
    cluster_metrics, one_metrics = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("cluster", "one"))
    assert (cluster_metrics["n_train"], cluster_metrics["n_heldout"], cluster_metrics["steps"]) == (31, 5, 3)
    assert abs(cluster_metrics["heldout_loss_after"] - one_metrics["heldout_loss_after"]) < TOL
