"""`cai lake`: check every table, restore a broken one, adopt another engine's commits, optimize."""
from __future__ import annotations

import argparse

from jobs.tools import add_common, lake_arg, tracking_uri_arg
from schemas import TABLES


def lake_main(argv) -> int:
    p = argparse.ArgumentParser(prog="cai lake", description="Check every table of the lake, or restore a broken "
                                "one to its last good version (the commits after it are set aside, never deleted).")
    sub = p.add_subparsers(dest="action", required=True)
    add_common(sub.add_parser("check", help="each table: ok, absent or BROKEN with the fix; exit 1 if any is broken"))
    r = sub.add_parser("restore", help="set a broken table's bad commits aside so it opens at its last good version")
    r.add_argument("table", choices=sorted(TABLES))
    r.add_argument("--to-version", type=int, default=None, help="set aside every commit after this version, "
                   "also of a table that opens (e.g. commits another engine wrote)")
    add_common(r)
    d = sub.add_parser("adopt", help="accept the commits another engine wrote (a lake from a release that wrote "
                       "with delta-rs): one delta-spark commit per table records it; jobs refuse such tables until then")
    d.add_argument("tables", nargs="*", metavar="TABLE", help=f"default: every table ({', '.join(sorted(TABLES))})")
    add_common(d)
    o = sub.add_parser("optimize", help="compact small files, checkpoint, and vacuum files no version needs, "
                       "keeping every version a gate verdict or a registered model pins")
    o.add_argument("--retention-hours", type=int, default=168, help="unpinned versions older than this lose "
                   "their removed files; at least the tables' delta.deletedFileRetentionDuration (Delta's default: "
                   "7 days), so a running job's files are never removed")
    o.add_argument("--dry-run", action="store_true", help="say what vacuum would delete; change nothing")
    add_common(o, registry=True)
    a = p.parse_args(argv)
    from cai_lib.lake.health import check_table, restore
    lake = lake_arg(a)
    if a.action == "optimize":
        return _optimize(lake, a)
    if a.action == "adopt":
        unknown = sorted(set(a.tables) - set(TABLES))
        if unknown:
            p.error(f"unknown table(s) {unknown}; the lake's tables are {', '.join(sorted(TABLES))}")
        return _adopt(lake, a.tables or list(TABLES))
    if a.action == "restore":
        h = restore(lake.root, a.table, a.to_version)
        if h.set_aside is None:
            print(f"{h.name}: healthy, nothing to do (version {h.version}, {h.rows} rows)")
        else:
            print(f"{h.name}: ok at version {h.version}, {h.rows} rows; the later commits are set aside in {h.set_aside}")
        return 0
    broken = 0
    for name in TABLES:
        h = check_table(lake.root, name)
        broken += h.state == "broken"
        print(f"{name:<22}" + {"ok": f"ok      version {h.version}, {h.rows} rows", "absent": "absent"}.get(
            h.state, f"BROKEN  {h.message(lake.root)}"))
    return 1 if broken else 0


def _adopt(lake, names: list[str]) -> int:
    from cai_lib.lake.writers import adopt
    from cai_lib.runtime.session import get_spark
    adopted = adopt(get_spark("local[1]", "cai-lake-adopt", delta=True), lake.root, names)
    for name, version in adopted.items():
        print(f"{name}: commits through version {version} adopted; delta-spark writes it from now on")
    if not adopted:
        print("every table is written by delta-spark only: nothing to adopt")
    return 0


def _optimize(lake, a) -> int:
    import os
    from cai_lib.lake.upkeep import gate_pins, optimize, registry_pins
    pins = gate_pins(lake)
    uri = tracking_uri_arg(a)
    if not (uri.startswith("sqlite:///") and not os.path.exists(uri.removeprefix("sqlite:///"))):
        import mlflow
        mlflow.set_tracking_uri(uri)
        for table, versions in registry_pins(lake).items():   # an unreadable registry raises: vacuum nothing
            pins.setdefault(table, set()).update(versions)

    def spark_session():   # for the tables delta-spark writes; started only if there is one
        from cai_lib.runtime.session import get_spark
        return get_spark("local[1]", "cai-lake-optimize", delta=True)

    for t in optimize(lake, pins, a.retention_hours, a.dry_run, spark_session):
        print(t.line())
    return 0
