"""The lake's tables, read without a JVM: `Lake` (delta-rs) for `cai sql`, `cai status`, notebooks and the
training jobs' pinned reads, plus what the writer shares (contract checks, the folder check).

delta-spark is the lake's only writer (`cai_lib.lake.spark_delta.SparkDeltaLake`): every job writes through
it, so local, standalone-cluster and Databricks runs behave alike. Its tables stay readable here (reader 1 /
writer 2, no deletion vectors).
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from schemas import TABLES, TableSpec


class LakeTargetError(ValueError):
    """The lake folder cannot be used (not a folder, missing, not a lake, not writable); nothing was written."""


class BrokenTableError(ValueError):
    """A table that does not open; the message names the table, the bad file and the recovery."""


class CommitRaceError(ValueError):
    """Another writer kept committing to the same table first; nothing of this run was committed twice."""


class LakeError(RuntimeError):
    """A write that would break a table's contract (null key, unknown table, wrong columns)."""


def spec_of(name: str) -> TableSpec:
    try:
        return TABLES[name]
    except KeyError:
        raise LakeError(f"unknown lake table {name!r}; known tables: {', '.join(sorted(TABLES))}") from None


def read_schema(name: str, columns: list[str] | None = None) -> pa.Schema:
    """The schema a read of table `name` (those `columns`, or all) returns, whether or not the table exists."""
    spec = spec_of(name)
    return spec.schema if columns is None else pa.schema([spec.schema.field(c) for c in columns])


def conform(name: str, rows: pa.Table) -> pa.Table:
    """Select and cast `rows` to the table's schema; name the column and row of a null key."""
    spec = spec_of(name)
    missing = [f.name for f in spec.schema if f.name not in rows.column_names]
    if missing:
        raise LakeError(f"{name}: rows lack columns {missing}; expected {spec.schema.names}")
    rows = rows.select(spec.schema.names)
    for field in spec.schema:
        if not field.nullable and rows.column(field.name).null_count:
            bad = pc.index(pc.is_null(rows.column(field.name)), True).as_py()
            raise LakeError(f"{name}: column {field.name!r} is NOT NULL but row {bad} is null")
    return rows.cast(spec.schema)


class LakeBase:
    """What the reader (delta-rs, `Lake`) and the writer (delta-spark, `SparkDeltaLake`) share: each provides
    exists, version, read and count."""

    def snapshot(self, names: list[str] | None = None) -> dict[str, dict[str, int | None]]:
        """{table: {version, rows}} for pointer files and pinning inputs of a run."""
        names = names or [n for n in TABLES if self.exists(n)]
        return {n: {"version": self.version(n), "rows": self.count(n)} for n in names}


def first_of_each_key(rows: pa.Table, key: str) -> pa.Table:
    """A key twice in one source batch would be inserted twice by MERGE: keep the first."""
    keys = rows.column(key).to_pylist()
    if len(set(keys)) == len(keys):
        return rows
    seen: set = set()
    keep = [i for i, k in enumerate(keys) if not (k in seen or seen.add(k))]
    return rows.take(keep)


def added_columns(spec: TableSpec, stored: pa.Schema) -> list[pa.Field]:
    """The spec's nullable columns a stored table lacks (a NOT NULL one missing is an error)."""
    names = set(stored.names)
    missing = [f for f in spec.schema if f.name not in names]
    required = [f.name for f in missing if not f.nullable]
    if required:
        raise LakeError(f"{spec.name}: the stored table lacks required columns {required}; "
                        "it was written by an incompatible release: rebuild it or migrate it")
    return missing


MODES = (None, "read", "write", "create")
COMMIT_ATTEMPTS = 20   # concurrent writers of one table each retry a lost commit this many times


SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:/")   # s3://, abfss://, dbfs:/ (one slash), file:/...


def is_uri(root) -> bool:
    """Whether `root` names a lake by URI (a cloud or cluster location Spark opens) rather than a local path.
    Path() would fold one ("s3://b/x" -> "s3:/b/x") and resolve() would glue it under the working folder.

    >>> [is_uri(r) for r in ("s3://b/lake", "abfss://c@a.dfs.core.windows.net/l", "dbfs:/lake", "/tmp/lake",
    ...                      "lake", "runs/lake:v2", "/Volumes/main/cai/lake")]
    [True, True, True, False, False, False, False]
    """
    return SCHEME.match(str(root)) is not None


def check_lake_root(root: Path, mode: str | None) -> None:
    """Before a job reads or writes anything: is `root` a lake it can use? `read` and `write` need an
    existing lake, `create` (ingest) may start one, None checks nothing (library use). Raises
    LakeTargetError naming the path, what is wrong and the fix; writes nothing but a probe file."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode is None:
        return
    if root.exists() and not root.is_dir():
        raise LakeTargetError(f"lake {root} is a file, not a folder. Fix: point --lake (or [common] lake) at a "
                              "lake folder, or at a new path for a new lake")
    if not root.exists():
        if mode != "create":
            raise LakeTargetError(f"no lake at {root}: the folder does not exist. Fix: check --lake (or [common] "
                                  f"lake in the params file), or create the lake with `cai ingest --lake {root}`")
        return
    foreign = sorted(e.name for e in root.iterdir() if not e.name.startswith(".") and e.name not in TABLES)
    if foreign:
        raise LakeTargetError(f"{root} is not a lake: it holds {foreign[:5]} besides lake tables (a lake holds only "
                              f"the tables {', '.join(TABLES)}). Fix: point --lake at a lake folder or a new path")
    for name in TABLES:
        folder = root / name
        if folder.exists() and (not folder.is_dir() or (not (folder / "_delta_log").is_dir() and any(folder.iterdir()))):
            raise LakeTargetError(f"{folder} is where the {name} table belongs, but it holds files and no _delta_log "
                                  "(not a Delta table). Fix: move it out of the lake, or choose another lake")
    if mode in ("write", "create"):
        try:
            with tempfile.NamedTemporaryFile(dir=root, prefix=".cai-write-probe-"):
                pass
        except OSError as exc:
            raise LakeTargetError(f"lake {root} is not writable ({exc.strerror}): this job writes events there. "
                                  "Fix: make it writable, or pass --lake a writable folder") from None


def check_lake_target(root, mode: str | None) -> None:
    """check_lake_root for a local folder; a URI (s3://, abfss://, dbfs:/...) is the cluster's to check."""
    if not is_uri(root):
        check_lake_root(Path(root), mode)


class Lake(LakeBase):
    """Tables under one root folder, by name (`prompts`, `generation_events`, ...), read via delta-rs.
    `mode` checks the folder first (see check_lake_root): jobs pass it, library use need not."""

    def __init__(self, root: str | os.PathLike, mode: str | None = None):
        if is_uri(root):
            raise LakeTargetError(f"lake {root} is a URI, but delta-rs here opens local folders only (cai status, "
                                  "cai sql, notebooks). Fix: query it on the cluster with `cai sql --engine spark`, or point --lake at a "
                                  "local folder")
        self.root = Path(root)
        check_lake_root(self.root, mode)

    def __repr__(self) -> str:
        return f"Lake({str(self.root)!r})"

    def path(self, name: str) -> Path:
        spec_of(name)
        return self.root / name

    def exists(self, name: str) -> bool:
        return (self.path(name) / "_delta_log").is_dir()

    def delta_table(self, name: str, version: int | None = None) -> DeltaTable:
        """The DeltaTable, or a BrokenTableError naming the table, the bad commit and the fix."""
        try:
            return DeltaTable(str(self.path(name)), version=version)
        except Exception as exc:  # noqa: BLE001 - delta-rs raises DeltaError, OSError, ... on a broken log
            from cai_lib.lake.health import diagnose
            raise BrokenTableError(diagnose(self.path(name), name, exc).message(self.root)) from None

    def version(self, name: str) -> int | None:
        return self.delta_table(name).version() if self.exists(name) else None

    def read(self, name: str, columns: list[str] | None = None, version: int | None = None) -> pa.Table:
        """The table (or an empty one with its schema), at `version` for time travel."""
        spec, schema = spec_of(name), read_schema(name, columns)
        if not self.exists(name):
            return schema.empty_table()
        dt = self.delta_table(name, version)
        added = {f.name for f in added_columns(spec, dt.schema().to_arrow())}
        rows = dt.to_pyarrow_table(columns=[c for c in schema.names if c not in added])
        for f in schema:  # columns a newer release added read as nulls in older tables
            if f.name in added:
                rows = rows.append_column(f, pa.nulls(rows.num_rows, f.type))
        return rows.select(schema.names).cast(schema)

    def count(self, name: str) -> int:
        if not self.exists(name):
            return 0
        try:
            return self.delta_table(name).to_pyarrow_dataset().count_rows()
        except BrokenTableError:
            raise
        except Exception as exc:  # noqa: BLE001 - the log opens but a data file is gone or corrupt
            from cai_lib.lake.health import diagnose
            raise BrokenTableError(diagnose(self.path(name), name, exc).message(self.root)) from None
