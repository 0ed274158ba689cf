"""The `cai` command line: sql (table, csv), status, constitution validate/import, help."""
from __future__ import annotations

import csv
import io

import pytest

from jobs.cli import main as cai
from tests.conftest import ROOT, SHARED


def test_sql_table_and_csv(small_lake, capsys):
    assert cai(["sql", "--lake", str(small_lake), "SELECT kind, count(*) AS n FROM prompts GROUP BY kind ORDER BY kind"]) == 0
    out = capsys.readouterr().out
    assert "helpful" in out and "red_team" in out and "│" in out
    assert cai(["sql", "--lake", str(small_lake), "--format", "csv",
                "SELECT kind, count(*) AS n FROM prompts GROUP BY kind ORDER BY kind"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert rows == [{"kind": "helpful", "n": "2"}, {"kind": "red_team", "n": "3"}]


def test_sql_unknown_table_lists_the_tables(small_lake, capsys):
    assert cai(["sql", "--lake", str(small_lake), "SELECT * FROM labels"]) == 1
    err = capsys.readouterr().err
    assert "label_events" in err and "prompts" in err and "Traceback" not in err
    # a table no job has written yet reads as empty, with its columns
    assert cai(["sql", "--lake", str(small_lake), "--format", "csv", "SELECT count(*) AS n FROM quarantine"]) == 0
    assert capsys.readouterr().out.splitlines() == ["n", "0"]
    assert cai(["sql", "--lake", str(small_lake), "SELECT nope FROM prompts"]) == 1
    assert 'Referenced column "nope" not found' in capsys.readouterr().err


def test_status_lists_versions_and_rows(small_lake, capsys):
    assert cai(["status", "--lake", str(small_lake)]) == 0
    out = capsys.readouterr().out
    assert "prompts" in out and "5" in out


def test_constitution_validate_exit_codes(tmp_path, capsys):
    files = [str(p) for p in sorted((ROOT / "constitutions").glob("*.yaml"))]
    assert cai(["constitution", "validate", *files]) == 0
    assert capsys.readouterr().out.count("ok ") == 3
    bad = tmp_path / "dup.yaml"
    bad.write_text((ROOT / "constitutions/default.yaml").read_text().replace("id: cai-default", "id: cai-default\nextra: 1"))
    assert cai(["constitution", "validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "dup.yaml" in err and "extra" in err


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data is not beside the checkout")
def test_constitution_import_from_the_paper_json(tmp_path, capsys):
    src = SHARED / "constitutional-harmlessness-paper/prompts"
    out = tmp_path / "paper.yaml"
    assert cai(["constitution", "import", "--critiques", str(src / "CritiqueRevisionInstructions.json"),
                "--comparisons", str(src / "RLMadisonInstructions.json"), "-o", str(out)]) == 0
    assert cai(["constitution", "validate", str(out)]) == 0
    assert "critique_revision=16 comparison=16" in capsys.readouterr().out


def test_help_and_unknown_command(capsys):
    assert cai(["--help"]) == 0 and "sl-generate" in capsys.readouterr().out
    assert cai(["nope"]) == 2 and "unknown command" in capsys.readouterr().err


def test_sql_filters_on_string_columns(tmp_path, capsys):
    """A WHERE on a string literal used to fail inside the Arrow scan (string vs string_view)."""
    from synthetic_lake import build_clean_lake
    lake = build_clean_lake(tmp_path / "lake")
    assert cai(["sql", "--lake", str(lake.root), "--format", "csv",
                "SELECT count(*) AS n FROM generation_events WHERE kind = 'revision' AND status = 'ok'"]) == 0
    assert capsys.readouterr().out.splitlines() == ["n", "24"]
    assert cai(["sql", "--lake", str(lake.root), "--format", "csv",
                "SELECT count(*) AS n FROM prompts WHERE category = 'fraud'"]) == 0
    assert capsys.readouterr().out.splitlines() == ["n", "6"]


def test_sql_counts_refusals_per_category(tmp_path, capsys):
    import pyarrow as pa
    from synthetic_lake import build_clean_lake

    from schemas import SL_DATASET
    lake = build_clean_lake(tmp_path / "lake")
    rows = lake.read("sl_dataset").to_pylist()
    fraud = [r for r in rows if r["category"] == "fraud"]
    fraud[0]["response"] = "I'm sorry, but I can't help with that."
    lake.replace("sl_dataset", pa.Table.from_pylist(rows, schema=SL_DATASET))
    assert cai(["sql", "--lake", str(lake.root), "--format", "csv",
                "SELECT category, round(avg(is_refusal(response)::INT), 3) AS refusal_rate FROM sl_dataset "
                "WHERE category IN ('fraud', 'privacy') GROUP BY 1 ORDER BY 1"]) == 0
    assert capsys.readouterr().out.splitlines() == ["category,refusal_rate", "fraud,0.167", "privacy,0.0"]
