"""A class-data-sharing archive for the driver JVM that the jobs start, so a stage starts in seconds.

Every `cai` stage (each `dvc repro` stage is one) starts its own JVM, and loading Spark's and Delta's
classes is most of that start: measured on a 2-core AVX-512 Xeon (2026-12-06), session + first job +
one Delta write + read took 20-22 s cold and 15.6 s with this archive. The first session of a given
JVM, Spark, Delta and classpath dumps the classes it loaded (`-XX:ArchiveClassesAtExit`, about 190 MB,
once); later sessions map them (`-XX:SharedArchiveFile`). The dump lands under a name with its
writer's pid and becomes the archive only after that JVM has exited, so no run maps a half-written
file. A JVM that cannot use an archive (another classpath, a different JDK) starts
as it would without one; its CDS warnings are silenced so they never reach a job's output.

The jars `spark.jars.packages` resolved are remembered beside the archive, and a later session that finds
them all still in Ivy's folder passes them as `spark.jars` and skips Ivy's resolution (1.2-1.4 s of
each start; measured 2026-12-06, session 9.1-10.1 s with the package, 6.8-7.7 s with its jars).

`CAI_JVM_CACHE=off` turns both off; `CAI_JVM_CACHE=DIR` keeps the archives in DIR
(default: $XDG_CACHE_HOME/cai-lake/jvm, i.e. ~/.cache/cai-lake/jvm).
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

ENV = "CAI_JVM_CACHE"
QUIET = "-Xlog:cds*=off -Xlog:class+path=off"


def cache_dir() -> Path | None:
    value = os.environ.get(ENV, "")
    if value.lower() in ("off", "0", "false", "no"):
        return None
    if value:
        return Path(value)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cai-lake" / "jvm"


def archive_key(java: str | None, spark: str, packages: str) -> str | None:
    """What the archive is valid for: this java binary (path, size, mtime), Spark (its version and where it
    is installed) and the extra jars.
    None where no java is found (Spark then fails with its own message)."""
    if not java:
        return None
    real = Path(java).resolve()
    try:
        st = real.stat()
    except OSError:
        return None
    raw = f"{real}|{st.st_size}|{st.st_mtime_ns}|{spark}|{packages}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def plan(directory: Path | None, key: str | None, pid: int) -> tuple[str, Path | None, Path | None]:
    """(the driver's extra JVM options, the file it dumps to or None, the archive that dump becomes).

    Maps the archive where there is one; else dumps one under this process's own name (two first runs
    at once each write their own, and the last rename wins: both are whole). Dumps left by a killed
    run (its JVM dumped, nobody renamed) are removed after an hour."""
    if directory is None or key is None:
        return "", None, None
    final = directory / f"{key}.jsa"
    for stale in directory.glob(f"{key}.*.dump"):
        try:
            if time.time() - stale.stat().st_mtime > 3600:
                stale.unlink()
        except OSError:
            pass
    if final.is_file():
        return f"-XX:SharedArchiveFile={final} {QUIET}", None, None
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return "", None, None
    dump = directory / f"{key}.{pid}.dump"
    return f"-XX:ArchiveClassesAtExit={dump} {QUIET}", dump, final


def driver_java_options(packages: str) -> tuple[str, Path | None, Path | None]:
    """`plan` for the driver JVM that `get_spark` is about to start."""
    import pyspark
    java = str(Path(os.environ["JAVA_HOME"]) / "bin" / "java") if os.environ.get("JAVA_HOME") else shutil.which("java")
    # the install's folder too: the archive holds the classpath it was dumped with, and a second venv's
    # Spark (another clone's .venv, or .venv-gpu) would otherwise find an archive keyed as its own that it cannot map
    spark = f"{pyspark.__version__}|{Path(pyspark.__file__).resolve().parent}"
    return plan(cache_dir(), archive_key(java, spark, packages), os.getpid())


def keep_dump_at_exit(spark, dump: Path, final: Path) -> None:
    """At exit, let the JVM write its dump (it does when its stdin closes), wait for it and make it the
    archive: renamed only once the JVM has exited, so no later run maps a half-written file."""
    proc = getattr(spark.sparkContext._gateway, "proc", None)

    def finish() -> None:
        if proc is None or proc.stdin is None:
            return
        try:
            spark.stop()
            proc.stdin.close()
            proc.wait(timeout=300)
        except Exception:   # noqa: BLE001 - a failed dump only costs the speed-up
            return
        if proc.returncode == 0 and dump.is_file() and dump.stat().st_size > 0:
            os.replace(dump, final)

    atexit.register(finish)


def _jar_list(directory: Path, packages: str) -> Path:
    return directory / f"{hashlib.sha256(packages.encode()).hexdigest()[:16]}.jars.json"


def resolved_jars(packages: str, directory: Path | None = None) -> str | None:
    """The `spark.jars` an earlier session resolved `packages` to, if every jar is still there."""
    directory = cache_dir() if directory is None else directory
    if directory is None or not packages:
        return None
    try:
        jars = json.loads(_jar_list(directory, packages).read_text())
    except (OSError, ValueError):
        return None
    local = [j.removeprefix("file://") for j in jars if isinstance(j, str)]
    if not jars or len(local) != len(jars) or not all(Path(j).is_file() for j in local):
        return None
    return ",".join(jars)


def remember_jars(packages: str, jars: str | None, directory: Path | None = None) -> None:
    """Keep what Ivy resolved `packages` to (written whole, then renamed: a reader sees all or nothing)."""
    directory = cache_dir() if directory is None else directory
    if directory is None or not packages or not jars:
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
        target = _jar_list(directory, packages)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(jars.split(",")))
        os.replace(tmp, target)
    except OSError:
        pass
