"""The Spark-native sl-generate, unchanged, on a Spark standalone cluster: a master and two workers on
loopback, started from pyspark's own launcher classes, and `--master spark://127.0.0.1:PORT`. It writes
the ids, texts and sl_dataset a `local[1]` run writes, and both workers' executors do the work.

The run has speculative execution on (Spark runs it only on a cluster, never in local mode): every
chunk's first task attempt is slow (`fake:slow=S`), so Spark launches a copy of it on the other worker
(127.0.0.2: a copy never runs on the host of the original), the copy wins, and each id still lands once."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cai_lib.lake.tables import Lake
from jobs.sl_generate import SLGenerateConfig, run
from tests.conftest import ROOT, copy_lake

SLOW_S = 4   # a first task attempt's sleep per model call; a speculative copy starts after 0.5 s
SETTINGS = dict(backend="fake", base_model="fake", rounds=1, batch_size=2, batches_per_commit=1,
                params="/dev/null", constitution=str(ROOT / "constitutions/default.yaml"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc, log: Path, seconds: float = 90) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited {proc.returncode}: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"port {port} never opened: {log.read_text()[-2000:]}")


def flags(settings: dict) -> list[str]:
    out = []
    for k, v in settings.items():
        out += ["--" + k.replace("_", "-"), str(v)]
    return out


@pytest.mark.slow
def test_sl_generate_on_a_standalone_cluster_writes_what_local_writes(spark, small_lake, tmp_path):
    import pyspark
    home = Path(pyspark.__file__).parent
    # SPARK_SCALA_VERSION: the worker's launcher of executors otherwise looks for a source build's folders
    env = {**os.environ, "SPARK_HOME": str(home), "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_SCALA_VERSION": "2.13"}
    launcher = [shutil.which("java"), "-Xmx512m", "-cp", f"{home}/jars/*"]
    port, procs = free_port(), []

    def start(name: str, *args: str):
        log = tmp_path / f"{name}.log"
        procs.append(subprocess.Popen([*launcher, *args], env=env, start_new_session=True,
                                      stdout=log.open("w"), stderr=subprocess.STDOUT))
        return procs[-1], log

    try:
        master, log = start("master", "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                            "--port", str(port), "--webui-port", str(free_port()))
        wait_for_port(port, master, log)
        for i in range(2):
            host = f"127.0.0.{i + 1}"   # two hosts: a speculative copy runs on another host than its original
            env = {**env, "SPARK_LOCAL_IP": host}
            start(f"worker{i}", "org.apache.spark.deploy.worker.Worker", "--host", host, "--cores", "1",
                  "--memory", "2g", "--webui-port", str(free_port()), "--work-dir", str(tmp_path / f"work{i}"),
                  f"spark://127.0.0.1:{port}")
        env["SPARK_LOCAL_IP"] = "127.0.0.1"
        on_cluster = copy_lake(small_lake, tmp_path / "cluster")
        speculation = {"spark.speculation": "true", "spark.speculation.task.duration.threshold": "500ms",
                       "spark.speculation.interval": "100ms"}
        submit = " ".join(f"--conf {k}={v}" for k, v in speculation.items()) + " pyspark-shell"
        job = subprocess.run([sys.executable, "-m", "jobs.cli", "sl-generate", "--lake", str(on_cluster),
                              "--spark-master", f"spark://127.0.0.1:{port}",
                              *flags({**SETTINGS, "base_model": f"fake:slow={SLOW_S}"})], cwd=ROOT,
                             env={**env, "PYSPARK_SUBMIT_ARGS": submit}, capture_output=True, text=True, timeout=600)
        assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-4000:]
        assert "sl-generate: prompts=5, generations=11, model_calls=7, ok=11, failed=0" in job.stdout
        # each worker started an executor for the job, and each executor ran Python tasks
        logs = {i: " ".join(p.read_text() for p in (tmp_path / f"work{i}").glob("app-*/*/stderr")) for i in range(2)}
        for i in range(2):
            assert "Running task" in logs[i], i
        # speculative copies ran (attempt 1 of a task that never failed: nothing failed in this run)
        assert re.search(r"Running task \d+\.1 in stage", logs[0] + logs[1]), "no speculative attempt ran"
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()

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
