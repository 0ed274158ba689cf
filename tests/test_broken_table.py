"""One broken table never takes the CLI down. With the newest commit of generation_events truncated,
queries over the other tables still run; what needs the table fails naming it, the bad commit file
and the recovery; `cai status` and `cai lake check` show each table's health; and `cai lake restore`
reopens the last good version, keeping the broken commit aside (no history is deleted)."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from cai_lib.lake.tables import Lake
from jobs.cli import main as cai
from tests.synthetic_lake import build_clean_lake


def broken_lake(tmp_path) -> tuple[Lake, int, pa.Table]:
    lake = build_clean_lake(tmp_path / "lake")
    events = lake.read("generation_events")
    renamed = pa.array([f"{e}-again" for e in events["event_id"].to_pylist()])
    lake.insert_new("generation_events", events.set_column(events.schema.get_field_index("event_id"), "event_id",
                                                           renamed))
    good = lake.version("generation_events") - 1
    newest = sorted((Path(lake.path("generation_events")) / "_delta_log").glob("*.json"))[-1]
    newest.write_bytes(newest.read_bytes()[:90])   # a crash mid-write, a full disk, a bad copy
    return lake, good, events


def test_other_tables_keep_working_and_the_broken_one_says_how_to_recover(tmp_path, capsys):
    lake, good, _ = broken_lake(tmp_path)
    root = str(lake.root)
    assert cai(["sql", "--lake", root, "--format", "csv", "SELECT count(*) AS n FROM prompts"]) == 0
    assert capsys.readouterr().out.split() == ["n", str(lake.count("prompts"))]
    assert cai(["sql", "--lake", root, "SELECT count(*) FROM generation_events"]) == 1
    err = capsys.readouterr().err
    newest = sorted((Path(lake.path("generation_events")) / "_delta_log").glob("*.json"))[-1]
    assert f"table generation_events at {lake.path('generation_events')} cannot be read" in err
    assert str(newest) in err and f"cai lake restore generation_events --lake {root}" in err
    assert f"reopens version {good}; nothing is deleted" in err
    assert cai(["gate", "sl", "--lake", root, "--docs-dir", str(tmp_path / "docs")]) == 1   # needs the table
    assert "table generation_events" in capsys.readouterr().err
    assert cai(["status", "--lake", root]) == 1
    out = capsys.readouterr().out
    assert "prompts" in out and " ok" in out and "generation_events            -         -  BROKEN:" in out
    assert cai(["lake", "check", "--lake", root]) == 1
    assert "generation_events     BROKEN  table generation_events" in capsys.readouterr().out


def test_restore_reopens_the_last_good_version_and_keeps_the_broken_commit(tmp_path, capsys):
    lake, good, events = broken_lake(tmp_path)
    newest = sorted((Path(lake.path("generation_events")) / "_delta_log").glob("*.json"))[-1]
    broken_bytes = newest.read_bytes()
    assert cai(["lake", "restore", "generation_events", "--lake", str(lake.root)]) == 0
    assert f"generation_events: ok at version {good}, {events.num_rows} rows" in capsys.readouterr().out
    reader = Lake(lake.root)   # delta-rs: the JVM-free reader, as `cai lake check` reads
    assert reader.version("generation_events") == good
    assert sorted(reader.read("generation_events")["event_id"].to_pylist()) == sorted(events["event_id"].to_pylist())
    [kept] = (Path(lake.root) / ".cai-broken" / "generation_events").glob("*/*.json")
    assert kept.name == newest.name and kept.read_bytes() == broken_bytes
    assert cai(["lake", "check", "--lake", str(lake.root)]) == 0
    assert cai(["lake", "restore", "prompts", "--lake", str(lake.root)]) == 0   # a healthy table: nothing moves
    assert "prompts: healthy, nothing to do (version" in capsys.readouterr().out
