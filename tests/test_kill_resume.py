"""Kill -9 sl-generate mid-run, rerun it: the same events and sl_dataset as an uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pyarrow.compute as pc
import pytest

from cai_lib.lake.tables import Lake
from jobs.sl_generate import SLGenerateConfig, run
from tests.conftest import ROOT, copy_lake

SETTINGS = dict(rounds=1, batch_size=2, batches_per_commit=1, answer_max_new_tokens=24,
                critique_max_new_tokens=16, revision_max_new_tokens=24)


def flags(lake) -> list[str]:
    out = ["--lake", str(lake), "--params", "/dev/null",
           "--constitution", str(ROOT / "constitutions/default.yaml")]
    for k, v in SETTINGS.items():
        out += ["--" + k.replace("_", "-"), str(v)]
    return out


def commits(lake) -> int:
    log = lake / "generation_events" / "_delta_log"
    return len(list(log.glob("*.json"))) if log.exists() else 0


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(spark, small_lake, tmp_path):
    """The real model. The driver dies while its executors append chunk by chunk."""
    killed = copy_lake(small_lake, tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "sl-generate", *flags(killed)],
                            cwd=ROOT,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while commits(killed) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # version 0 creates the table, version 1 is the first committed batch
    os.killpg(proc.pid, signal.SIGKILL)  # the job and its Spark JVM and Python workers
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    partial = Lake(killed).read("generation_events").num_rows
    assert 0 < partial < 11 and not Lake(killed).exists("sl_dataset")  # it really died mid-run

    cfg = dict(params="/nonexistent.yaml", constitution=str(ROOT / "constitutions/default.yaml"), **SETTINGS)
    resumed = run(spark, SLGenerateConfig(lake=str(killed), **cfg))
    assert resumed["generations"] == 11 - partial  # only the missing ids went to the model
    run(spark, SLGenerateConfig(lake=str(small_lake), **cfg))  # the uninterrupted reference

    a, b = Lake(small_lake).read("generation_events"), Lake(killed).read("generation_events")
    assert b.num_rows == len(set(b["event_id"].to_pylist())) == 11  # no duplicates
    assert set(a["event_id"].to_pylist()) == set(b["event_id"].to_pylist())
    text = lambda t: dict(zip(t["event_id"].to_pylist(), t["text"].to_pylist()))  # noqa: E731
    assert text(a) == text(b)  # the same batches were cut, so the same texts came out
    assert Lake(small_lake).read("sl_dataset").equals(Lake(killed).read("sl_dataset"))
    assert pc.all(pc.equal(b["status"], "ok")).as_py()
