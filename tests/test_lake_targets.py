"""A lake target is checked before anything is read or any model called: a file, a folder that is not
a lake, a table folder that is not Delta, a missing lake (for every command but ingest) and an
unwritable one each give one error naming the path and the fix, exit 1, and write nothing."""
from __future__ import annotations

import errno

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cai_lib.lake import tables
from jobs.cli import main as cai
from tests.conftest import DEMO_HELPFUL

FAKE = ["--params", "/dev/null", "--backend", "fake", "--base-model", "fake", "--rounds", "1"]


def files_under(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_a_file_is_not_a_lake(tmp_path, capsys):
    target = tmp_path / "lake.txt"
    target.write_text("not a lake")
    assert cai(["ingest", "--lake", str(target), "--source", str(DEMO_HELPFUL), "--kind", "helpful"]) == 1
    assert cai(["sl-generate", "--lake", str(target), *FAKE]) == 1
    err = capsys.readouterr().err
    assert err.count(f"lake {target} is a file, not a folder. Fix: point --lake") == 2
    assert target.read_text() == "not a lake"


def test_a_folder_of_other_files_is_not_adopted(tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    pq.write_table(pa.table({"x": [1]}), folder / "scores.parquet")
    assert cai(["ingest", "--lake", str(folder), "--source", str(DEMO_HELPFUL), "--kind", "helpful"]) == 1
    assert f"{folder} is not a lake: it holds ['scores.parquet'] besides lake tables" in capsys.readouterr().err
    assert files_under(folder) == ["scores.parquet"]


def test_a_table_folder_without_a_delta_log_is_refused(tmp_path, capsys):
    lake = tmp_path / "lake"
    (lake / "prompts").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["hi"]}), lake / "prompts" / "part-0.parquet")
    assert cai(["ingest", "--lake", str(lake), "--source", str(DEMO_HELPFUL), "--kind", "helpful"]) == 1
    assert f"{lake / 'prompts'} is where the prompts table belongs, but it holds files and no _delta_log" \
        in capsys.readouterr().err
    assert files_under(lake) == ["prompts", "prompts/part-0.parquet"]


@pytest.mark.parametrize("argv", [["sql", "SELECT 1"], ["status"], ["sl-generate", *FAKE], ["gate", "sl"],
                                  ["train-sl", "--params", "/dev/null"]])
def test_a_missing_lake_is_an_error_for_every_command_but_ingest(tmp_path, capsys, argv):
    missing = tmp_path / "lkae"   # a typo
    assert cai([*argv, "--lake", str(missing)]) == 1
    assert f"no lake at {missing}: the folder does not exist. Fix: check --lake" in capsys.readouterr().err
    assert not missing.exists()


def test_an_unwritable_lake_fails_before_any_model_call(small_lake, monkeypatch, capsys):
    before = files_under(small_lake)

    def read_only(*_, **__):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(tables.tempfile, "NamedTemporaryFile", read_only)   # root ignores chmod: simulate the mount
    assert cai(["sl-generate", "--lake", str(small_lake), *FAKE]) == 1
    assert f"lake {small_lake} is not writable (Read-only file system)" in capsys.readouterr().err
    assert files_under(small_lake) == before
    assert cai(["sql", "--lake", str(small_lake), "SELECT count(*) FROM prompts"]) == 0   # reading still works
