"""The lake: one adapter for every table read and write.

Locally the tables are real Delta tables written with delta-rs (reader 1 / writer 2, no
deletion vectors), readable by Spark-with-Delta, Databricks, DuckDB and Polars. Event tables
are append-only and written with an insert-only MERGE on their key, so a retried or resumed
job never writes a row twice, and a write with nothing new makes no new table version.
`SparkDeltaLake` (lake_spark.py) offers the same methods where the Spark session has Delta.
"""
from __future__ import annotations

import os
import random
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError
from deltalake.schema import Field

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
    """What both adapters share: the contract checks around each engine's reads and writes.

    Subclasses provide exists, table, version, read, count, `_merge_insert(name, rows, key)`
    and `_overwrite(name, rows)`.
    """

    def insert_new(self, name: str, rows: pa.Table) -> int:
        """Insert the rows whose key is not in the table yet; return how many were inserted."""
        spec = spec_of(name)
        if not spec.append_only:
            raise LakeError(f"{name} is a derived table: rebuild it with replace(), not insert_new()")
        rows = conform(name, rows)
        if rows.num_rows == 0:
            return 0
        return self._merge_insert(name, first_of_each_key(rows, spec.key), spec.key)

    def replace(self, name: str, rows: pa.Table) -> bool:
        """Replace a derived table with `rows` unless it already holds exactly them.

        Returns True when a new version was written. Rows are sorted by key first, so the
        same events always give the same table, and an unchanged rebuild writes nothing.
        """
        spec = spec_of(name)
        if spec.append_only:
            raise LakeError(f"{name} is an append-only event table: it is never replaced")
        rows = conform(name, rows).sort_by(spec.key)
        if self.exists(name) and self.read(name).sort_by(spec.key).equals(rows):
            return False
        self.table(name)
        self._overwrite(name, rows)
        return True

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


class Lake(LakeBase):
    """Tables under one root folder, by name (`prompts`, `generation_events`, ...), via delta-rs.
    `mode` checks the folder first (see check_lake_root): jobs pass it, library use need not."""

    def __init__(self, root: str | os.PathLike, mode: str | None = None):
        if "://" in str(root):   # Path() would fold s3://b/x into s3:/b/x, then write a local folder "s3:"
            raise LakeTargetError(f"lake {root} is a URI, but delta-rs here opens local folders only (cai status, "
                                  "cai sql, lake_engine delta-rs). Fix: run the jobs with --lake-engine spark "
                                  "(delta-spark writes cloud storage), or point --lake at a local folder")
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

    def table(self, name: str) -> DeltaTable:
        """The DeltaTable, created empty with its schema and properties if missing."""
        spec = spec_of(name)
        path = self.path(name)
        if self.exists(name):
            dt = self.delta_table(name)
            added = added_columns(spec, dt.schema().to_arrow())
            if added:  # a newer release added nullable columns: evolve the table in place
                dt.alter.add_columns([Field.from_arrow(f) for f in added])
            return dt
        path.mkdir(parents=True, exist_ok=True)
        config = {"delta.appendOnly": "true"} if spec.append_only else None
        return DeltaTable.create(str(path), schema=spec.schema, configuration=config,
                                 name=name, mode="ignore")

    def version(self, name: str) -> int | None:
        return self.delta_table(name).version() if self.exists(name) else None

    def read(self, name: str, columns: list[str] | None = None, version: int | None = None) -> pa.Table:
        """The table (or an empty one with its schema), at `version` for time travel."""
        spec = spec_of(name)
        schema = spec.schema if columns is None else pa.schema([spec.schema.field(c) for c in columns])
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

    def _merge_insert(self, name: str, rows: pa.Table, key: str) -> int:
        def merge() -> int:
            metrics = (
                self.table(name)
                .merge(source=rows, predicate=f"t.{key} = s.{key}", source_alias="s", target_alias="t")
                .when_not_matched_insert_all()
                .execute()
            )
            return int(metrics["num_target_rows_inserted"])
        return self._retrying(name, merge)

    def _overwrite(self, name: str, rows: pa.Table) -> None:
        self._retrying(name, lambda: write_deltalake(str(self.path(name)), rows, mode="overwrite"))

    def _retrying(self, name: str, commit):
        """Run `commit` again when another writer committed first. An insert-only MERGE on the key is
        idempotent (a retry inserts only what is still missing) and a derived table is a projection,
        so a lost race costs one retry, never the finished model work these rows carry."""
        attempts = COMMIT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            try:
                return commit()
            except CommitFailedError as exc:
                if attempt == attempts:
                    raise CommitRaceError(f"{name}: lost the commit race {attempts} times in a row to another writer of "
                                    f"{self.path(name)} ({str(exc).splitlines()[0]}). Fix: let the other run finish, "
                                    "then rerun this job: it writes only what is still missing") from None
                time.sleep(random.uniform(0.05, 0.25) * attempt)   # jitter: two losers do not collide again
