"""DuckDB SQL over the lake: every Delta table is a view named after the table.

Each view reads the live parquet files of the table's current Delta snapshot (delta-rs lists
them, so removed files are never read) with DuckDB's own reader: no Python runs inside the scan.
(Scanning pyarrow datasets from DuckDB's threads crashed or hung the process when an error was
raised mid-stream, e.g. a failed CAST: rc 139 on lakes of many files.) A query runs to the end
inside `query`, so an error anywhere becomes one ValueError.

Confined by default: external access is off and the configuration locked, so a query sees the
lake's tables and nothing else (no COPY ... TO, ATTACH, read_csv, glob, extensions). The only
paths DuckDB may open are the tables' live data files, read-only through the views.
`allow_files=True` (`cai sql --allow-files`) gives a trusted shell DuckDB's file functions back.
"""
from __future__ import annotations

import duckdb
from cai_lib.lake.tables import BrokenTableError, Lake
from cai_lib.quality import signals as quality
from schemas import TABLES


def _live_files(lake: Lake, name: str) -> list[str]:
    if not lake.exists(name):
        return []
    return [u.removeprefix("file://") for u in lake.delta_table(name).file_uris()]


def _sql_list(paths: list[str]) -> str:
    """A SQL list literal of paths (views cannot take prepared parameters).

    >>> _sql_list(["/a/b.parquet", "/it's.parquet"])
    "['/a/b.parquet', '/it''s.parquet']"
    """
    return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"


def connect(lake: Lake, allow_files: bool = False) -> tuple[duckdb.DuckDBPyConnection, dict[str, str]]:
    """A confined connection with a view per table, and {table: why} for tables that do not open:
    those are left out, so a query over the other tables still runs."""
    con = duckdb.connect()
    # the gates' refusal detector, so SQL can count refusals: avg(is_refusal(response)::INT)
    con.create_function("is_refusal", lambda text: quality.is_refusal(text or ""), ["VARCHAR"], "BOOLEAN",
                        null_handling="special")
    files, broken = {}, {}
    for name in TABLES:
        try:
            files[name] = _live_files(lake, name)
        except BrokenTableError as exc:
            broken[name] = str(exc)
    if not allow_files:
        con.execute(f"SET allowed_paths = {_sql_list([f for fs in files.values() for f in fs])}")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    for name, spec in TABLES.items():
        if name in broken:
            continue
        if files[name]:   # columns added to a table later read as NULL in its older files
            con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet({_sql_list(files[name])}, union_by_name = true)")
        else:             # a table not written yet (or emptied) is an empty one with its schema
            con.register(name, spec.schema.empty_table())
    return con, broken


def query(lake: Lake, sql: str, allow_files: bool = False) -> duckdb.DuckDBPyRelation:
    """Run `sql` to the end; the result is in memory. Any SQL error (parse, bind, or one raised while
    rows stream, e.g. a failed CAST) is one ValueError; an unknown table lists the lake's tables."""
    con, broken = connect(lake, allow_files)
    try:
        result = con.sql(sql)
        table = result.to_arrow_table() if result is not None else None
    except duckdb.CatalogException as exc:
        named = [why for name, why in broken.items() if f"name {name} does not exist" in str(exc)]
        raise ValueError(named[0] if named else f"{exc}\nLake tables: {', '.join(TABLES)}") from None
    except duckdb.PermissionException as exc:
        raise ValueError(f"{exc}. `cai sql` sees the lake's tables only; pass --allow-files for DuckDB's "
                         "file functions (a trusted shell)") from None
    except duckdb.Error as exc:  # the message says what and where
        raise ValueError(str(exc) or type(exc).__name__) from None
    return duckdb.from_arrow(table) if table is not None else duckdb.sql("SELECT 'ok' AS status")
