"""A writer that loses a commit race retries: its rows are still new, so the insert-only MERGE is redone
on the new snapshot and inserts what is missing; finished model work is never thrown away. The retry rule
is a pure function (tested with a conflict that is raised on cue); the race itself is real: two threads
MERGE overlapping rows into one table through delta-spark at once."""
from __future__ import annotations

import threading

import pyarrow as pa
import pytest

from cai_lib.lake import spark_delta
from cai_lib.lake.spark_delta import retrying
from cai_lib.lake.tables import CommitRaceError, Lake
from tests.lakes import writer
from tests.test_lake import qrows


def conflicts(n: int, name: str = "ConcurrentAppendException"):
    """A commit that loses `n` races (Delta's conflict, as py4j surfaces it), then returns 7."""
    calls = []

    def commit():
        calls.append(1)
        if len(calls) <= n:
            raise RuntimeError(f"[DELTA_CONCURRENT_APPEND] io.delta.exceptions.{name}: Files were added ...")
        return 7
    return commit, calls


def test_a_lost_race_is_retried_until_it_commits(monkeypatch):
    monkeypatch.setattr(spark_delta.time, "sleep", lambda s: None)
    commit, calls = conflicts(2)
    assert retrying("generation_events", "/l/generation_events", commit) == 7 and len(calls) == 3
    other, calls = conflicts(1, "MetadataChangedException")
    assert retrying("prompts", "/l/prompts", other) == 7 and len(calls) == 2


def test_a_writer_that_keeps_losing_stops_with_a_message_naming_the_table(monkeypatch):
    monkeypatch.setattr(spark_delta.time, "sleep", lambda s: None)
    monkeypatch.setattr(spark_delta, "COMMIT_ATTEMPTS", 3)
    commit, calls = conflicts(10**6)
    with pytest.raises(CommitRaceError, match=r"generation_events: lost the commit race 3 times in a row to another "
                                              r"writer of /l/generation_events \(ConcurrentAppendException\)\. Fix: let "
                                              r"the other run finish, then rerun this job"):
        retrying("generation_events", "/l/generation_events", commit)
    assert len(calls) == 3


def test_another_error_is_not_retried():
    calls = []

    def commit():
        calls.append(1)
        raise RuntimeError("[DELTA_NOT_NULL_CONSTRAINT_VIOLATED] ...")
    with pytest.raises(RuntimeError, match="NOT_NULL"):
        retrying("prompts", "/l/prompts", commit)
    assert len(calls) == 1


def test_two_writers_at_once_land_every_row_once_and_count_their_own_inserts(spark, tmp_path):
    lake = writer(tmp_path)
    lake.insert_new("quarantine", qrows(["seed"]))
    mine = {"a": [f"a{i}" for i in range(6)] + [f"s{i}" for i in range(4)],
            "b": [f"b{i}" for i in range(6)] + [f"s{i}" for i in range(4)]}   # 4 shared ids
    inserted, errors = {}, []

    def write(tag):
        try:
            inserted[tag] = sum(writer(tmp_path).insert_new("quarantine", qrows(ids)) for ids in
                                (mine[tag][:5], mine[tag][5:]))
        except Exception as exc:   # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=write, args=(t,)) for t in mine]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    ids = Lake(tmp_path).read("quarantine")["event_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 1 + 6 + 6 + 4
    assert inserted["a"] + inserted["b"] == 16   # each shared id counted by the one writer that inserted it


def test_a_writer_that_loses_the_race_to_create_a_table_takes_the_winners(spark, tmp_path):
    """The loser of two creates can find the winner's folder without its version 0 (Delta refuses the create
    as DELTA_CREATE_TABLE_WITH_NON_EMPTY_LOCATION): it waits for the winner's table, and a folder that never
    becomes a table is still an error."""
    path = tmp_path / "quarantine"
    path.mkdir()
    (path / "part-in-flight.parquet").write_bytes(b"")          # the winner's first file, before its commit
    winner = threading.Timer(1.0, lambda: spark.createDataFrame(qrows(["w"])).write.format("delta")
                             .mode("append").save(str(path)))
    winner.start()
    writer(tmp_path).table("quarantine")
    winner.join()
    assert Lake(tmp_path).read("quarantine")["event_id"].to_pylist() == ["w"]

    junk = writer(tmp_path / "other")
    (tmp_path / "other" / "prompts").mkdir(parents=True)
    (tmp_path / "other" / "prompts" / "notes.txt").write_text("not a table")
    junk._appears = lambda name, wait_s=0.5: type(junk)._appears(junk, name, wait_s)
    with pytest.raises(Exception, match="other/prompts` is not a Delta table"):
        junk.table("prompts")
