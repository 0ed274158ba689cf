"""One running job of a kind per lake: the Spark-native data plane appends what is pending without a
MERGE, so two runs of the same job at once would both append the same ids. The second refuses at
once, naming the running one; a lock whose process is gone (a crash, a SIGKILL) is taken over.

The lock is a file `<lake>/.cai-locks/<job>.json`, created with O_EXCL (atomic on a local or NFS
folder); it names the host, pid, job run and start. On a cloud URI the job does not lock: run one
writer per job there (the orchestrator's concurrency limit of 1).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path


class JobLockedError(RuntimeError):
    """Another run of the same job is writing this lake."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's live process
        return True
    return True


def _holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):   # half-written by a crash between create and write: nobody holds it
        return {}


def _stale(holder: dict) -> bool:
    """A lock of this host whose process is gone, or an unreadable one. Another host's lock is never
    judged from here."""
    if not holder:
        return True
    return holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1)))


@contextlib.contextmanager
def job_lock(lake_root, job: str, job_run_id: str):
    """Hold the lake's lock for `job` while the block runs; JobLockedError if a live run holds it."""
    root = str(lake_root)
    if "://" in root:
        yield None
        return
    folder = Path(root) / ".cai-locks"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{job}.json"
    me = {"job": job, "job_run_id": job_run_id, "host": socket.gethostname(), "pid": os.getpid(),
          "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder is None:
                continue   # released between our create and our read
            if _stale(holder):
                path.unlink(missing_ok=True)
                continue
            raise JobLockedError(
                f"another `cai {job}` is writing lake {root}: job run {holder.get('job_run_id')} (pid "
                f"{holder.get('pid')} on {holder.get('host')}, started {holder.get('started_at')}). Fix: wait for "
                f"it to finish, then rerun: this run would only append what that one is writing. If that run is "
                f"gone from another host, remove {path}") from None
        with os.fdopen(fd, "w") as out:
            json.dump(me, out)
        break
    else:
        raise JobLockedError(f"could not take the lock {path}: it keeps changing hands. Fix: rerun")
    try:
        yield path
    finally:
        if _holder(path) == me:
            path.unlink(missing_ok=True)
