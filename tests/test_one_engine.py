"""One writer per lake: with `lake_engine: spark` in params.yaml [common], every job that writes the lake
(ingest, the gates, the model jobs) writes it with delta-spark, and delta-rs still reads every table."""
from __future__ import annotations

import json

from deltalake import DeltaTable

from cai_lib.lake.tables import Lake
from jobs.cli import main as cai
from tests.conftest import DEMO_HELPFUL, DEMO_RED, ROOT, write_jsonl

DEFAULT = str(ROOT / "constitutions/default.yaml")


def engines(table) -> set[str]:
    """The engine of each commit of a table, by its commitInfo (delta-spark: Apache-Spark/...; delta-rs: delta-rs:...)."""
    return {h["engineInfo"].split("/")[0].split(":")[0] for h in DeltaTable(str(table)).history()}


def test_lake_engine_spark_in_common_makes_delta_spark_write_every_table(spark, tmp_path, capsys, monkeypatch):
    lake, docs = tmp_path / "lake", str(tmp_path / "docs")
    monkeypatch.chdir(tmp_path)   # `--lake lake`, relative, as params.yaml says it
    params = tmp_path / "params.yaml"
    params.write_text("common:\n  lake_engine: spark\n")
    red = write_jsonl(tmp_path / "red.jsonl", [json.loads(x) for x in DEMO_RED.read_text().splitlines()[:12:4]])
    helpful = write_jsonl(tmp_path / "helpful.jsonl", [json.loads(x) for x in DEMO_HELPFUL.read_text().splitlines()[:2]]
                          + [{"prompt": ""}])   # an empty prompt: a quarantine row
    common = ["--lake", "lake", "--params", str(params)]
    model = [*common, "--backend", "fake", "--constitution", DEFAULT, "--batch-size", "2", "--batches-per-commit", "1"]
    for src, kind in ((red, "red_team"), (helpful, "helpful")):
        assert cai(["ingest", *common, "--source", str(src), "--kind", kind, "--test-fraction", "0"]) == 0
    assert cai(["gate", "prompts", *common, "--docs-dir", docs]) == 0
    assert cai(["sl-generate", *model, "--base-model", "fake", "--rounds", "1"]) == 0
    assert cai(["sample-pairs", *model, "--policy", "fake"]) == 0
    assert cai(["label", *model, "--feedback-model", "fake"]) == 0
    capsys.readouterr()
    tables = sorted(p.name for p in lake.iterdir() if (p / "_delta_log").is_dir())
    assert tables == ["gate_events", "generation_events", "label_events", "preference_dataset", "prompts",
                      "quarantine", "sl_dataset", "work_batches"]
    assert {t: engines(lake / t) for t in tables} == {t: {"Apache-Spark"} for t in tables}
    # and delta-rs (cai sql, cai status, notebooks) reads what delta-spark wrote
    rows = {t: Lake(lake).count(t) for t in tables}
    assert {t: rows[t] for t in ("prompts", "quarantine", "gate_events", "sl_dataset", "label_events")} == {
        "prompts": 5, "quarantine": 1, "gate_events": 1, "sl_dataset": 5, "label_events": 6}
    assert Lake(lake).read("quarantine").to_pylist()[0]["stage"] == "ingest"
