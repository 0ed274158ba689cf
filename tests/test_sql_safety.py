"""`cai sql` never crashes or hangs, and stays in the lake.

An error raised while rows stream (a failed CAST over a table of many files) used to end the
process with a segfault (rc 139) or a hang at 0% CPU; now it is one error line and exit 1, every
time. By default a query sees the lake's tables only: COPY ... TO, ATTACH, read_csv, read_text and
glob are refused and write nothing; --allow-files gives a trusted shell the file functions back.
"""
from __future__ import annotations

import subprocess
import sys

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from cai_lib.lake.sql import query
from cai_lib.lake.tables import Lake
from tests.synthetic_lake import build_clean_lake

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def many_file_lake(tmp_path_factory) -> Lake:
    """Written by delta-spark; read, as `cai sql` reads it, with delta-rs."""
    lake = build_clean_lake(tmp_path_factory.mktemp("sql") / "lake")
    events = lake.read("generation_events")
    ids = events.schema.get_field_index("event_id")
    copies = pa.concat_tables([events.set_column(ids, "event_id", pa.array([f"{e}-{i}" for e in
                                                                            events["event_id"].to_pylist()]))
                               for i in range(30)])
    # 31+ data files in one commit (a plain append by the lake's writer): the scan runs on several threads
    lake.spark.createDataFrame(copies).repartition(30).write.format("delta").mode("append").save(
        lake.path("generation_events"))
    assert len(DeltaTable(lake.path("generation_events")).file_uris()) >= 31
    return Lake(lake.root)


def test_an_error_while_rows_stream_is_one_line_and_exit_1_every_time(many_file_lake):
    cmd = [sys.executable, "-m", "jobs.cli", "sql", "--lake", str(many_file_lake.root),
           "SELECT CAST(text AS INTEGER) FROM generation_events"]
    for _ in range(6):
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
        assert proc.stderr.startswith("cai sql: error: Conversion Error: Could not convert string")
        assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_a_good_query_reads_the_rows_delta_rs_reads(many_file_lake):
    import pyarrow.compute as pc
    events = many_file_lake.read("generation_events")
    ok = pc.sum(pc.equal(events["status"], "ok")).as_py()
    assert ok > 0 and events.num_rows % 31 == 0
    assert query(many_file_lake, "SELECT count(*) FROM generation_events WHERE status = 'ok'").fetchall() == [(ok,)]


@pytest.mark.parametrize("sql", [
    "COPY (SELECT 1 AS x) TO '{out}/copied.csv'",
    "ATTACH '{out}/attached.db' AS other",
    "SELECT * FROM read_csv('{secret}')",
    "SELECT * FROM read_text('{secret}')",
    "SELECT * FROM glob('{out}/*')",
    "SET enable_external_access = true",
    "INSTALL httpfs",
])
def test_by_default_a_query_sees_only_the_lake(many_file_lake, tmp_path, sql):
    secret = tmp_path / "secret.csv"
    secret.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"disabled by configuration|Cannot change configuration|Permission"):
        query(many_file_lake, sql.format(out=tmp_path, secret=secret))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.csv"]   # nothing written


def test_allow_files_gives_the_file_functions_back(many_file_lake, tmp_path):
    secret = tmp_path / "secret.csv"
    secret.write_text("a,b\n1,2\n")
    assert query(many_file_lake, f"SELECT a + b AS s FROM read_csv('{secret}')", allow_files=True).fetchall() == [(3,)]
