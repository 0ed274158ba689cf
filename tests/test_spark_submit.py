"""The cluster entry: `spark-submit launch/cai_task.py COMMAND FLAGS` runs the same job as `cai COMMAND`
(here with --master local[1] and the fake backend), returns its exit status, and no job file can
shadow a package because the launcher's folder holds nothing else."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pytest

from cai_lib.lake.tables import Lake

ROOT = Path(__file__).resolve().parents[1]
SPARK_SUBMIT = shutil.which("spark-submit", path=str(Path(sys.executable).parent)) or shutil.which("spark-submit")


@pytest.mark.skipif(SPARK_SUBMIT is None, reason="pyspark's spark-submit is not installed")
def test_spark_submit_runs_a_job_and_passes_its_status(small_lake, tmp_path):
    assert sorted(p.name for p in (ROOT / "launch").iterdir() if p.suffix == ".py") == ["cai_task.py"]
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
           "PYTHONPATH": str(ROOT)}
    flags = ["--lake", str(small_lake), "--params", "/dev/null", "--backend", "fake", "--base-model", "fake",
             "--rounds", "1", "--batch-size", "4", "--constitution", str(ROOT / "constitutions/default.yaml")]
    from cai_lib.lake.spark_delta import DELTA_PACKAGE
    delta = ["--packages", DELTA_PACKAGE, "--conf", "spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension",
             "--conf", "spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog"]
    proc = subprocess.run([SPARK_SUBMIT, "--master", "local[1]", *delta, str(ROOT / "launch/cai_task.py"),
                           "sl-generate", *flags], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sl-generate: prompts=5, generations=11," in proc.stdout   # 3 red-team x (answer, critique, revision) + 2
    events = Lake(small_lake).read("generation_events")
    assert events.num_rows == 11 and pc.all(pc.equal(events["status"], "ok")).as_py()
    bad = subprocess.run([SPARK_SUBMIT, "--master", "local[1]", str(ROOT / "launch/cai_task.py"), "sl-generate",
                          *flags, "--limit", "0"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "flag --limit: 0 is below the minimum 1" in bad.stdout + bad.stderr   # PythonRunner merges them
