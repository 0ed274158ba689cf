"""`cai lake restore` on the Spark plane: every file of the set-aside commits goes (Hadoop's `.crc`
checksums and checkpoints too), so the next Spark commit reads and writes the table; sl-generate
regenerates the events a restore set aside instead of trusting sl_dataset's rows; restoring a table
that is not in the lake is an error naming it.

    python -m pytest -q tests/test_restore_spark.py
"""
from __future__ import annotations

import doctest
from pathlib import Path

import pytest
from deltalake import DeltaTable

from cai_lib.lake import health
from cai_lib.lake.health import restore
from cai_lib.lake.spark_delta import SparkDeltaLake
from cai_lib.lake.tables import Lake
from jobs.sl_generate import SLGenerateConfig, run
from tests.conftest import ROOT, copy_lake

SL = dict(backend="fake", base_model="fake", rounds=2, limit=1, batch_size=2, batches_per_commit=1,
          params="/nonexistent.yaml", constitution=str(ROOT / "constitutions/default.yaml"))


def log_of(table: Path) -> Path:
    return table / "_delta_log"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:90])   # a crash mid-write, a full disk, a copy cut short


def set_aside(root: Path, name: str) -> list[str]:
    """The files restore moved under .cai-broken/<name>/<time>/, relative to that folder."""
    [folder] = (root / ".cai-broken" / name).iterdir()
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_version_of_names_the_version_of_every_delta_log_file():
    tests = doctest.DocTestFinder().find(health.version_of, "version_of")
    results = [doctest.DocTestRunner().run(t) for t in tests]
    assert (sum(r.attempted for r in results), sum(r.failed for r in results)) == (9, 0)


def test_restoring_a_table_not_in_the_lake_is_an_error_naming_it(small_lake):
    with pytest.raises(ValueError) as err:
        restore(small_lake, "label_events")
    assert str(err.value) == (f"table label_events does not exist in the lake {small_lake} (no "
                              f"{small_lake / 'label_events/_delta_log'}): there is nothing to restore. Fix: check "
                              "--lake and the table name (`cai lake check`)")
    healthy = restore(small_lake, "prompts")   # nothing to do: nothing moves
    assert (healthy.state, healthy.set_aside) == ("ok", None) and not (small_lake / ".cai-broken").exists()


@pytest.mark.parametrize("cut_checkpoint", [True, False])
def test_spark_commits_to_a_restored_table_and_both_engines_read_it(spark, small_lake, tmp_path, cut_checkpoint):
    """A Spark-written commit whose JSON and checkpoint were cut short: restore sets aside the JSON, the
    checkpoint, their Hadoop `.crc` files and the `_last_checkpoint` pointing at them; a `.crc` left
    behind would fail every Spark read after the next commit of that version (ChecksumException).
    With the checkpoint intact, delta-rs opens the table from it, but Spark reads the cut JSON: the
    table is broken all the same, and restored the same way."""
    rows = Lake(small_lake).read("prompts").sort_by("prompt_id")
    lake = SparkDeltaLake(spark, tmp_path / "spark-lake")
    path = lake.path("prompts")
    spark.createDataFrame(rows.slice(0, 1)).write.format("delta").save(path)                      # version 0
    spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ('delta.checkpointInterval' = '2')")  # 1
    spark.createDataFrame(rows.slice(1, 1)).write.format("delta").mode("append").save(path)       # 2, checkpointed
    log = log_of(Path(path))
    truncate(log / "00000000000000000002.json")
    if cut_checkpoint:
        truncate(log / "00000000000000000002.checkpoint.parquet")
    assert health.check_table(tmp_path / "spark-lake", "prompts").state == "broken"

    restored = restore(tmp_path / "spark-lake", "prompts")
    assert (restored.version, restored.rows) == (1, 1)
    lake.append_df("prompts", spark.createDataFrame(rows.slice(1, 4)))   # version 2 again, checkpointed again
    expected = sorted(rows["prompt_id"].to_pylist())
    assert sorted(r[0] for r in spark.read.format("delta").load(path).select("prompt_id").collect()) == expected
    assert sorted(DeltaTable(path).to_pyarrow_table(columns=["prompt_id"])["prompt_id"].to_pylist()) == expected
    assert DeltaTable(path).version() == lake.version("prompts") == 2
    assert set_aside(tmp_path / "spark-lake", "prompts") == [
        ".00000000000000000002.checkpoint.parquet.crc", ".00000000000000000002.json.crc", "._last_checkpoint.crc",
        "00000000000000000002.checkpoint.parquet", "00000000000000000002.json", "_last_checkpoint"]


def sl_rows(lake: Path) -> list[tuple]:
    table = Lake(lake).read("sl_dataset", columns=["prompt_id", "final_event_id", "response"])
    return sorted(zip(*(table[c].to_pylist() for c in table.column_names)))


def event_ids(lake: Path) -> list[str]:
    return sorted(Lake(lake).read("generation_events", columns=["event_id"])["event_id"].to_pylist())


def test_sl_generate_regenerates_the_events_a_restore_set_aside(spark, small_lake, tmp_path):
    """sl_dataset's rows stand only while their final events exist: after the newest generation_events
    commit is set aside, a rerun makes those generations again and ends where the uninterrupted run did."""
    lake = copy_lake(small_lake, tmp_path / "spark")
    first = run(spark, SLGenerateConfig(lake=str(lake), **SL))
    # --limit 1: one red-team prompt (answer + 2 x (critique, revision)) and one helpful answer, a commit a wave
    assert (first["generations"], first["sl_dataset_rows"]) == (6, 2)
    uninterrupted = copy_lake(lake, tmp_path / "uninterrupted")
    newest = max(log_of(lake / "generation_events").glob("*.json"))
    truncate(newest)   # the commit of the final revision
    restored = restore(lake, "generation_events")
    assert (restored.version, restored.rows) == (int(newest.stem) - 1, 5)

    again = run(spark, SLGenerateConfig(lake=str(lake), **SL))
    assert (again["planned_prompts"], again["generations"], again["model_calls"], again["sl_dataset_rows"]) == (
        5, 1, 1, 2)
    assert event_ids(lake) == event_ids(uninterrupted) and sl_rows(lake) == sl_rows(uninterrupted)

    noop = run(spark, SLGenerateConfig(lake=str(lake), **SL))
    # the 3 prompts outside --limit have no row, so stay open: planned, with nothing to generate
    assert (noop["planned_prompts"], noop["model_calls"], noop["sl_dataset_rewritten"]) == (3, 0, False)
