"""The driver JVM's class-data-sharing archive: what each start asks for (pure), and for real, a first
session dumps the archive once its JVM has exited and the next one loads Spark's classes from it."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

from cai_lib.runtime.jvm_cache import QUIET, archive_key, cache_dir, plan


def test_a_first_start_dumps_under_its_own_pid_and_a_later_one_maps_the_archive(tmp_path):
    options, dump, final = plan(tmp_path, "k1", 4242)
    assert options == f"-XX:ArchiveClassesAtExit={tmp_path}/k1.4242.dump {QUIET}"
    assert (dump, final) == (tmp_path / "k1.4242.dump", tmp_path / "k1.jsa")
    final.write_bytes(b"x")
    assert plan(tmp_path, "k1", 4243) == (f"-XX:SharedArchiveFile={tmp_path}/k1.jsa {QUIET}", None, None)
    # another key (another JDK, Spark or jar set) does not map k1's archive
    assert plan(tmp_path, "k2", 4243)[0].startswith("-XX:ArchiveClassesAtExit=")


def test_a_dump_left_by_a_killed_run_goes_after_an_hour_and_a_fresh_one_stays(tmp_path):
    old, fresh = tmp_path / "k.1.dump", tmp_path / "k.2.dump"
    old.write_bytes(b"half"), fresh.write_bytes(b"half")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    plan(tmp_path, "k", 3)
    assert (old.exists(), fresh.exists()) == (False, True)


def test_off_and_no_java_ask_for_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("CAI_JVM_CACHE", "off")
    assert cache_dir() is None and plan(cache_dir(), "k", 1) == ("", None, None)
    monkeypatch.setenv("CAI_JVM_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    assert archive_key(None, "4.2.0", "") is None and plan(tmp_path, None, 1) == ("", None, None)
    java = tmp_path / "java"
    java.write_text("#")
    assert archive_key(str(java), "4.2.0", "") != archive_key(str(java), "4.2.0", "io.delta:delta-spark_4.2_2.13:4.4.0")


RUN = textwrap.dedent("""
    import sys
    from cai_lib.runtime.session import get_spark
    spark = get_spark("local[1]")
    assert spark.range(3).count() == 3
    print("ran")
""")


def test_the_second_session_loads_sparks_classes_from_the_first_ones_archive(tmp_path):
    env = {**os.environ, "CAI_JVM_CACHE": str(tmp_path / "jvm")}
    first = subprocess.run([sys.executable, "-c", RUN], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0 and "ran" in first.stdout, first.stderr[-2000:]
    archives = sorted(p.name for p in (tmp_path / "jvm").iterdir())
    assert len(archives) == 1 and archives[0].endswith(".jsa"), archives   # renamed once its JVM exited
    log = tmp_path / "classes.log"
    second = subprocess.run([sys.executable, "-c", RUN], capture_output=True, text=True, timeout=300,
                            env={**env, "JAVA_TOOL_OPTIONS": f"-Xlog:class+load=info:file={log}"})
    assert second.returncode == 0 and "ran" in second.stdout, second.stderr[-2000:]
    assert "[warning][cds]" not in second.stdout + second.stderr
    line = next(x for x in log.read_text().splitlines() if " org.apache.spark.SparkContext " in x)
    assert "source: shared objects file (top)" in line   # the dynamic archive's layer, not the JDK's base one
