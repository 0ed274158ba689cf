"""Lineage of a registered model version: its run, the tables and Delta versions it read, the gate
verdicts it relied on, its parent models and the commit it was trained at."""
from __future__ import annotations

import json

from cai_lib.lake.tables import Lake
from cai_lib.registry.models import model_version


def lineage(ref: str, lake: Lake | None = None) -> dict:
    """From a model version to its run, input tables + versions, gate verdicts, parents and commit."""
    import mlflow
    mv = model_version(ref)
    client = mlflow.MlflowClient()
    run = client.get_run(mv.run_id)
    tags = run.data.tags
    inputs = {}
    for d in run.inputs.dataset_inputs:
        src = json.loads(d.dataset.source)
        inputs[d.dataset.name.split("@")[0]] = {"version": src.get("delta_table_version"), "path": src.get("path")}
    gates = {}
    for key, value in tags.items():
        if key.startswith("gate.") and key.endswith(".verdict_id"):
            stage = key.split(".")[1]
            gates[stage] = {"verdict_id": value, "passed": tags.get(f"gate.{stage}.passed"),
                            "promotable": tags.get(f"gate.{stage}.promotable"),
                            "promotion_blockers": [x for x in tags.get(f"gate.{stage}.promotion_blockers", "").split(",") if x],
                            "waived": [x for x in tags.get(f"gate.{stage}.waived", "").split(",") if x]}
            if lake is not None and lake.exists("gate_events"):
                rows = [r for r in lake.read("gate_events").to_pylist() if r["event_id"] == value]
                if rows:
                    gates[stage].update(checks=rows[0]["n_checks"], created_at=str(rows[0]["created_at"]),
                                        input_versions=json.loads(rows[0]["input_versions"]))
    registered = client.get_registered_model(mv.name).aliases or {}
    aliases = [a for a, v in registered.items() if str(v) == str(mv.version)]
    return {"model": mv.name, "version": str(mv.version), "aliases": sorted(aliases), "run_id": mv.run_id,
            "job": tags.get("cai.job"), "git_commit": tags.get("git_commit"),
            "constitution_sha": tags.get("constitution_sha"), "base_model": tags.get("base_model"),
            "parents": {k.removeprefix("parent."): v for k, v in tags.items() if k.startswith("parent.")},
            "inputs": inputs, "gates": gates,
            "metrics": {k: round(v, 6) for k, v in sorted(run.data.metrics.items())}}
