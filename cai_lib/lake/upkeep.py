"""Lake upkeep (`cai lake optimize`): compact small files, checkpoint the log, and vacuum files no
version needs any more, except the versions something pins.

Pinned versions are the ones a gate verdict judged (`gate_events.input_versions`) and the ones a
registered model was trained on (its run's Delta dataset inputs in MLflow). Vacuum keeps every file
those versions read (delta-rs `keep_versions`), whatever the retention, so time travel to them
keeps working; older unpinned versions lose their removed files after `retention_hours`. The log
itself is never cleaned here, so every version stays listed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cai_lib.lake.tables import Lake
from schemas import TABLES


@dataclass
class TableUpkeep:
    name: str
    version_before: int
    version_after: int
    files_before: int
    files_after: int
    vacuumed: int
    kept_versions: list[int] = field(default_factory=list)

    def line(self) -> str:
        """`generation_events  files 41 -> 3, vacuumed 38, version 12 -> 13, pinned versions kept: 4, 9`"""
        kept = ", ".join(map(str, self.kept_versions)) or "none"
        return (f"{self.name:<22} files {self.files_before} -> {self.files_after}, vacuumed {self.vacuumed}, "
                f"version {self.version_before} -> {self.version_after}, pinned versions kept: {kept}")


def gate_pins(lake: Lake) -> dict[str, set[int]]:
    """{table: versions} judged by any gate verdict."""
    pins: dict[str, set[int]] = {}
    if not lake.exists("gate_events"):
        return pins
    for raw in lake.read("gate_events", columns=["input_versions"])["input_versions"].to_pylist():
        for table, version in json.loads(raw or "{}").items():
            if table in TABLES and isinstance(version, int):
                pins.setdefault(table, set()).add(version)
    return pins


def registry_pins(lake: Lake) -> dict[str, set[int]]:
    """{table: versions} of this lake that registered model versions were trained on (MLflow)."""
    import mlflow
    client = mlflow.MlflowClient()
    root = Path(lake.root).resolve()
    pins: dict[str, set[int]] = {}
    for mv in client.search_model_versions(max_results=10_000):
        if not mv.run_id:
            continue
        for d in client.get_run(mv.run_id).inputs.dataset_inputs:
            src = json.loads(d.dataset.source or "{}")
            path, version = src.get("path"), src.get("delta_table_version")
            if path and version is not None and Path(path).resolve().parent == root and Path(path).name in TABLES:
                pins.setdefault(Path(path).name, set()).add(int(version))
    return pins


def optimize(lake: Lake, pins: dict[str, set[int]], retention_hours: int = 168,
             dry_run: bool = False) -> list[TableUpkeep]:
    """Compact, checkpoint and vacuum each existing table; `pins` versions keep their files."""
    out = []
    for name in TABLES:
        if not lake.exists(name):
            continue
        dt = lake.delta_table(name)
        before, files_before = dt.version(), len(dt.file_uris())
        if not dry_run:
            dt.optimize.compact()
            dt = lake.delta_table(name)
            dt.create_checkpoint()
        kept = sorted(v for v in pins.get(name, ()) if v <= dt.version())
        removed = dt.vacuum(retention_hours=retention_hours, dry_run=dry_run, enforce_retention_duration=False,
                            keep_versions=kept or None)
        after = lake.delta_table(name)
        out.append(TableUpkeep(name, before, after.version(), files_before, len(after.file_uris()), len(removed), kept))
    return out
