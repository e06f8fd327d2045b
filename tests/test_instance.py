"""One daemon per state folder: the instance lock."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from monitor.daemon.instance import InstanceLock, InstanceLocked, lock_paths
from tests.conftest import daemon_toml, encode, layer_image, wait_for_rows, write_config


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


def test_a_second_daemon_on_the_same_database_is_refused(tmp_path: Path,
                                                        tiny_weights: Path) -> None:
    """Two `pbf-monitor run` on one config with other ports: the second exits naming the lock
    and the first daemon's pid; the first goes on storing each layer once."""
    (tmp_path / "watch" / "B1").mkdir(parents=True)
    first_cfg = write_config(tmp_path / "config.toml", daemon_toml(tiny_weights))
    # Same folders and database, other endpoints: only the lock can stop it.
    second_cfg = write_config(tmp_path / "second.toml", daemon_toml(tiny_weights))
    log = tmp_path / "first.log"
    url = f"sqlite:///{tmp_path / 'state' / 'pbf-monitor.db'}"
    first = subprocess.Popen([sys.executable, "-m", "monitor", "run", "--config",
                              str(first_cfg)], stdout=subprocess.DEVNULL, stderr=log.open("ab"))
    try:
        (tmp_path / "watch" / "B1" / "layer_00001.png").write_bytes(encode(layer_image(1),
                                                                           ".png"))
        wait_for_rows(url, "SELECT id FROM layers", 1, proc=first, log=log)
        second = subprocess.run([sys.executable, "-m", "monitor", "run", "--config",
                                 str(second_cfg)], capture_output=True, text=True, timeout=120)
        assert second.returncode != 0, second.stderr
        assert "Traceback" not in second.stderr, second.stderr
        errors = [ln for ln in second.stderr.splitlines() if "error" in ln.lower()]
        assert len(errors) == 1, second.stderr
        assert "pbf-monitor.lock" in errors[0] and f"pid {first.pid}" in errors[0], errors[0]
        (tmp_path / "watch" / "B1" / "layer_00002.png").write_bytes(encode(layer_image(2),
                                                                           ".png"))
        rows = wait_for_rows(url, "SELECT layer, versions FROM layers ORDER BY layer", 2,
                             proc=first, log=log)
        assert [tuple(r) for r in rows] == [(1, 1), (2, 1)]
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(60)
    # The same run's log, start to stop: no alembic chatter, and a last line saying so.
    lines = log.read_text().splitlines()
    assert not [ln for ln in lines if " alembic" in ln], lines
    assert lines[-1].endswith("pbf-monitor stopped"), lines[-3:]
