"""DuckDB SQL over the lake: every Delta table is a view named after the table.

Tables are registered as Arrow datasets of their current Delta snapshot (delta-rs lists the
live files, so removed files are never read), so queries stream. Filter pushdown into the
Arrow scan is off: with duckdb 2.0 + pyarrow 25 a pushed-down `col = 'literal'` on a string
column fails (string vs string_view kernels; duckdb-python #187/#227), so DuckDB filters the
streamed rows itself.
"""
from __future__ import annotations

import duckdb
from deltalake import DeltaTable

from cai_lib.lake.tables import Lake
from cai_lib.quality import signals as quality
from schemas import TABLES


def connect(lake: Lake) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("SET disabled_optimizers = 'filter_pushdown'")  # see the module docstring
    # the gates' refusal detector, so SQL can count refusals: avg(is_refusal(response)::INT)
    con.create_function("is_refusal", lambda text: quality.is_refusal(text or ""), ["VARCHAR"], "BOOLEAN",
                        null_handling="special")
    for name, spec in TABLES.items():  # a table not written yet is an empty one with its schema
        source = DeltaTable(str(lake.path(name))).to_pyarrow_dataset() if lake.exists(name) else spec.schema.empty_table()
        con.register(name, source)
    return con


def query(lake: Lake, sql: str):
    """Run `sql`; a clear error lists the tables when a name is unknown."""
    con = connect(lake)
    try:
        return con.sql(sql)
    except duckdb.CatalogException as exc:
        raise ValueError(f"{exc}\nLake tables: {', '.join(TABLES)}") from None
    except duckdb.Error as exc:  # parser / binder errors: the message says what and where
        raise ValueError(str(exc)) from None
