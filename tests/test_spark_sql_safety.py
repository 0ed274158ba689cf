"""`cai sql --engine spark` is read-only, and a broken table never hides the healthy ones (issue 31).

On a small lake written by delta-spark: every statement that writes, runs a command or reaches a path
is refused with one line before it runs, and the lake (each table's Delta version and row count, every
file under the test's folder) is unchanged; queries give exactly the rows delta-rs reads.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from deltalake import DeltaTable

from cai_lib.lake import spark_sql
from cai_lib.lake.tables import Lake
from jobs.cli import main as cai
from tests.conftest import ROOT
from tests.synthetic_lake import build_clean_lake

ONLY = "the Spark engine only runs queries over the lake's tables"
WRITTEN = ("prompts", "generation_events", "sl_dataset", "preference_dataset")


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory) -> Path:
    """36 prompts and their events, sl_dataset (in two commits) and preference_dataset, written by delta-spark."""
    base = tmp_path_factory.mktemp("spark_sql_safety")
    source = build_clean_lake(base / "source")
    for name in WRITTEN:
        rows = source.read(name)
        for part in (rows.slice(0, 10), rows.slice(10)) if name == "sl_dataset" else (rows,):
            spark.createDataFrame(part).write.format("delta").mode("append").save(str(base / "lake" / name))
    shutil.rmtree(base / "source")
    return base / "lake"


def state(lake: Path) -> tuple[dict, list]:
    """Each table's (Delta version, rows) by delta-rs, and every file (path, size, mtime) beside the lake."""
    tables = {t: (DeltaTable(str(lake / t)).version(), DeltaTable(str(lake / t)).to_pyarrow_dataset().count_rows())
              for t in WRITTEN}
    files = sorted((str(f.relative_to(lake.parent)), f.stat().st_size, f.stat().st_mtime_ns)
                   for f in lake.parent.rglob("*"))
    return tables, files


HOSTILE = [
    "DELETE FROM sl_dataset WHERE true",
    "UPDATE preference_dataset SET target = 1.0 WHERE true",
    "MERGE INTO sl_dataset t USING prompts s ON t.prompt_id = s.prompt_id WHEN MATCHED THEN DELETE",
    "INSERT INTO prompts SELECT * FROM prompts",
    "INSERT OVERWRITE prompts SELECT * FROM prompts",
    "INSERT OVERWRITE DIRECTORY '{lake}/generation_events' USING parquet SELECT 1 AS x",
    "INSERT OVERWRITE DIRECTORY '{out}' USING parquet SELECT 1 AS x",
    "CREATE TABLE copied USING delta LOCATION '{out}' AS SELECT * FROM prompts",
    "CREATE TABLE t (a INT) USING delta LOCATION '{out}'",
    "CREATE OR REPLACE TEMP VIEW prompts AS SELECT 1 AS a",
    "DROP TABLE prompts",
    "DROP VIEW prompts",
    "ALTER TABLE delta.`{lake}/prompts` ADD COLUMNS (b INT)",
    "TRUNCATE TABLE sl_dataset",
    "VACUUM delta.`{lake}/prompts` RETAIN 0 HOURS",
    "OPTIMIZE delta.`{lake}/generation_events`",
    "RESTORE TABLE delta.`{lake}/sl_dataset` TO VERSION AS OF 0",
    "CONVERT TO DELTA parquet.`{out}`",
    "DESCRIBE HISTORY delta.`{lake}/prompts`",
    "SET spark.sql.runSQLOnFiles=true",
    "CACHE TABLE prompts",
    "ADD JAR '{out}.jar'",
    "EXECUTE IMMEDIATE 'DELETE FROM sl_dataset'",
    "SELECT * FROM delta.`{lake}/prompts`",
    "SELECT * FROM parquet.`{lake}/prompts`",
    "SELECT * FROM IDENTIFIER('delta.`{lake}/prompts`')",
    "SELECT * FROM read_files('file:{lake}/prompts')",
    "SELECT * FROM prompts WITH ('path' = '{lake}/sl_dataset')",
    "SELECT reflect('java.lang.System', 'getProperty', 'user.home')",
    "SELECT count(*) FROM prompts WHERE text IN (SELECT java_method('java.lang.System', 'getenv', 'HOME'))",
    "SELECT * FROM prompts LATERAL VIEW try_reflect('java.lang.System', 'getenv', 'HOME') t AS x",
    "SELECT * FROM prompts WHERE EXISTS (SELECT 1 FROM sl_dataset WHERE prompt_id = "
    "(SELECT try_reflect('java.lang.System', 'getenv', 'HOME')))",
    "WITH a AS (SELECT * FROM delta.`{lake}/sl_dataset`) SELECT count(*) FROM a",
    "SELECT TRANSFORM(prompt_id) USING 'touch {out}' FROM prompts",
    "SELECT * FROM labels",
]


@pytest.mark.parametrize("sql", HOSTILE)
def test_a_statement_that_is_not_a_lake_query_is_refused_before_it_runs(spark, lake, sql):
    before = state(lake)
    with pytest.raises(ValueError, match=ONLY) as refused:
        spark_sql.query(spark, lake, sql.format(lake=lake, out=lake.parent / "out"))
    assert "\n" not in str(refused.value)
    assert state(lake) == before
    assert spark.conf.get("spark.sql.runSQLOnFiles") == "true"


def test_two_statements_are_a_parse_error_and_run_neither(spark, lake):
    before = state(lake)
    with pytest.raises(ValueError, match=r"^\[PARSE_SYNTAX_ERROR\]"):
        spark_sql.query(spark, lake, "SELECT 1; DELETE FROM sl_dataset WHERE true")
    assert state(lake) == before


def test_queries_give_the_rows_delta_rs_reads(spark, lake):
    read = Lake(lake)
    prompts = sorted(read.read("prompts").to_pylist(), key=lambda r: r["prompt_id"])
    category = {p["prompt_id"]: p["category"] for p in prompts}
    sl = sorted(read.read("sl_dataset").to_pylist(), key=lambda r: r["prompt_id"])
    pairs = sorted({r["prompt_id"] for r in read.read("preference_dataset").to_pylist()})

    def ask(sql):
        return spark_sql.query(spark, lake, sql).to_pylist()
    assert ask("SELECT prompt_id, kind, text FROM prompts ORDER BY prompt_id") == [
        {k: p[k] for k in ("prompt_id", "kind", "text")} for p in prompts]
    assert ask("WITH red AS (SELECT prompt_id FROM prompts WHERE kind = 'red_team') SELECT count(*) AS n FROM red") \
        == [{"n": 24}]
    assert ask("SELECT s.prompt_id, s.response, p.category FROM sl_dataset s JOIN prompts p "
               "ON s.prompt_id = p.prompt_id ORDER BY s.prompt_id") == [
        {"prompt_id": r["prompt_id"], "response": r["response"], "category": category[r["prompt_id"]]} for r in sl]
    assert ask("SELECT prompt_id FROM prompts WHERE prompt_id IN (SELECT prompt_id FROM preference_dataset) "
               "ORDER BY prompt_id") == [{"prompt_id": p} for p in pairs]
    assert len(pairs) == 24
    assert ask("SELECT is_refusal('I can''t help with that.') AS refuses, count_if(is_refusal(text)) AS n "
               "FROM generation_events") == [{"refuses": True, "n": 0}]


def test_a_broken_table_is_left_out_and_named_when_queried(spark, lake, tmp_path, capsys):
    copy = tmp_path / "lake"
    shutil.copytree(lake, copy)
    newest = sorted((copy / "sl_dataset/_delta_log").glob("*.json"))[-1]
    newest.write_bytes(newest.read_bytes()[:40])   # a torn commit; its .crc now mismatches, as in the probe
    with pytest.raises(ValueError) as broken:
        spark_sql.query(spark, copy, "SELECT count(*) FROM sl_dataset")
    message = str(broken.value)
    assert message.startswith(f"table sl_dataset at {copy / 'sl_dataset'} cannot be read: ")
    assert f"in {newest}. Fix: `cai lake restore sl_dataset --lake {copy}`" in message and "\n" not in message

    capsys.readouterr()
    assert cai(["sql", "--engine", "spark", "--lake", str(copy), "--format", "csv",
                "SELECT kind, count(*) AS n FROM prompts GROUP BY kind ORDER BY kind"]) == 0
    assert capsys.readouterr().out == "kind,n\nhelpful,12\nred_team,24\n"
    assert cai(["sql", "--engine", "spark", "--lake", str(copy), "SELECT * FROM sl_dataset"]) == 1
    assert capsys.readouterr().err == f"cai sql: error: {message}\n"


def test_a_negative_max_rows_is_refused_before_spark_starts(lake):
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "sql", "--engine", "spark", "--max-rows", "-1",
                           "--lake", str(lake), "SELECT 1"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == "cai sql: error: --max-rows must be 0 or more (the rows --format table shows), got -1\n"
