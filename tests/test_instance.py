"""One daemon per state folder: the instance lock."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from monitor.daemon.instance import InstanceLock, InstanceLocked, lock_paths


def test_second_holder_is_refused_and_named(tmp_path: Path) -> None:
    first = InstanceLock(lock_paths(tmp_path, ""))
    first.acquire()
    # Another process: flock is per open file, so a second process is the real case.
    code = ("import sys; from pathlib import Path; "
            "from monitor.daemon.instance import InstanceLock, lock_paths; "
            f"InstanceLock(lock_paths(Path({str(tmp_path)!r}), '')).acquire()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0
    assert "another pbf-monitor daemon holds this lock" in r.stderr
    assert "pid " in r.stderr
    first.release()
    first.release()  # idempotent
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    code = ("import os; from pathlib import Path; "
            "from monitor.daemon.instance import InstanceLock, lock_paths; "
            f"InstanceLock(lock_paths(Path({str(tmp_path)!r}), '')).acquire(); os._exit(0)")
    subprocess.run([sys.executable, "-c", code], check=True)
    lock = InstanceLock(lock_paths(tmp_path, ""))
    lock.acquire()
    lock.release()


def test_sqlite_database_elsewhere_is_locked_too(tmp_path: Path) -> None:
    db = tmp_path / "db" / "x.db"
    db.parent.mkdir()
    paths = lock_paths(tmp_path / "state", f"sqlite:///{db}")
    assert paths[1] == db.with_name("x.db.lock")
    (tmp_path / "state").mkdir()
    a = InstanceLock([paths[1]])
    a.acquire()
    with pytest.raises(InstanceLocked):
        # same process, new open file description: flock still conflicts
        InstanceLock(paths).acquire()
    a.release()
