"""A Spark standalone cluster on loopback for the tests: a master on 127.0.0.1 and two workers, one on
127.0.0.1 and one on 127.0.0.2 (1 core, 2 GB each), started from pyspark's own launcher classes.

Two worker hosts: a speculative copy of a task never runs on the host of its original, and the two
ranks of a cluster-mode TorchDistributor run land on two hosts. 2 workers x 1 core = 2 task slots,
what a barrier stage of 2 tasks needs (TorchDistributor with num_processes=2)."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

WORKERS = 2
# what a driver needs to use both slots from its first job (docs/clusters.md, Standalone): both executors
# registered before the job starts (2 workers x 1 core = 2 slots, 1 core per task), as TorchDistributor's
# barrier stage of 2 tasks needs
CLUSTER_CONF = {"spark.cores.max": "2", "spark.executor.cores": "1", "spark.task.cpus": "1",
                "spark.scheduler.minRegisteredResourcesRatio": "1.0",
                "spark.scheduler.maxRegisteredResourcesWaitingTime": "120s"}


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


@dataclass
class StandaloneCluster:
    """The running cluster: its master URL, the environment to submit with, each worker's folder."""
    root: Path
    port: int = field(default_factory=free_port)
    cores: int = 1   # per worker
    procs: list = field(default_factory=list)

    @property
    def master(self) -> str:
        return f"spark://127.0.0.1:{self.port}"

    def work(self, i: int) -> Path:
        """Worker i's folder: app-<id>/<executor>/{stdout,stderr} for every application it served."""
        return self.root / f"work{i}"

    def env(self, host: str = "127.0.0.1") -> dict:
        import pyspark
        # SPARK_SCALA_VERSION: the worker's launcher of executors otherwise looks for a source build's folders
        # MLflow's URIs go: an in-process run of an earlier test exported them (mlflow.set_tracking_uri does),
        # and in a child they would read as the user's choice and win over the job's --tracking-uri
        inherited = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        return {**inherited, "SPARK_HOME": str(Path(pyspark.__file__).parent), "SPARK_LOCAL_IP": host,
                "SPARK_SCALA_VERSION": "2.13"}

    def apps(self) -> set[str]:
        """The application ids the workers have run executors for so far."""
        return {p.name for i in range(WORKERS) for p in self.work(i).glob("app-*")}

    def executor_logs(self, app: str, name: str = "stderr") -> dict[int, str]:
        """Worker i -> its executors' `name` log for application `app` ('' when it ran none)."""
        return {i: " ".join(p.read_text() for p in self.work(i).glob(f"{app}/*/{name}")) for i in range(WORKERS)}

    def _start(self, name: str, host: str, *args: str):
        home = self.env()["SPARK_HOME"]
        log = self.root / f"{name}.log"
        self.procs.append(subprocess.Popen([shutil.which("java"), "-Xmx512m", "-cp", f"{home}/jars/*", *args],
                                           env=self.env(host), start_new_session=True,
                                           stdout=log.open("w"), stderr=subprocess.STDOUT))
        return self.procs[-1], log

    def start(self) -> "StandaloneCluster":
        master, log = self._start("master", "127.0.0.1", "org.apache.spark.deploy.master.Master", "--host",
                                  "127.0.0.1", "--port", str(self.port), "--webui-port", str(free_port()))
        wait_for_port(self.port, master, log)
        for i in range(WORKERS):
            host = f"127.0.0.{i + 1}"
            self._start(f"worker{i}", host, "org.apache.spark.deploy.worker.Worker", "--host", host,
                        "--cores", str(self.cores), "--memory", "2g", "--webui-port", str(free_port()), "--work-dir", str(self.work(i)),
                        self.master)
        self.wait_for_workers(log)
        return self

    def wait_for_workers(self, log: Path, seconds: float = 90) -> None:
        """Until the master has registered every worker: a worker with cores for all of an application's
        executors would otherwise take them all when the application comes first (3-core workers do)."""
        deadline = time.time() + seconds
        while log.read_text().count("Master: Registering worker") < WORKERS:
            if time.time() > deadline:
                raise RuntimeError(f"{WORKERS} workers never registered: {log.read_text()[-2000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
