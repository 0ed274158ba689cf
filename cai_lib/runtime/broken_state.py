"""One sentence for a run that broke on the machine's state, not on its input: a full disk, a read-only or
unwritable lake, a table Spark cannot read, a Spark executor or Python worker that died.

These reach a job as whatever the layer below raised: an OSError, a delta-rs error or a Rust panic, or a
Py4J/PySpark error carrying hundreds of lines of Java stack. `explain` finds the cause in the exception
chain and says what happened, where, and what to do; `cai` prints it as one line (the traceback stays
behind `--debug`). Nothing here guesses: an exception none of the rules matches is left to the caller.

Every case says the same thing about the data because it is true of every write of the lake: a Delta
commit is atomic, so a write that failed half-way committed nothing, and the rerun resumes (the ids are
deterministic, so nothing is done twice).
"""
from __future__ import annotations

import errno
import re
from pathlib import Path

RESUME = "nothing half-written was committed (what earlier commits wrote stays); rerun the same command to resume"

# (errno, patterns found in the texts of a Java, Rust or Python error, what it is)
_OS_STATES = (
    (errno.ENOSPC, ("No space left on device", "os error 28", "ENOSPC", "Disk quota exceeded"), "disk_full"),
    (errno.EROFS, ("Read-only file system", "os error 30", "EROFS"), "read_only"),
    (errno.EACCES, ("Permission denied", "os error 13", "AccessDeniedException"), "no_permission"),
)
# only texts that say a process died: a bug's traceback must never be mistaken for one
_SPARK_DEATH = ("ExecutorLostFailure", "Python worker exited unexpectedly", "Python worker failed to connect back",
                "SparkContext was shut down", "Py4JNetworkError")
# a Delta log file Spark could not read: its table folder is what precedes _delta_log
_LOG_FILE = re.compile(r"(?:Checksum error: |FAILED_READ_FILE\S* Encountered error while reading file )"
                       r"(?:file:)?/*(/\S+?)/_delta_log/")


def chain_texts(exc: BaseException) -> list[str]:
    """The messages of `exc` and of every exception it was raised from or during (Java causes included,
    since a Py4J error's text carries the Java stack with its `Caused by:` lines)."""
    texts, seen = [], set()
    while exc is not None and id(exc) not in seen and len(seen) < 20:
        seen.add(id(exc))
        texts.append(f"{type(exc).__name__}: {exc}")
        java = getattr(exc, "java_exception", None)
        if java is not None:
            try:
                texts.append(str(java.toString()))
            except Exception:  # noqa: BLE001 - the JVM may be gone (a killed driver): its text is already in str(exc)
                pass
        exc = _parent(exc)
    return texts


def _parent(exc: BaseException) -> BaseException | None:
    """What `exc` was raised from, or during (unless `raise ... from None` hid it on purpose)."""
    return exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)


def _errnos(exc: BaseException) -> set[int]:
    found = set()
    while exc is not None and len(found) < 20:
        if isinstance(exc, OSError) and exc.errno:
            found.add(exc.errno)
        exc = _parent(exc)
    return found


def classify(exc: BaseException) -> str | None:
    """disk_full | read_only | no_permission | spark_table | worker_died, or None.

    >>> classify(OSError(errno.ENOSPC, "No space left on device"))
    'disk_full'
    >>> classify(RuntimeError("Generic DeltaTable error: I/O error: Read-only file system (os error 30)"))
    'read_only'
    >>> classify(RuntimeError("org.apache.spark.SparkException: ... ExecutorLostFailure (executor 1 exited)"))
    'worker_died'
    >>> classify(ValueError("temperature must be >= 0")) is None
    True
    """
    codes, text = _errnos(exc), "\n".join(chain_texts(exc))
    for code, patterns, state in _OS_STATES:
        if code in codes or any(p in text for p in patterns):
            return state
    if _LOG_FILE.search(text) or "ChecksumException" in text:
        return "spark_table"
    if any(p in text for p in _SPARK_DEATH):
        return "worker_died"
    return None


def explain(exc: BaseException, lake: str | None) -> str | None:
    """One sentence for a broken machine state behind `exc`, naming the lake (or the table) and the fix;
    None when `exc` is not one (then it is the job's own error, or a bug)."""
    state = classify(exc)
    where = f"the lake {lake}" if lake else "the lake"
    if state == "disk_full":
        return (f"the disk holding {where} is full (No space left on device); {RESUME} once space is free "
                f"(`df -h {lake or '.'}` shows it; `cai lake optimize` frees old files)")
    if state == "read_only":
        return (f"{where} is on a read-only file system, so nothing can be written; {RESUME} with a writable "
                "--lake (or remount it read-write); reading commands (`cai sql`, `cai status`) still work")
    if state == "no_permission":
        return (f"permission denied writing {where}: the user running cai cannot write there; {RESUME} as a "
                f"user who can (or fix the folder's owner/mode)")
    if state == "spark_table":
        return _table_message(exc, lake)
    if state == "worker_died":
        return (f"a Spark executor or its Python worker died (killed, or out of memory) while the job ran on "
                f"{where}; {RESUME} (lower --batch-size or spark_master's slots if memory ran out; --debug shows "
                "Spark's log)")
    return None


def _table_message(exc: BaseException, lake: str | None) -> str:
    """Spark could not read a table's Delta log: the table's health (delta-rs) names the bad commit and
    the restore; a log that delta-rs reads but Spark does not is a stale Hadoop checksum (`.N.json.crc`)."""
    from cai_lib.lake.health import check_table
    match = _LOG_FILE.search("\n".join(chain_texts(exc)))
    table_dir = Path(match.group(1)) if match else None
    if table_dir is not None:
        health = check_table(table_dir.parent, table_dir.name)
        if health.state == "broken":
            return f"{health.message(table_dir.parent)}; {RESUME} after that"
    table = f"table {table_dir.name} at {table_dir}" if table_dir else "a table of the lake"
    check = f"`cai lake check --lake {lake}`" if lake else "`cai lake check`"
    return (f"{table} has a commit whose Hadoop checksum file (_delta_log/.N.json.crc) does not match it, so "
            f"Spark refuses to read it: {check} names the bad commit, and `cai lake restore` sets it aside with "
            f"its checksum (nothing is deleted); {RESUME} after that")
