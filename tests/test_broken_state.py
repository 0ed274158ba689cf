"""A run that breaks on the machine's state (a full disk, a read-only lake, a dead executor, a table Spark
cannot read) ends with one sentence naming the lake and the fix, exit 1; the lake stays readable and a
rerun gives what an uninterrupted run gives. The full disk is a real one: a small tmpfs (the suite runs as
root, as CI does), filled up, under the Spark plane (the one write path, what `make run` takes)."""
from __future__ import annotations

import errno
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from cai_lib.lake.health import check_table
from cai_lib.lake.tables import Lake
from tests.lakes import writer
from cai_lib.runtime.broken_state import RESUME, classify, explain
from jobs import cli
from schemas import TABLES
from tests.conftest import DEMO_RED, write_jsonl
from tests.synthetic_lake import build_clean_lake

JAVA_DISK_FULL = """org.apache.spark.SparkException: Job aborted due to stage failure: Task 0 in stage 98.0 failed 2 times
org.apache.spark.SparkException: [TASK_WRITE_FAILED] Task failed while writing rows to file:/d/lake/work_batches.
Caused by: org.apache.hadoop.fs.FSError: java.io.IOException: No space left on device"""
JAVA_WORKER_DIED = ("org.apache.spark.SparkException: Job aborted due to stage failure: Task 1 in stage 4.0 failed 2 "
                    "times, most recent failure: ... org.apache.spark.SparkException: Python worker exited "
                    "unexpectedly (crashed)")
JAVA_CHECKSUM = ("[FAILED_READ_FILE.NO_HINT] Encountered error while reading file file:/d/lake/generation_events/"
                 "_delta_log/00000000000000000006.json. org.apache.hadoop.fs.ChecksumException: Checksum error: "
                 "file:/d/lake/generation_events/_delta_log/00000000000000000006.json at 0 exp: 1 got: 2")

JAVA_FAILED_READ = ("py4j.protocol.Py4JJavaError: An error occurred while calling z:io.delta.tables.DeltaTable.isDeltaTable."
                    "\n: org.apache.spark.SparkException: [FAILED_READ_FILE.NO_HINT] Encountered error while reading "
                    "file file://{table}/_delta_log/00000000000000000001.json.  SQLSTATE: KD001\nCaused by: "
                    "com.fasterxml.jackson.core.io.JsonEOFException: Unexpected end-of-input")


class Py4JLike(Exception):
    """What pyspark raises: the Java stack is in its text."""


@pytest.mark.parametrize("exc, state", [
    (OSError(errno.ENOSPC, "No space left on device"), "disk_full"),
    (Py4JLike(JAVA_DISK_FULL), "disk_full"),
    (BaseException("Generic error: failed to write: No space left on device (os error 28)"), "disk_full"),
    (OSError(errno.EROFS, "Read-only file system"), "read_only"),
    (PermissionError(errno.EACCES, "Permission denied"), "no_permission"),
    (Py4JLike(JAVA_WORKER_DIED), "worker_died"),
    (Py4JLike(JAVA_CHECKSUM), "spark_table"),
    (Py4JLike(JAVA_FAILED_READ.format(table="/d/lake/prompts")), "spark_table"),
    (KeyError("kind"), None),                       # a bug keeps its traceback
    (RuntimeError("executor exited normally"), None),
])
def test_each_broken_state_is_recognised_and_nothing_else(exc, state):
    assert classify(exc) == state


def test_the_cause_is_found_down_the_chain_but_not_behind_from_none():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("commit failed") from inner
    except RuntimeError as outer:
        assert classify(outer) == "disk_full"
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("a different failure, said on purpose") from None
    except RuntimeError as hidden:
        assert classify(hidden) is None


def test_the_sentences_name_the_lake_or_the_table_and_the_fix():
    assert explain(Py4JLike(JAVA_CHECKSUM), "/d/lake") == (
        "table generation_events at /d/lake/generation_events has a commit whose Hadoop checksum file "
        "(_delta_log/.N.json.crc) does not match it, so Spark refuses to read it: `cai lake check --lake /d/lake` "
        f"names the bad commit, and `cai lake restore` sets it aside with its checksum (nothing is deleted); {RESUME} "
        "after that")
    assert explain(Py4JLike(JAVA_WORKER_DIED), "/d/lake").startswith(
        "a Spark executor or its Python worker died (killed, or out of memory) while the job ran on the lake /d/lake")
    assert explain(ValueError("bad prompt"), "/d/lake") is None


def test_a_table_spark_cannot_read_is_named_with_its_restore_fix(tmp_path):
    """What a Spark job raises on a truncated commit (no checksum left to catch it): the sentence is the
    table's own health message, as `cai lake check` and the DuckDB engine give it."""
    rows = build_clean_lake(tmp_path / "source").read("prompts")
    lake = writer(tmp_path / "lake")
    lake.insert_new("prompts", rows.slice(0, 2))
    lake.insert_new("prompts", rows.slice(2, 2))
    log = tmp_path / "lake/prompts/_delta_log"
    newest = sorted(log.glob("*.json"))[-1]
    newest.write_bytes(newest.read_bytes()[:90])
    health = check_table(tmp_path / "lake", "prompts")
    why = explain(Py4JLike(JAVA_FAILED_READ.format(table=tmp_path / "lake/prompts")), str(tmp_path / "lake"))
    assert health.state == "broken" and why == f"{health.message(tmp_path / 'lake')}; {RESUME} after that"
    assert f"`cai lake restore prompts --lake {tmp_path / 'lake'}`" in why


def test_the_cli_prints_one_line_and_keeps_the_traceback_behind_debug(monkeypatch, capsys):
    def broken(argv):
        raise Py4JLike(JAVA_WORKER_DIED)
    monkeypatch.setattr("jobs.tools.status_main", broken)
    assert cli.main(["status", "--lake", "/d/lake"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cai status: error: a Spark executor or its Python worker died")
    with pytest.raises(Py4JLike):
        cli.main(["--debug", "status", "--lake", "/d/lake"])


def versions(lake: Path) -> dict:
    return {name: check_table(lake, name).version for name in TABLES}


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs: a real disk that fills up."""
    disk = tmp_path / "disk"
    disk.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], capture_output=True)
    if proc.returncode:
        pytest.fail(f"this test mounts a small tmpfs and needs root, as CI runs: {proc.stderr.decode()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk: Path, leave_kib: int) -> Path:
    free = shutil.disk_usage(disk).free
    filler = disk / "filler"
    subprocess.run(["fallocate", "-l", str(free - leave_kib * 1024), str(filler)], check=True)
    return filler


def spark_ingest_and_generate(lake: Path, prompts: Path) -> list[str]:
    gen = ["sl-generate", "--lake", str(lake), "--backend", "fake", "--base-model",
           "fake", "--rounds", "1"]
    assert cli.main(["ingest", "--lake", str(lake), "--source", str(prompts),
                     "--kind", "red_team", "--test-fraction", "0"]) == 0
    return gen


def test_a_full_disk_under_the_spark_plane_is_one_sentence_and_a_rerun_matches(spark, small_disk, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "red.jsonl", [json.loads(x) for x in DEMO_RED.read_text().splitlines()[:2]])
    lake, ref = small_disk / "lake", tmp_path / "ref"
    gen = spark_ingest_and_generate(lake, prompts)
    shutil.copytree(lake, ref)
    before = versions(lake)
    filler = fill(small_disk, leave_kib=64)
    capsys.readouterr()

    assert cli.main(gen) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"cai sl-generate: error: the disk holding the lake {lake} is full (No space left on device); "
                       f"{RESUME} once space is free (`df -h {lake}` shows it; `cai lake optimize` frees old files)")
    assert not any("Exception" in line or line.startswith("\tat ") for line in err)   # no Java stack
    assert all(check_table(lake, n).state in ("ok", "absent") for n in TABLES)       # every table opens
    assert versions(lake)["prompts"] == before["prompts"]

    filler.unlink()
    assert cli.main(gen) == 0
    assert cli.main([*gen[:2], str(ref), *gen[3:]]) == 0
    got, want = Lake(lake), Lake(ref)
    assert sorted(got.read("generation_events")["event_id"].to_pylist()) == \
        sorted(want.read("generation_events")["event_id"].to_pylist())
    key = lambda t: sorted(zip(t["prompt_id"].to_pylist(), t["final_event_id"].to_pylist()))  # noqa: E731
    assert key(got.read("sl_dataset")) == key(want.read("sl_dataset")) and len(key(want.read("sl_dataset"))) == 2


def test_a_read_only_lake_is_one_sentence(small_disk, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "How do I bake bread at home?"}])
    lake = small_disk / "lake"
    args = ["ingest", "--lake", str(lake), "--source", str(prompts), "--kind", "helpful"]
    assert cli.main(args) == 0
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    more = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "How do I bake rye bread?"}])
    capsys.readouterr()
    assert cli.main([*args[:4], str(more), *args[5:]]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    # the lake's target check sees it before any write (broken_state's sentence covers a remount mid-run)
    assert err == [f"cai ingest: error: lake {lake} is not writable (Read-only file system): this job writes "
                   "events there. Fix: make it writable, or pass --lake a writable folder"]
    assert Lake(lake).read("prompts").num_rows == 1
