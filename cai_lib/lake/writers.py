"""Who wrote a table: delta-spark is the lake's one writer, and a job refuses a table another engine
(delta-rs, an external tool) or an unknown writer committed to, before any model call.

A second writer breaks what the jobs rest on: its appends carry no idempotent app ids, it takes no lake
lock, and its commits are not the ones the event anti-joins and `built_from` checks expect. Each Delta
commit names its engine (`commitInfo.engineInfo`: "Apache-Spark/4.2.0 Delta-Lake/4.4.0" for delta-spark,
"delta-rs:py-1.6.6" for delta-rs, nothing for a hand-written commit).

Checked: the commits after the table's newest checkpoint (every one since a checkpoint was last written,
at most a checkpoint interval of small JSON files, so the check does not grow with the table) and version
0 (who created it). A lake first written by an older release (delta-rs, `lake_engine: delta-rs`) is taken
over deliberately: `cai lake adopt` records, with a delta-spark commit, the version through which the
table's foreign commits are accepted (`cai.adoptedThroughVersion`).

    cai lake adopt --lake lake            # every table with foreign commits: accept them, once
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cai_lib.lake.tables import LakeError

WRITER_ENGINES = ("Apache-Spark/", "Databricks-Runtime/")   # delta-spark, and Databricks' Delta
ADOPTED = "cai.adoptedThroughVersion"


class ForeignWriterError(LakeError, ValueError):
    """A table that a writer other than delta-spark committed to; nothing was written."""


@dataclass(frozen=True)
class Foreign:
    table: str
    version: int
    engine: str   # the commit's engineInfo, or "" when it has none

    def describe(self) -> str:
        return f"by {self.engine!r}" if self.engine else "by an unknown writer (its commit has no engineInfo)"


def commit_engine(path: Path) -> str:
    """The engineInfo of one commit file ("" when its commitInfo has none or it has no commitInfo).

    >>> import tempfile; p = Path(tempfile.mkdtemp()) / "00000000000000000001.json"
    >>> _ = p.write_text('{"add": {}}\\n{"commitInfo": {"engineInfo": "delta-rs:py-1.6.6"}}\\n')
    >>> commit_engine(p)
    'delta-rs:py-1.6.6'
    """
    for line in path.read_text().splitlines():
        if '"commitInfo"' in line:
            return str(json.loads(line)["commitInfo"].get("engineInfo") or "")
    return ""


def checked_versions(versions: list[int], checkpoint: int | None) -> list[int]:
    """The commits the check reads: version 0 and every one after the newest checkpoint.

    >>> checked_versions([0, 1, 2, 3, 4, 5], 3), checked_versions([0, 1, 2], None)
    ([0, 4, 5], [0, 1, 2])
    """
    after = [v for v in versions if checkpoint is None or v > checkpoint]
    return sorted({v for v in versions if v == 0} | set(after))


def foreign_commits(table_dir: Path) -> list[Foreign]:
    """Commits of the table (see checked_versions) whose engine is not delta-spark's."""
    log = table_dir / "_delta_log"
    commits = {int(p.name[:20]): p for p in log.glob("*.json") if p.name[:20].isdigit()}
    checkpoints = [int(p.name[:20]) for p in log.glob("*.checkpoint*.parquet") if p.name[:20].isdigit()]
    out = []
    for v in checked_versions(sorted(commits), max(checkpoints, default=None)):
        engine = commit_engine(commits[v])
        if not engine.startswith(WRITER_ENGINES):
            out.append(Foreign(table_dir.name, v, engine))
    return out


def adopted_through(table_dir: Path) -> int:
    """The version through which `cai lake adopt` accepted foreign commits (-1: none)."""
    from deltalake import DeltaTable
    value = (DeltaTable(str(table_dir)).metadata().configuration or {}).get(ADOPTED)
    return int(value) if value is not None else -1


def unadopted(table_dir: Path) -> list[Foreign]:
    found = foreign_commits(table_dir)
    if not found:   # the usual case: no table load at all
        return []
    through = adopted_through(table_dir)
    return [f for f in found if f.version > through]


def check_writers(root: Path, names) -> None:
    """Refuse (ForeignWriterError) the first of the lake's existing tables `names` with a foreign commit; a
    commit that does not parse is the table's health problem (BrokenTableError naming it and the restore)."""
    for name in names:
        table_dir = Path(root) / name
        if not (table_dir / "_delta_log").is_dir():
            continue
        try:
            found = unadopted(table_dir)
        except ValueError:   # json: a truncated or overwritten commit
            from cai_lib.lake.health import check_table
            from cai_lib.lake.tables import BrokenTableError
            raise BrokenTableError(check_table(Path(root), name).message(Path(root))) from None
        if found:
            f = found[-1]
            raise ForeignWriterError(
                f"table {name} at {table_dir}: commit {f.version} was written {f.describe()}, not by delta-spark, "
                f"this lake's only writer (a second writer takes no lake lock and writes no idempotent app ids, so "
                f"exactly-once no longer holds); nothing was written. Fix: if that write was intended (a lake from a "
                f"release that wrote with delta-rs), `cai lake adopt {name} --lake {root}` accepts the table's commits "
                f"through version {f.version} once; otherwise `cai lake restore {name} --lake {root} --to-version "
                f"{f.version - 1}` sets the foreign commits aside")


def adopt(spark, root: Path, names) -> dict[str, int]:
    """Accept each table's foreign commits through its current version, by a delta-spark commit setting
    ADOPTED; {table: version adopted through} for the tables that had any."""
    out = {}
    for name in names:
        table_dir = Path(root) / name
        if not (table_dir / "_delta_log").is_dir() or not unadopted(table_dir):
            continue
        from deltalake import DeltaTable
        through = DeltaTable(str(table_dir)).version()
        spark.sql(f"ALTER TABLE delta.`{table_dir.resolve()}` SET TBLPROPERTIES ('{ADOPTED}' = '{through}')")
        out[name] = through
    return out
