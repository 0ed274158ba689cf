"""Table health: find what is wrong with a table that no longer opens, and set it right without
deleting history.

A table that fails to open (a truncated or corrupt commit in `_delta_log`, a missing data file) is
diagnosed: which commit file is bad and which earlier version still opens. `restore` sets every
commit after that version aside under `<lake>/.cai-broken/<table>/<time>/` (kept, never deleted)
so the table opens at its last good version again; the set-aside files can be inspected or put
back by hand.

    cai lake check --lake lake            # every table: ok / absent / BROKEN, with the fix
    cai lake restore generation_events    # set the broken commits aside; the table reopens
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from deltalake import DeltaTable

BROKEN_DIR = ".cai-broken"


@dataclass
class TableHealth:
    name: str
    state: str                 # ok | absent | broken
    version: int | None = None
    rows: int | None = None
    problem: str | None = None
    bad_file: str | None = None
    last_good: int | None = None
    set_aside: str | None = None   # restore: the folder the removed commits' files went to (None: nothing moved)

    def fix(self, root: Path) -> str:
        if self.last_good is None:
            return (f"no earlier version of {self.name} opens either; move {root / self.name} out of the lake "
                    "(the other tables keep working) and rebuild it")
        return (f"`cai lake restore {self.name} --lake {root}` sets the commits after version {self.last_good} "
                f"aside (kept under {root / BROKEN_DIR}) and reopens version {self.last_good}; nothing is deleted")

    def message(self, root: Path) -> str:
        where = f" in {self.bad_file}" if self.bad_file else ""
        return f"table {self.name} at {root / self.name} cannot be read: {self.problem}{where}. Fix: {self.fix(root)}"


def _commits(table_dir: Path) -> list[tuple[int, Path]]:
    log = table_dir / "_delta_log"
    return sorted((int(p.name.split(".")[0]), p) for p in log.glob("*.json") if p.name.split(".")[0].isdigit())


def _valid_commit(path: Path) -> bool:
    """Whether a commit file is non-empty JSON lines (not truncated, overwritten or empty)."""
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        for line in lines:
            json.loads(line)
        return bool(lines)
    except (ValueError, UnicodeDecodeError):
        return False


def _bad_commit(table_dir: Path) -> tuple[int, Path] | None:
    """The first commit file that is not valid JSON lines."""
    return next(((v, p) for v, p in _commits(table_dir) if not _valid_commit(p)), None)


def _opens(table_dir: Path, version: int | None = None) -> bool:
    try:
        DeltaTable(str(table_dir), version=version).to_pyarrow_dataset().count_rows()
        return True
    except Exception:  # noqa: BLE001 - any failure means this version does not open
        return False


def diagnose(table_dir: Path, name: str, exc: BaseException) -> TableHealth:
    """What is wrong with a table that raised `exc` on opening, and its newest version that opens."""
    problem = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    bad = _bad_commit(table_dir)
    candidates = [v for v, _ in _commits(table_dir) if bad is None or v < bad[0]]
    last_good = next((v for v in reversed(candidates) if _opens(table_dir, v)), None)
    return TableHealth(name, "broken", problem=problem, bad_file=str(bad[1]) if bad else None, last_good=last_good)


def check_table(root: Path, name: str) -> TableHealth:
    table_dir = root / name
    if not (table_dir / "_delta_log").is_dir():
        return TableHealth(name, "absent")
    try:
        dt = DeltaTable(str(table_dir))
        health = TableHealth(name, "ok", version=dt.version(), rows=dt.to_pyarrow_dataset().count_rows())
    except Exception as exc:  # noqa: BLE001 - delta-rs raises DeltaError, OSError, ... for a broken table
        return diagnose(table_dir, name, exc)
    # delta-rs read every commit after the newest checkpoint, but not the checkpoint's own commit; Spark
    # reads that one (the table's history), so a bad one breaks the table for one of the lake's engines
    checkpoint = _checkpoint_version(table_dir)
    commit = table_dir / "_delta_log" / f"{checkpoint:020d}.json"
    if checkpoint and commit.exists() and not _valid_commit(commit):
        return diagnose(table_dir, name, ValueError(f"commit {checkpoint} is not valid JSON lines (delta-rs skips "
                                                    "it behind a checkpoint; Spark reads it and fails)"))
    return health


def _checkpoint_version(table_dir: Path) -> int:
    """The version `_last_checkpoint` names (0 without one: every commit is read)."""
    try:
        return int(json.loads((table_dir / "_delta_log" / "_last_checkpoint").read_text())["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def restore(root: Path, name: str, to_version: int | None = None) -> TableHealth:
    """Set every file of the commits after the last good version (or after `to_version`, for a table that
    opens but holds commits to undo, e.g. another engine's) aside (moved, never deleted); the table's health
    after. Every file, not only the JSON: a commit's Hadoop checksum (`.N.json.crc`),
    version checksum (`N.crc`) or checkpoint left behind is read as part of the next commit N that
    Spark writes, and then no Spark job opens the table (ChecksumException) though delta-rs does."""
    health = check_table(root, name)
    if health.state == "absent":
        raise ValueError(f"table {name} does not exist in the lake {root} (no {root / name / '_delta_log'}): "
                         "there is nothing to restore. Fix: check --lake and the table name (`cai lake check`)")
    if to_version is not None:
        if to_version < 0 or (health.state == "ok" and to_version > health.version):
            raise ValueError(f"--to-version {to_version}: table {name} has versions 0 to {health.version}. Fix: "
                             "give one of them (`cai lake check` shows the current version)")
        if health.state == "ok" and to_version == health.version:
            return health
        last_good = to_version
    elif health.state != "broken":
        return health
    elif health.last_good is None:
        raise ValueError(health.message(root))
    else:
        last_good = health.last_good
    log = root / name / "_delta_log"
    aside = root / BROKEN_DIR / name / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    for path in stale_files(log, last_good):
        target = aside / path.relative_to(log)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), target)
    after = check_table(root, name)
    if after.state != "ok":
        raise ValueError(f"{name}: still unreadable after setting commits aside into {aside}: {after.problem}")
    after.set_aside = str(aside)
    return after


def stale_files(log: Path, last_good: int) -> list[Path]:
    """The files of `log` (a `_delta_log`, subfolders included) that belong to versions after
    `last_good`, and `_last_checkpoint` with its checksum when it points past it."""
    pointer = log / "_last_checkpoint"
    drop_pointer = pointer.exists() and _checkpoint_after(pointer, last_good)
    out = []
    for path in sorted(p for p in log.rglob("*") if p.is_file()):
        version = version_of(path.name)
        if (version is not None and version > last_good
                or drop_pointer and path.name in ("_last_checkpoint", "._last_checkpoint.crc")):
            out.append(path)
    return out


def version_of(filename: str) -> int | None:
    """The table version a `_delta_log` file belongs to (the newest one it holds), or None for a file
    of no version. Hadoop writes a hidden `.NAME.crc` checksum next to each file, and a crashed
    rename leaves `.NAME.UUID.tmp`: both belong to NAME's version.

    >>> version_of("00000000000000000006.json"), version_of(".00000000000000000006.json.crc")
    (6, 6)
    >>> version_of("00000000000000000006.crc"), version_of(".00000000000000000006.crc.crc")
    (6, 6)
    >>> version_of("00000000000000000010.checkpoint.parquet"), version_of(".00000000000000000010.checkpoint.parquet.crc")
    (10, 10)
    >>> version_of("00000000000000000010.checkpoint.0000000001.0000000002.parquet")   # multi-part
    10
    >>> version_of("00000000000000000010.checkpoint.80a083e8-7026-4e79-81be-64bd76c43a11.json")   # v2
    10
    >>> version_of("00000000000000000004.00000000000000000006.compacted.json")   # versions 4 to 6
    6
    >>> version_of(".00000000000000000006.json.3f2a9c1e-0b7d-4c55-9e0f-2d5c8a7b6e11.tmp")
    6
    >>> version_of("00000000000000000006.3f2a9c1e-0b7d-4c55-9e0f-2d5c8a7b6e11.json")   # a staged commit
    6
    >>> [version_of(n) for n in ("_last_checkpoint", "._last_checkpoint.crc", "_commit_9b1c.json.tmp",
    ...                          "3f2a9c1e-0b7d-4c55-9e0f-2d5c8a7b6e11.parquet", ".DS_Store", "")]
    [None, None, None, None, None, None]
    """
    parts = filename.lstrip(".").split(".")
    if not parts[0].isdigit():
        return None
    if len(parts) > 2 and parts[1].isdigit() and parts[2] == "compacted":
        return int(parts[1])
    return int(parts[0])


def _checkpoint_after(path: Path, version: int) -> bool:
    try:
        return int(json.loads(path.read_text())["version"]) > version
    except (ValueError, KeyError, TypeError):
        return True   # an unreadable pointer to a checkpoint is no use either
