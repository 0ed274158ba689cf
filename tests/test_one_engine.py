"""One writer per lake: every job that writes the lake (ingest, the gates, the model jobs) writes it with
delta-spark, and delta-rs still reads every table. A table another engine committed to is refused before
any model call, until `cai lake adopt` takes it over or `cai lake restore --to-version` sets the commits aside."""
from __future__ import annotations

import json

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from cai_lib.lake.tables import Lake
from cai_lib.lake.writers import ForeignWriterError, check_writers
from jobs.cli import main as cai
from tests.conftest import DEMO_HELPFUL, DEMO_RED, ROOT, write_jsonl

DEFAULT = str(ROOT / "constitutions/default.yaml")


def engines(table) -> set[str]:
    """The engine of each commit of a table, by its commitInfo (delta-spark: Apache-Spark/...; delta-rs: delta-rs:...)."""
    return {h["engineInfo"].split("/")[0].split(":")[0] for h in DeltaTable(str(table)).history()}


@pytest.fixture(scope="module")
def written(spark, tmp_path_factory):
    """A lake every writing job ran on (fake model), the way users run them."""
    tmp_path = tmp_path_factory.mktemp("one-engine")
    lake, docs = tmp_path / "lake", str(tmp_path / "docs")
    red = write_jsonl(tmp_path / "red.jsonl", [json.loads(x) for x in DEMO_RED.read_text().splitlines()[:12:4]])
    helpful = write_jsonl(tmp_path / "helpful.jsonl", [json.loads(x) for x in DEMO_HELPFUL.read_text().splitlines()[:2]]
                          + [{"prompt": ""}])   # an empty prompt: a quarantine row
    common = ["--lake", str(lake), "--params", "/dev/null"]
    model = [*common, "--backend", "fake", "--constitution", DEFAULT, "--batch-size", "2", "--batches-per-commit", "1"]
    for src, kind in ((red, "red_team"), (helpful, "helpful")):
        assert cai(["ingest", *common, "--source", str(src), "--kind", kind, "--test-fraction", "0"]) == 0
    assert cai(["gate", "prompts", *common, "--docs-dir", docs]) == 0
    assert cai(["sl-generate", *model, "--base-model", "fake", "--rounds", "1"]) == 0
    assert cai(["sample-pairs", *model, "--policy", "fake"]) == 0
    assert cai(["label", *model, "--feedback-model", "fake"]) == 0
    return lake, model


def test_delta_spark_writes_every_table_and_delta_rs_reads_them(written, capsys):
    lake, _ = written
    tables = sorted(p.name for p in lake.iterdir() if (p / "_delta_log").is_dir())
    assert tables == ["gate_events", "generation_events", "label_events", "preference_dataset", "prompts",
                      "quarantine", "sl_dataset", "work_batches"]
    assert {t: engines(lake / t) for t in tables} == {t: {"Apache-Spark"} for t in tables}
    # and delta-rs (cai sql, cai status, notebooks) reads what delta-spark wrote
    rows = {t: Lake(lake).count(t) for t in tables}
    assert {t: rows[t] for t in ("prompts", "quarantine", "gate_events", "sl_dataset", "label_events")} == {
        "prompts": 5, "quarantine": 1, "gate_events": 1, "sl_dataset": 5, "label_events": 6}
    assert Lake(lake).read("quarantine").to_pylist()[0]["stage"] == "ingest"


def test_a_table_another_engine_wrote_is_refused_before_any_model_call_until_adopted(written, capsys):
    lake, model = written
    one = Lake(lake).read("prompts").slice(0, 1)
    write_deltalake(str(lake / "prompts"), one.set_column(0, "prompt_id", pa.array(["p-by-delta-rs"])), mode="append")
    foreign = Lake(lake).version("prompts")
    before = Lake(lake).snapshot()
    capsys.readouterr()
    assert cai(["sl-generate", *model, "--base-model", "fake", "--rounds", "2"]) == 1   # round 2: new model work
    err = capsys.readouterr().err
    assert err.startswith(f"cai sl-generate: error: table prompts at {lake / 'prompts'}: commit {foreign} was written "
                          "by 'delta-rs:py-"), err
    assert (f"not by delta-spark, this lake's only writer (a second writer takes no lake lock and writes no idempotent "
            f"app ids, so exactly-once no longer holds); nothing was written. Fix: if that write was intended (a lake "
            f"from a release that wrote with delta-rs), `cai lake adopt prompts --lake {lake}` accepts the table's "
            f"commits through version {foreign} once; otherwise `cai lake restore prompts --lake {lake} --to-version "
            f"{foreign - 1}` sets the foreign commits aside") in err, err
    assert Lake(lake).snapshot() == before   # no model call, no commit anywhere
    assert cai(["gate", "prompts", "--lake", str(lake), "--params", "/dev/null", "--docs-dir", str(lake.parent)]) == 1

    assert cai(["lake", "adopt", "--lake", str(lake)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (f"prompts: commits through version {foreign} adopted; "
                                                        "delta-spark writes it from now on")
    check_writers(lake, ["prompts"])   # accepted now
    assert cai(["lake", "adopt", "--lake", str(lake)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "every table is written by delta-spark only: nothing to adopt"


def test_an_unknown_writer_is_refused_and_restore_to_version_sets_its_commit_aside(spark, tmp_path, capsys):
    from tests.lakes import writer
    from tests.test_lake import qrows
    w = writer(tmp_path / "lake")
    w.insert_new("quarantine", qrows(["a"]))            # versions 0 (create) and 1
    log = tmp_path / "lake/quarantine/_delta_log"
    (log / "00000000000000000002.json").write_text(     # a hand-written commit: no commitInfo at all
        json.dumps({"add": {"path": "x.parquet", "size": 1, "modificationTime": 0, "dataChange": False,
                            "partitionValues": {}}}) + "\n")
    with pytest.raises(ForeignWriterError, match=r"table quarantine at .*: commit 2 was written by an unknown writer "
                                                 r"\(its commit has no engineInfo\), not by delta-spark"):
        check_writers(tmp_path / "lake", ["quarantine"])
    assert cai(["lake", "restore", "quarantine", "--lake", str(tmp_path / "lake"), "--to-version", "1"]) == 0
    assert "quarantine: ok at version 1, 1 rows; the later commits are set aside in" in capsys.readouterr().out
    check_writers(tmp_path / "lake", ["quarantine"])
    assert cai(["lake", "restore", "quarantine", "--lake", str(tmp_path / "lake"), "--to-version", "5"]) == 1
    assert "--to-version 5: table quarantine has versions 0 to 1" in capsys.readouterr().err
