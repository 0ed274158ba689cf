"""One running job of a kind per lake, held by the kernel: a second run refuses at once, naming the
running one, instead of making the model calls that run is already making.

The lock is `fcntl.flock(LOCK_EX | LOCK_NB)` on the open file `<lake>/.cai-locks/<job>.json`. The kernel
holds it for the open file and drops it when the holder closes it or dies (a crash, a SIGKILL, an OOM
kill), so there is no staleness to guess: no pid check, no hostname check, and nobody ever unlinks a lock
another run holds. The file's content (job, run id, host, pid, start) is written after the lock is held
and only names the holder in the refusal; an empty or half-written file decides nothing.

The holder unlinks the file while it still holds the lock, and a taker checks after locking that the
file it locked is still the one at the path (same inode), else it retries: so two takers racing a
release can never hold two different files under one name.

Exactly-once does not rest on this lock (see `spark_delta.idempotent_append`): the lock only saves
duplicate model calls. Where a local flock cannot hold, the job says so on stderr and runs unlocked:
cloud URIs (`s3://`, `abfss://`, `gs://`, `dbfs:/`) have no file to lock, and `/Volumes/` on
Databricks is a FUSE view of cloud storage whose flock is local to one driver. NFS is not relied on
across hosts either: Linux emulates flock there with NFS byte-range locks, which hold only where the
server's lock manager is up and are silently local with `nolock` / `local_lock` mounts.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path

from cai_lib.lake.tables import is_uri

# where a local flock cannot hold, besides a URI (s3://, dbfs:/...): Databricks' FUSE mounts of shared storage.
# The idempotent appends carry exactly-once alone there
UNLOCKABLE = ("/Volumes/", "/dbfs/")
# the jobs that hold a lock while they append (the Spark plane's model jobs); upkeep holds them all
LOCKED_JOBS = ("sl-generate", "sample-pairs", "label", "eval-labeler", "evaluate")
UPKEEP = "lake optimize"


class JobLockedError(RuntimeError):
    """Another run of the same job is writing this lake."""


def unlockable(root: str) -> bool:
    """Whether a local flock cannot guard `root`.

    >>> unlockable("s3://b/lake"), unlockable("/Volumes/main/cai/lake"), unlockable("dbfs:/lake"), unlockable("/tmp/l")
    (True, True, True, False)
    """
    return is_uri(root) or root.startswith(UNLOCKABLE)


def holder_of(path: Path) -> dict:
    """The holder's details written in the lock file ({} if empty, half-written or gone)."""
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _take(path: Path) -> int | None:
    """An fd holding the flock on the file now at `path`, or None when a live run holds it."""
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                return None
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)   # locked a file its holder unlinked on release: take the one at the path now


def refusal(root: str, job: str, path: Path, who: str) -> JobLockedError:
    """The refusal of `who` (a job, or `lake optimize`), naming the run that holds `job`'s lock."""
    h = holder_of(path)
    holder = (f"`cai {h.get('job', job)}` is writing lake {root}: job run {h.get('job_run_id')} (pid {h.get('pid')} "
              f"on {h.get('host')}, started {h.get('started_at')})" if h else
              f"`cai {job}` is writing lake {root} (it has not written its details yet)")
    running = h.get("job", job)
    why = (": this run would only append what that one is writing" if who == running else
           f" (`cai {UPKEEP}` beside a running job could remove files its appends are writing)" if who == UPKEEP else
           " (lake upkeep compacts and vacuums the files a job would be appending to)")
    return JobLockedError(f"another {holder}. Fix: wait for it to finish, then rerun{why}")


@contextlib.contextmanager
def job_lock(lake_root, job: str, job_run_id: str, who: str | None = None):
    """Hold the lake's lock for `job` while the block runs, as `who` (default: the job itself; upkeep
    holds every job's lock); JobLockedError, naming the holder, if a live run holds it."""
    root, who = str(lake_root), who or job
    if unlockable(root):
        print(f"cai {who}: lake {root} cannot be locked (no local file lock holds there): a second run at once "
              "would repeat its work, and the idempotent appends keep every event once", file=sys.stderr)
        yield None
        return
    folder = Path(root) / ".cai-locks"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{job}.json"
    fd = _take(path)
    if fd is None:
        raise refusal(root, job, path, who)
    try:
        me = {"job": who, "job_run_id": job_run_id, "host": socket.gethostname(), "pid": os.getpid(),
              "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                path.unlink()   # still ours (we hold its flock): unlinked before the kernel lets anyone in
        os.close(fd)


@contextlib.contextmanager
def upkeep_lock(lake_root, job_run_id: str):
    """Every locking job's lock of the lake at once, for lake upkeep: refused, naming the job, while
    any of them runs; and while upkeep holds them, each job is refused, naming `cai lake optimize`."""
    root = str(lake_root)
    if unlockable(root):
        with job_lock(root, LOCKED_JOBS[0], job_run_id, UPKEEP):   # says once that it cannot lock
            yield None
        return
    with contextlib.ExitStack() as stack:
        for job in LOCKED_JOBS:
            stack.enter_context(job_lock(root, job, job_run_id, UPKEEP))
        yield Path(root) / ".cai-locks"
