"""`cai lake optimize`: small files compacted, unpinned removed files vacuumed, and every version a gate
verdict or a registered model pins still readable by time travel."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from cai_lib.lake.tables import Lake
from cai_lib.lake.upkeep import gate_pins, registry_pins
from jobs.cli import main as cai
from schemas import GATE_EVENTS
from tests.test_lake import qrows
from tests.test_one_engine import engines


def verdict(pins: dict) -> pa.Table:
    """A gate_events row judging `pins` (table -> version); the other fields are filler."""
    row = {f.name: None for f in GATE_EVENTS}
    row.update(event_id="g1", kind="gate_verdict", stage="prompts", passed=True, n_checks=1, n_failed=0,
               failed_checks=[], failures="[]", n_quarantined=0, suite_sha="s", input_versions=json.dumps(pins),
               job_run_id="j", created_at=datetime.now(timezone.utc))
    return pa.Table.from_pylist([{k: row.get(k) for k in GATE_EVENTS.names}], schema=GATE_EVENTS)


def vacuum_now(root, spark, hours: int = 0) -> None:
    """Let the test vacuum files seconds old: each table's own floor (delta.deletedFileRetentionDuration,
    which optimize refuses to go below) set to `hours`, in one more commit by the lake's writer.
    (At 0 h Delta also drops the tombstones from its state at once, so a pin needs a floor above 0.)"""
    prop = ("delta.deletedFileRetentionDuration", f"interval {hours} hours")
    for table in sorted(p for p in root.iterdir() if (p / "_delta_log").is_dir()):
        spark.sql(f"ALTER TABLE delta.`{table}` SET TBLPROPERTIES ('{prop[0]}' = '{prop[1]}')")


def test_a_registered_models_versions_are_pinned_and_the_cli_keeps_them(spark, tmp_path, capsys):
    import mlflow
    from cai_lib.registry.tracking import log_lake_inputs
    lake = spark_written(spark, tmp_path / "lake", 4)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # this store alone: an earlier test (test_serving) left its registry URI and active experiment set
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.set_experiment("upkeep")
    with mlflow.start_run() as run:
        log_lake_inputs(Lake(tmp_path / "lake"), ["quarantine"])     # trained on quarantine version 4
    client = mlflow.MlflowClient()
    client.create_registered_model("cai-test")
    client.create_model_version("cai-test", source=str(tmp_path), run_id=run.info.run_id)
    for i in range(4, 7):
        lake.insert_new("quarantine", qrows([f"q{i}"]))
    assert registry_pins(Lake(tmp_path / "lake")) == {"quarantine": {4}}
    vacuum_now(tmp_path / "lake", spark, hours=1)

    assert cai(["lake", "optimize", "--lake", str(lake.root), "--tracking-uri", uri, "--retention-hours", "1"]) == 0
    out = capsys.readouterr().out
    assert "quarantine             files 7 -> 1, vacuumed 0, version 8 -> " in out, out
    assert "pinned versions kept: 4 (delta-spark, retention 2 h)" in out, out
    assert DeltaTable(str(lake.path("quarantine")), version=4).to_pyarrow_table().num_rows == 4


def no_registry(tmp_path) -> list[str]:   # a registry that does not exist: gate pins only
    return ["--tracking-uri", f"sqlite:///{tmp_path}/absent.db"]


def spark_written(spark, root, n: int):
    """A lake whose quarantine table delta-spark created (version 0) and appended to n times, one file each."""
    from cai_lib.lake.spark_delta import SparkDeltaLake
    lake = SparkDeltaLake(spark, root)
    lake.table("quarantine")
    for i in range(n):
        lake.insert_new("quarantine", qrows([f"q{i}"]))
    return lake


def test_optimize_compacts_through_delta_spark_and_the_pinned_version_stays_readable(spark, tmp_path, capsys):
    root = tmp_path / "lake"
    spark_written(spark, root, 5).insert_new("gate_events", verdict({"quarantine": 3}))
    assert gate_pins(Lake(root)) == {"quarantine": {3}}
    vacuum_now(root, spark, hours=1)

    assert cai(["lake", "optimize", "--lake", str(root), "--retention-hours", "1", *no_registry(tmp_path)]) == 0
    out = capsys.readouterr().out
    # compacted by delta-spark; vacuum's retention reaches back past version 3 (seconds old, plus an hour), so its files stay
    assert "quarantine             files 5 -> 1, vacuumed 0, version 6 -> " in out, out
    assert "pinned versions kept: 3 (delta-spark, retention 2 h)" in out, out
    assert engines(root / "quarantine") == {"Apache-Spark"}   # no commit by delta-rs
    assert sorted(DeltaTable(str(root / "quarantine"), version=3).to_pyarrow_table()["event_id"].to_pylist()) == [
        "q0", "q1", "q2"]
    assert sorted(Lake(root).read("quarantine")["event_id"].to_pylist()) == [f"q{i}" for i in range(5)]


def test_an_unpinned_delta_spark_table_loses_the_files_compaction_removed(spark, tmp_path, capsys):
    root = tmp_path / "lake"
    spark_written(spark, root, 5)
    vacuum_now(root, spark)
    assert cai(["lake", "optimize", "--lake", str(root), "--retention-hours", "0", *no_registry(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "quarantine             files 5 -> 1, vacuumed 5, " in out, out
    assert "kept: none (delta-spark, retention 0 h)" in out, out
    assert engines(root / "quarantine") == {"Apache-Spark"}
    assert sorted(Lake(root).read("quarantine")["event_id"].to_pylist()) == [f"q{i}" for i in range(5)]
    with pytest.raises(Exception):               # version 3's small files are gone, as vacuum should
        DeltaTable(str(root / "quarantine"), version=3).to_pyarrow_table()


def test_a_retention_below_the_tables_floor_is_refused_and_so_is_optimize_beside_a_running_job(spark, tmp_path,
                                                                                                 capsys):
    """Delta's retention check stays on: --retention-hours 0 is refused (the default floor is Delta's 7 days),
    before any work; and while a job holds its lake lock, optimize refuses naming it (it does not wait)."""
    from cai_lib.lake.locks import job_lock
    lake = spark_written(spark, tmp_path / "lake", 3)
    assert cai(["lake", "optimize", "--lake", str(lake.root), "--retention-hours", "0", *no_registry(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert (f"--retention-hours 0 is below the 168 h that table quarantine of lake {lake.root} keeps removed files (its "
            "delta.deletedFileRetentionDuration, 'interval 7 days'): a vacuum with less could delete files a running "
            "job still writes or reads. Fix: pass --retention-hours 168 or more") in err, err
    assert DeltaTable(str(lake.path("quarantine"))).version() == 3   # nothing compacted
    with job_lock(lake.root, "label", "run-9"):
        assert cai(["lake", "optimize", "--lake", str(lake.root), *no_registry(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"another `cai label` is writing lake {lake.root}: job run run-9 (pid " in err, err
    assert "(`cai lake optimize` beside a running job could remove files its appends are writing)" in err, err
    assert DeltaTable(str(lake.path("quarantine"))).version() == 3
    assert cai(["lake", "optimize", "--lake", str(lake.root), *no_registry(tmp_path)]) == 0   # once it has finished
    ops = [h["operation"] for h in DeltaTable(str(lake.path("quarantine"))).history(3)]
    assert ops == ["VACUUM END", "VACUUM START", "OPTIMIZE"]   # versions 4-6: delta-spark logs its vacuum
