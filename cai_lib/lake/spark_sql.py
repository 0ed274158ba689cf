"""Spark SQL over the lake (`cai sql --engine spark`): each Delta table is a temp view named after the
table, read with delta-spark (its current snapshot), so a query gives what the DuckDB engine gives.

Read-only, like the DuckDB engine. The statement is parsed first, by the session's own parser (Delta's
SQL extension included), and nothing runs unless the whole parsed plan, with its CTEs and subqueries,
is a query: only query nodes (an allowlist: Project, Filter, Join, Aggregate, ...), only the lake's
tables by their one-part names (or the statement's own CTEs), only harmless table functions (`range`,
`explode`, ...), and no function that calls Java code (`reflect`, `java_method`). So DELETE, UPDATE,
MERGE, INSERT (INTO a table or OVERWRITE DIRECTORY), CREATE/ALTER/DROP, SET, CACHE, ADD JAR, Delta's
VACUUM/OPTIMIZE/RESTORE and any path (delta.`/x`, read_files('/x')) are refused with one line before
Spark touches a file.

A table that does not open (`cai lake check`) gets no view: a query over the other tables still runs,
and one that names it fails with the table's health message and its `cai lake restore` fix.

    spark_sql.query(spark, "lake", "SELECT kind, count(*) AS n FROM generation_events GROUP BY kind")
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from cai_lib.lake.health import check_table
from cai_lib.quality import signals as quality
from schemas import TABLES

ONLY_QUERIES = "the Spark engine only runs queries over the lake's tables (SELECT, or WITH ... SELECT)"
_LOGICAL = "org.apache.spark.sql.catalyst.plans.logical."
_ANALYSIS = "org.apache.spark.sql.catalyst.analysis."
# What Spark 4.2's parser makes of a SELECT / WITH ... SELECT (printed with parsePlan on each clause:
# joins, set operations, subqueries, windows, LATERAL VIEW, PIVOT, hints, QUALIFY, pipe syntax).
# Commands, INSERT, scripts, streaming and time-travel relations parse to other classes: refused.
QUERY_NODES = frozenset(
    [_LOGICAL + n for n in ("Project", "Filter", "Aggregate", "Sort", "GlobalLimit", "LocalLimit", "LimitAll",
                            "Offset", "Join", "LateralJoin", "Union", "Intersect", "Except", "Distinct",
                            "SubqueryAlias", "UnresolvedWith", "WithWindowDefinition", "Generate", "OneRowRelation",
                            "LocalRelation", "Sample", "Pivot", "Unpivot", "RepartitionByExpression", "UnresolvedHint")]
    + [_ANALYSIS + n for n in ("UnresolvedRelation", "UnresolvedHaving", "UnresolvedQualify",
                               "UnresolvedTableValuedFunction", "UnresolvedTVFAliases",
                               "UnresolvedSubqueryColumnAliases", "UnresolvedInlineTable")]
    + ["org.apache.spark.sql.catalyst.expressions.PipeOperator"])
# table functions that only make rows from their arguments (read_files and the like read paths)
TABLE_FUNCTIONS = frozenset({"range", "explode", "explode_outer", "posexplode", "posexplode_outer", "inline",
                             "inline_outer", "stack", "json_tuple"})
# functions that call any Java method by name, or read a descriptor file by path
REFUSED_FUNCTIONS = frozenset({"reflect", "java_method", "try_reflect", "from_protobuf", "to_protobuf"})


def _seq(scala_seq) -> list:
    """A Scala Seq from the py4j gateway as a list."""
    it, out = scala_seq.iterator(), []
    while it.hasNext():
        out.append(it.next())
    return out


def _first_line(exc: BaseException) -> str:
    """A Spark error's first non-empty line: what and where, without the Java stack."""
    return next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def _refused(reason: str) -> ValueError:
    return ValueError(f"{ONLY_QUERIES}; refused: {reason}")


def _parse(spark, sql: str):
    """The statement's unresolved plan from the session's parser: parsed, never executed."""
    from py4j.protocol import Py4JJavaError
    from pyspark.errors import PySparkException
    try:
        return spark._jsparkSession.sessionState().sqlParser().parsePlan(sql)
    except (PySparkException, Py4JJavaError) as exc:
        raise ValueError(_first_line(exc)) from None


def _plans(plan):
    """Every node of a plan: its children, and its inner children (CTE bodies, the plans of subqueries)."""
    stack = [plan]
    while stack:
        node = stack.pop()
        yield node
        stack += _seq(node.children()) + _seq(node.innerChildren())


def _expressions(node):
    """Every expression of one plan node, nested ones included."""
    stack = _seq(node.expressions())
    while stack:
        expr = stack.pop()
        yield expr
        stack += _seq(expr.children())


def _check_function(expr) -> None:
    kind = expr.getClass().getName()
    if kind == _ANALYSIS + "ExpressionWithUnresolvedIdentifier":
        raise _refused("a function named by IDENTIFIER(...)")
    if kind == _ANALYSIS + "UnresolvedFunction":
        name = str(_seq(expr.nameParts())[-1])
    elif kind == _ANALYSIS + "UnresolvedGenerator":
        name = str(expr.name().funcName())
    else:
        return
    if name.lower() in REFUSED_FUNCTIONS:
        raise _refused(f"function {name}() (it calls Java code or reads files)")


def _relation_name(node) -> str:
    """The lake table (or CTE) a FROM clause names: one part, never a path or a catalog table."""
    parts = [str(p) for p in _seq(node.multipartIdentifier())]
    if len(parts) != 1:
        raise _refused(f"{'.'.join(f'`{p}`' for p in parts)} is not a lake table. Lake tables: {', '.join(TABLES)}")
    if not node.options().isEmpty() or node.isStreaming():   # WITH ('path' = ...) options reach the reader
        raise _refused(f"options or a stream on `{parts[0]}`")
    return parts[0].lower()


def _check_node(node) -> str | None:
    """Refuse a node that is not part of a query; the name a relation node reads, if any."""
    kind = node.getClass().getName()
    if kind not in QUERY_NODES:
        raise _refused(f"{kind.rsplit('.', 1)[-1].rstrip('$')} is not part of a query")
    for expr in _expressions(node):
        _check_function(expr)
    if kind == _ANALYSIS + "UnresolvedTableValuedFunction":
        parts = [str(p) for p in _seq(node.name())]
        if len(parts) != 1 or parts[0].lower() not in TABLE_FUNCTIONS:
            raise _refused(f"table function {'.'.join(parts)}() (allowed: {', '.join(sorted(TABLE_FUNCTIONS))})")
    return _relation_name(node) if kind == _ANALYSIS + "UnresolvedRelation" else None


def tables_read(spark, sql: str) -> set[str]:
    """The lake tables `sql` reads, from its parsed plan; a one-line ValueError, before anything runs,
    unless it is a query over the lake's tables alone (see the module docstring)."""
    nodes = list(_plans(_parse(spark, sql)))
    ctes = {str(cte._1()).lower() for node in nodes if node.getClass().getName() == _LOGICAL + "UnresolvedWith"
            for cte in _seq(node.cteRelations())}
    names = {name for name in map(_check_node, nodes) if name is not None}
    unknown = sorted(names - set(TABLES) - ctes)
    if unknown:
        raise _refused(f"`{unknown[0]}` is not a lake table. Lake tables: {', '.join(TABLES)}")
    return names & set(TABLES)


def _view(spark, root: Path, name: str) -> str | None:
    """Register the table's temp view; the reason instead when it does not open (no view then)."""
    from py4j.protocol import Py4JJavaError
    from pyspark.errors import PySparkException
    from pyspark.sql.pandas.types import from_arrow_schema
    health = check_table(root, name)   # delta-rs: a truncated commit is named, with the restore fix
    if health.state == "broken":
        return health.message(root)
    try:
        df = (spark.read.format("delta").load(str(root / name)) if health.state == "ok"
              else spark.createDataFrame([], from_arrow_schema(TABLES[name].schema)))
    except (PySparkException, Py4JJavaError) as exc:
        return f"table {name} at {root / name} cannot be read by delta-spark: {_first_line(exc)}"
    df.createOrReplaceTempView(name)
    return None


def register_views(spark, root) -> dict[str, str]:
    """A temp view per table (a table not written yet is an empty one with its schema). A broken table
    gets none (an older view of it is dropped): {table: why} says which, so the others stay queryable."""
    root = Path(root).absolute()
    broken = {}
    for name in TABLES:
        why = _view(spark, root, name)
        if why is not None:
            broken[name] = why
            spark.catalog.dropTempView(name)
    spark.udf.register("is_refusal", lambda text: quality.is_refusal(text or ""), "boolean")
    return broken


def query(spark, root, sql: str) -> pa.Table:
    """Run `sql` over the lake's tables if it is a query (checked on the parsed statement first); a query
    naming a broken table fails with that table's message. Any error is one ValueError line."""
    names = tables_read(spark, sql)
    broken = register_views(spark, root)
    named = [broken[name] for name in TABLES if name in names and name in broken]
    if named:
        raise ValueError(named[0])
    return _run(spark, sql)


def _run(spark, sql: str) -> pa.Table:
    """spark.sql to an Arrow table, with SQL on raw paths off as a second guard; Spark's errors as one line."""
    from py4j.protocol import Py4JJavaError
    from pyspark.errors import AnalysisException, PySparkException
    before = spark.conf.get("spark.sql.runSQLOnFiles", "true")
    spark.conf.set("spark.sql.runSQLOnFiles", "false")
    try:
        return spark.sql(sql).toArrow()
    except AnalysisException as exc:
        raise ValueError(f"{_first_line(exc)}\nLake tables: {', '.join(TABLES)}") from None
    except (PySparkException, Py4JJavaError) as exc:
        raise ValueError(_first_line(exc)) from None
    finally:
        spark.conf.set("spark.sql.runSQLOnFiles", before)
