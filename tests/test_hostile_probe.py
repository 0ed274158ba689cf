"""The hostile-input probe of issue 31, run on the Spark path in CI: each command a careless or hostile
user might type is refused with exit 1 and one line that names the value, file or table and the fix,
and the lake is unchanged (every table's Delta version and rows, every file beside it). Values are
refused at the edge: for every case but Spark SQL's, starting Spark fails the test.

The Spark SQL statements have their own, longer table in test_spark_sql_safety.py; the cases here are
the probe's, through the CLI as a user runs them.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jobs.cli import main as cai
from tests.conftest import ROOT
from tests.synthetic_lake import build_clean_lake

WRITTEN = ("prompts", "generation_events", "sl_dataset", "preference_dataset")
FAKE = ["--backend", "fake", "--base-model", "fake"]


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory) -> Path:
    """A small lake whose tables delta-spark wrote."""
    base = tmp_path_factory.mktemp("probe")
    source = build_clean_lake(base / "source")
    for name in WRITTEN:
        spark.createDataFrame(source.read(name)).write.format("delta").save(str(base / "lake" / name))
    return base / "lake"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Params files with one bad value each, and a constitution hiding a bidi override in a critique."""
    base = tmp_path_factory.mktemp("probe-files")
    out = {}
    for name, params in {"sparky": {"common": {"backend": "sparky"}},
                         "rounds": {"sl_generate": {"rounds": -1}},
                         "top_p": {"sl_generate": {"top_p": 5}}}.items():
        out[name] = base / f"{name}.yaml"
        out[name].write_text(yaml.safe_dump(params))
    constitution = yaml.safe_load((ROOT / "constitutions/default.yaml").read_text())
    constitution["critique_revision"][0]["critique"] = "\u202e" + constitution["critique_revision"][0]["critique"]
    out["evil"] = base / "evil.yaml"
    out["evil"].write_text(yaml.safe_dump(constitution, allow_unicode=True))
    return out


def state(lake: Path) -> list[tuple]:
    """Every file beside the lake (path, size, mtime): a write anywhere shows."""
    return sorted((str(f.relative_to(lake.parent)), f.stat().st_size, f.stat().st_mtime_ns)
                  for f in lake.parent.rglob("*"))


SQL_REFUSED = "the Spark engine only runs queries over the lake's tables"
CASES = [   # (argv with {lake} / {name} of files, the message the one line starts with)
    (["sql", "--engine", "spark", "DELETE FROM sl_dataset WHERE true"], SQL_REFUSED),
    (["sql", "--engine", "spark", "UPDATE preference_dataset SET target = 1.0 WHERE true"], SQL_REFUSED),
    (["sql", "--engine", "spark", "INSERT OVERWRITE DIRECTORY '{lake}/generation_events' USING parquet SELECT 1 AS x"],
     SQL_REFUSED),
    (["sql", "--max-rows", "-1", "SELECT 1"], "--max-rows must be 0 or more"),
    (["sl-generate", *FAKE, "--temperature", "nan"], "flag --temperature: nan is not a finite number"),
    (["sl-generate", *FAKE, "--temperature", "inf"], "flag --temperature: inf is not a finite number"),
    (["sl-generate", *FAKE, "--rounds", "1000000", "--limit", "1"], "flag --rounds: 1000000 is above the maximum 16"),
    (["sl-generate", "--params", "{sparky}"], "{sparky} [common] backend: 'sparky' is not one of 'transformers', 'vllm', 'fake'"),
    (["sl-generate", "--params", "{rounds}"], "{rounds} [sl_generate] rounds: -1 is below the minimum 1"),
    (["sl-generate", "--params", "{top_p}"], "{top_p} [sl_generate] top_p: 5.0 is above the maximum 1.0"),
    (["sl-generate", "--params", "{lake}/no-such-params.yaml"], "params file {lake}/no-such-params.yaml does not exist"),
    (["sl-generate", *FAKE, "--constitution", "{evil}"], "sl_generate config"),
    (["constitution", "validate", "{evil}"], None),
    (["label", *FAKE[:2], "--feedback-model", "fake", "--clamp-lo", "0.3"],
     "flag --clamp-lo counts only when cot is True, and here cot is False: it would be ignored"),
    (["lake", "restore", "quarantine"], "table quarantine does not exist in the lake {lake}"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=lambda x: " ".join(x)[:60] if isinstance(x, list) else None)
def test_a_hostile_command_is_one_line_and_changes_nothing(lake, files, argv, message, capsys, monkeypatch):
    names = {"lake": lake, **files}
    argv = [a.format(**names) for a in argv]
    if not (argv[0] == "sql" and "spark" in argv):   # refused at the edge: Spark must not even start
        def no_spark(*args, **kwargs):
            raise AssertionError(f"Spark started for `cai {' '.join(argv)}`")
        monkeypatch.setattr("cai_lib.runtime.session.get_spark", no_spark)
    before = state(lake)
    lake_flag = [] if argv[0] == "constitution" else ["--lake", str(lake)]
    capsys.readouterr()
    assert cai([*argv, *lake_flag]) == 1
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "Traceback" not in err, err
    if message is not None:
        assert err.startswith(f"cai {argv[0]}"), err
        assert err.split(": error: ", 1)[1].startswith(message.format(**names)), err
    else:   # constitution validate says INVALID on stdout-style line of its own
        assert "U+202E" in out + err
    assert state(lake) == before


def test_an_evil_constitution_names_the_principle_field_and_character(lake, files, capsys):
    assert cai(["constitution", "validate", str(files["evil"])]) == 1
    out, err = capsys.readouterr()
    assert (out + err).strip().endswith(
        "critique_revision[0] (id 'harmful-content'): field 'critique' holds RIGHT-TO-LEFT OVERRIDE (U+202E) at "
        "character 1, which hides or reorders what a reader sees (prompts holding one are quarantined at ingest). "
        "Fix: remove it from the file")


def test_an_empty_lake_flag_is_refused_not_read_as_the_current_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = tmp_path / "p.jsonl"
    source.write_text('{"prompt": "How do I bake bread?"}\n')
    assert cai(["ingest", "--lake", "", "--source", str(source), "--kind", "helpful"]) == 1
    assert capsys.readouterr().err.startswith("cai ingest: error: flag --lake: '' is empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]


def test_gate_help_prints_and_exits_0(capsys):
    with pytest.raises(SystemExit) as done:
        cai(["gate", "--help"])
    assert done.value.code == 0 and "95%" in capsys.readouterr().out
