"""`cai sql --engine spark` (Spark SQL on delta-spark) answers as the DuckDB engine does on the same lake."""
from __future__ import annotations

from decimal import Decimal

import pytest

from cai_lib.lake import spark_sql
from cai_lib.lake.sql import query as duckdb_query
from cai_lib.lake.tables import Lake
from jobs.cli import main as cai
from jobs.sl_generate import SLGenerateConfig, run
from tests.conftest import ROOT

QUERIES = [
    "SELECT kind, count(*) AS n FROM generation_events GROUP BY kind ORDER BY kind",
    "SELECT p.kind, count(*) AS n, sum(length(e.text)) AS chars FROM generation_events e "
    "JOIN prompts p ON e.prompt_id = p.prompt_id GROUP BY p.kind ORDER BY p.kind",
    "SELECT split, source_kind, count(*) AS n, max(rounds) AS r FROM sl_dataset GROUP BY split, source_kind "
    "ORDER BY split, source_kind",
    "SELECT sum(CASE WHEN is_refusal(text) THEN 1 ELSE 0 END) AS refusals, count(*) AS n FROM generation_events "
    "WHERE status = 'ok'",
    "SELECT count(*) AS n FROM quarantine",
]


@pytest.fixture
def generated(spark, small_lake):
    run(spark, SLGenerateConfig(lake=str(small_lake), backend="fake", base_model="fake", rounds=1,
                                params="/nonexistent.yaml", constitution=str(ROOT / "constitutions/default.yaml")))
    return small_lake


def plain(rows: list[dict]) -> list[dict]:
    return [{k: int(v) if isinstance(v, Decimal) else v for k, v in r.items()} for r in rows]


def test_spark_sql_gives_the_duckdb_answers(spark, generated, capsys):
    lake = Lake(generated)
    answers = [plain(spark_sql.query(spark, generated, q).to_pylist()) for q in QUERIES]
    assert answers == [plain(duckdb_query(lake, q).to_arrow_table().to_pylist()) for q in QUERIES]
    assert answers[0] == [{"kind": "critique", "n": 3}, {"kind": "helpful_response", "n": 2},
                          {"kind": "initial_response", "n": 3}, {"kind": "revision", "n": 3}]
    assert answers[4] == [{"n": 0}]   # a table not written yet reads as empty, in both SQL engines

    capsys.readouterr()
    assert cai(["sql", "--engine", "spark", "--lake", str(generated), "--format", "csv", QUERIES[0]]) == 0
    spark_csv = capsys.readouterr().out
    assert cai(["sql", "--lake", str(generated), "--format", "csv", QUERIES[0]]) == 0
    assert spark_csv == capsys.readouterr().out == "kind,n\ncritique,3\nhelpful_response,2\ninitial_response,3\nrevision,3\n"


def test_spark_sql_names_the_lake_tables_and_reads_no_raw_paths(spark, generated):
    with pytest.raises(ValueError, match="Lake tables: prompts, generation_events"):
        spark_sql.query(spark, generated, "SELECT * FROM labels")
    with pytest.raises(ValueError):
        spark_sql.query(spark, generated, f"SELECT * FROM parquet.`{generated}/prompts`")
    assert spark.conf.get("spark.sql.runSQLOnFiles") == "true"   # the session is left as it was
