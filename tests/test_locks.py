"""The lake lock is held by the kernel (`fcntl.flock`): another process is refused, naming the running job;
the file's content decides nothing; a killed holder frees it at once; two takers never both hold it."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from cai_lib.lake.locks import JobLockedError, job_lock, upkeep_lock

HOLD = textwrap.dedent("""
    import sys, time
    from cai_lib.lake.locks import job_lock
    with job_lock(sys.argv[1], sys.argv[2], sys.argv[3]):
        print("held", flush=True)
        time.sleep(60)
""")


def holding(lake, job="sl-generate", run_id="run-1") -> subprocess.Popen:
    """A process that holds `job`'s lock of `lake` until killed (returned once it holds it)."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(lake), job, run_id], stdout=subprocess.PIPE, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.stdout.readline() == "held\n"
    return p


def stop(p: subprocess.Popen) -> None:
    p.kill()
    p.wait()


def test_a_second_holder_in_another_process_is_refused_naming_the_running_job(tmp_path):
    p = holding(tmp_path)
    try:
        with pytest.raises(JobLockedError, match=rf"^another `cai sl-generate` is writing lake {tmp_path}: job run "
                                                 rf"run-1 \(pid {p.pid} on .*started .*\)\. Fix: wait for it to finish, "
                                                 r"then rerun: this run would only append what that one is writing$"):
            with job_lock(tmp_path, "sl-generate", "run-2"):
                pass
        with job_lock(tmp_path, "label", "run-3"):   # another job's lock is its own
            pass
    finally:
        stop(p)


def test_a_killed_holder_frees_the_lock_at_once(tmp_path):
    p = holding(tmp_path)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    lock = tmp_path / ".cai-locks" / "sl-generate.json"
    assert json.loads(lock.read_text())["pid"] == p.pid   # the dead run's details are still there
    with job_lock(tmp_path, "sl-generate", "run-2") as path:
        assert json.loads(path.read_text())["job_run_id"] == "run-2"
    assert not lock.exists()   # its holder removes it on release


def test_an_empty_lock_file_decides_nothing(tmp_path):
    lock = tmp_path / ".cai-locks" / "sl-generate.json"
    lock.parent.mkdir()
    lock.write_text("")   # a crash between create and write
    with job_lock(tmp_path, "sl-generate", "run-1"):   # nobody holds it: not blocked
        lock.write_text('{"job": "sl-gen')   # half-written while held: still held
        with pytest.raises(JobLockedError, match=r"another `cai sl-generate` is writing lake .* \(it has not "
                                                 r"written its details yet\)"):
            with job_lock(tmp_path, "sl-generate", "run-2"):
                pass


def _race(root: str, start, held, out) -> None:
    start.wait()
    try:
        with job_lock(root, "sl-generate", f"run-{os.getpid()}"):
            held.set()
            out.put("held")
            start.wait()   # hold until every taker has tried
    except JobLockedError:
        out.put("refused")
        start.wait()


def test_two_takeovers_at_once_cannot_both_hold_it(tmp_path):
    """Four processes take a lock a killed run left behind, at the same moment: exactly one holds it."""
    p = holding(tmp_path)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    ctx = multiprocessing.get_context("fork")
    start, held, out = ctx.Barrier(4), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), start, held, out)) for _ in range(4)]
    for q in procs:
        q.start()
    got = sorted(out.get(timeout=30) for _ in procs)
    for q in procs:
        q.join(30)
    assert got == ["held", "refused", "refused", "refused"]


def test_a_taker_that_opened_the_file_before_its_release_cannot_hold_it_beside_a_new_holder(tmp_path, monkeypatch):
    """B opens the lock file, A releases it (unlinking it), C takes a new one; B's flock on the old file
    then succeeds, but B must see it is no longer the file at the path and retry: refused while C holds."""
    with job_lock(tmp_path, "label", "run-a") as path:
        stale = os.open(path, os.O_RDWR)   # B's open, before A's release
    with job_lock(tmp_path, "label", "run-c"):
        real_open, opened = os.open, []

        def b_open(*args, **kwargs):   # B's first open returns the fd it had before the release
            opened.append(args[0])
            return stale if len(opened) == 1 else real_open(*args, **kwargs)

        monkeypatch.setattr(os, "open", b_open)
        with pytest.raises(JobLockedError, match="job run run-c"):
            with job_lock(tmp_path, "label", "run-b"):
                pass
        monkeypatch.undo()
        assert len(opened) == 2   # it retried on the file now at the path


def test_upkeep_is_refused_while_a_job_runs_and_a_job_while_upkeep_runs(tmp_path):
    p = holding(tmp_path, "label", "run-7")
    try:
        with pytest.raises(JobLockedError, match=rf"another `cai label` is writing lake {tmp_path}: job run run-7 "
                                                 r".*Fix: wait for it to finish, then rerun \(`cai lake optimize` "
                                                 r"beside a running job could remove files its appends are writing\)$"):
            with upkeep_lock(tmp_path, "upkeep-1"):
                pass
        assert sorted(x.name for x in (tmp_path / ".cai-locks").iterdir()) == ["label.json"]   # none left taken
    finally:
        stop(p)
    with upkeep_lock(tmp_path, "upkeep-2"):
        with pytest.raises(JobLockedError, match=r"another `cai lake optimize` is writing lake .*job run upkeep-2 "
                                                 r".*Fix: wait for it to finish, then rerun \(lake upkeep compacts "
                                                 r"and vacuums the files a job would be appending to\)$"):
            with job_lock(tmp_path, "label", "run-8"):
                pass


def test_a_cloud_lake_is_not_locked_and_says_so(tmp_path, capsys):
    for root in ("s3://bucket/lake", "/Volumes/main/cai/lake"):
        with job_lock(root, "label", "run-1") as held:
            assert held is None
    err = capsys.readouterr().err.splitlines()
    assert err == [f"cai label: lake {r} cannot be locked (no local file lock holds there): a second run at once "
                   "would repeat its work, and the idempotent appends keep every event once"
                   for r in ("s3://bucket/lake", "/Volumes/main/cai/lake")]
