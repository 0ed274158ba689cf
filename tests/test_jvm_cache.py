"""The driver JVM's quick start: what each start asks for (pure), and for real, a first Delta session
dumps the class archive once its JVM has exited and remembers Ivy's jars; the next one loads Spark's
classes from the archive and resolves nothing."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

from cai_lib.runtime.jvm_cache import QUIET, archive_key, cache_dir, plan, remember_jars, resolved_jars


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


def test_resolved_jars_are_reused_only_while_every_one_is_there(tmp_path):
    a, b = tmp_path / "a.jar", tmp_path / "b.jar"
    a.write_text("a"), b.write_text("b")
    assert resolved_jars("g:a:1", tmp_path) is None
    remember_jars("g:a:1", f"file://{a},file://{b}", tmp_path)
    assert resolved_jars("g:a:1", tmp_path) == f"file://{a},file://{b}"
    assert resolved_jars("g:a:2", tmp_path) is None          # another package list resolves again
    b.unlink()
    assert resolved_jars("g:a:1", tmp_path) is None          # Ivy's folder was cleaned: resolve again
    remember_jars("g:a:1", "https://repo/x.jar", tmp_path)   # not a local file: never reused
    assert resolved_jars("g:a:1", tmp_path) is None


RUN = textwrap.dedent("""
    import sys
    from cai_lib.runtime.session import get_spark
    spark = get_spark("local[1]", delta=True)
    spark.range(3).write.format("delta").save(sys.argv[1])
    assert spark.read.format("delta").load(sys.argv[1]).count() == 3
    print("ran")
""")


def test_the_second_delta_session_maps_the_first_ones_archive_and_skips_ivy(tmp_path):
    env = {**os.environ, "CAI_JVM_CACHE": str(tmp_path / "jvm")}
    first = subprocess.run([sys.executable, "-c", RUN, str(tmp_path / "t1")], env=env, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0 and "ran" in first.stdout, first.stderr[-2000:]
    kept = sorted(p.suffix for p in (tmp_path / "jvm").iterdir())
    assert kept == [".jsa", ".json"]   # Ivy's jar list and the archive, renamed once its JVM exited (no .dump)
    assert ":: resolving dependencies ::" in first.stderr   # Ivy resolved delta-spark the first time
    log = tmp_path / "classes.log"
    second = subprocess.run([sys.executable, "-c", RUN, str(tmp_path / "t2")], capture_output=True, text=True,
                            timeout=300,
                            env={**env, "JAVA_TOOL_OPTIONS": f"-Xlog:class+load=info:file={log}"})
    assert second.returncode == 0 and "ran" in second.stdout, second.stderr[-2000:]
    assert "[warning][cds]" not in second.stdout + second.stderr
    assert ":: resolving dependencies ::" not in second.stderr   # the jars it resolved, passed as they are
    line = next(x for x in log.read_text().splitlines() if " org.apache.spark.SparkContext " in x)
    assert "source: shared objects file (top)" in line   # the dynamic archive's layer, not the JDK's base one
