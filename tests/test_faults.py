"""Faults around the database on the real daemon: a write lock held by another process, a
full state disk, and a write the database refuses outright. In each, every layer ends up
stored exactly once with one message, and the daemon goes on."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from tests.test_alarm_daemon import NO_RULES, Rig, bright_weights, rig  # noqa: F401 (fixtures)


def _rows(r: Rig) -> list[tuple[int, str, int]]:
    engine = create_engine(r.cfg.store_url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT layer, status, versions FROM layers ORDER BY layer"))
        out = [tuple(row) for row in rows]
    engine.dispose()
    return out  # type: ignore[return-value]


def _heartbeats(r: Rig) -> list[dict[str, Any]]:
    assert r.listener is not None
    return [p for t, p in r.listener.messages if t == "heartbeat"]


def _one_message_each(r: Rig, layers: range) -> dict[int, dict[str, Any]]:
    assert r.listener is not None
    got = r.listener.layers()
    assert {n: len(got.get(n, [])) for n in layers} == {n: 1 for n in layers}
    return {n: got[n][0] for n in layers}


def test_database_locked_for_30_s(rig: Callable[..., Rig]) -> None:  # noqa: F811
    """Another process holds the write lock for longer than SQLite's own 30 s busy wait: the
    layers wait, the heartbeat says why, and they are stored once the lock goes."""
    r = rig(NO_RULES)
    r.write(1)
    db = r.cfg.store_url.split("///", 1)[1]
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # the write lock; readers go on (WAL)
    try:
        for n in (2, 3, 4):
            r.write(n, (10, 10, 8, 8), wait=False)
        assert r.listener is not None
        r.listener.wait(lambda: "locked" in _heartbeats(r)[-1]["store"])
        assert [row[0] for row in _rows(r)] == [1]  # nothing written behind the lock
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert r.listener is not None
    listener = r.listener
    listener.wait(lambda: {2, 3, 4} <= set(listener.layers()))
    assert [m["status"] for m in _one_message_each(r, range(1, 5)).values()] == ["ok"] * 4
    assert _rows(r) == [(n, "ok", 1) for n in range(1, 5)]
    listener.wait(lambda: _heartbeats(r)[-1]["store"] == "ok")


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A 16 MB tmpfs as the state folder (needs root, as CI has)."""
    state = tmp_path / "state"
    state.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(state)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    yield state
    subprocess.run(["umount", "-l", str(state)], check=True)


def test_state_disk_full(tmp_path: Path, bright_weights: Path,  # noqa: F811
                         small_disk: Path) -> None:
    """The state disk fills up: a clear error in the heartbeat and log, the daemon goes on,
    and the layers that arrived meanwhile are stored once space returns."""
    r = Rig(tmp_path, bright_weights, NO_RULES)
    r.start()
    try:
        r.write(1)
        filler = small_disk / "filler"
        chunk = b"\0" * (1 << 16)
        # Unbuffered: a partly written chunk must not wait in a buffer and fail again on
        # close (it did, outside this try, when the daemon wrote at the same moment).
        with filler.open("wb", buffering=0) as f:
            try:
                while True:
                    f.write(chunk)
            except OSError:
                pass  # ENOSPC: the disk is full
        assert shutil.disk_usage(small_disk).free < len(chunk)
        for n in (2, 3, 4):
            r.write(n, (10, 10, 8, 8), wait=False)
        assert r.listener is not None
        r.listener.wait(lambda: "disk is full" in _heartbeats(r)[-1]["store"])
        assert [row[0] for row in _rows(r)] == [1]
        filler.unlink()  # space returns
        assert r.listener is not None
        listener = r.listener
        listener.wait(lambda: {2, 3, 4} <= set(listener.layers()), timeout=90)
        assert [m["status"] for m in _one_message_each(r, range(1, 5)).values()] == ["ok"] * 4
        assert _rows(r) == [(n, "ok", 1) for n in range(1, 5)]
        r.write(5)  # and it goes on
    finally:
        r.stop()


def test_write_the_database_refuses_is_stored_as_an_error_layer(
        rig: Callable[..., Rig]) -> None:  # noqa: F811
    """A failure retrying cannot cure (here a trigger that rejects layer 3's statistics, as
    a schema mismatch or a constraint would): layer 3 is stored as an error with the reason,
    instead of vanishing into a log, and the next layers are fine."""
    r = rig(NO_RULES)
    r.write(1)
    db = r.cfg.store_url.split("///", 1)[1]
    conn = sqlite3.connect(db)
    conn.execute("""CREATE TRIGGER reject_layer_3 BEFORE INSERT ON class_stats
                    WHEN (SELECT layer FROM layers WHERE id = NEW.layer_id) = 3
                    BEGIN SELECT RAISE(ABORT, 'rejected by the test'); END""")
    conn.commit()
    conn.close()
    for n in (2, 3, 4):
        r.write(n, (10, 10, 8, 8))
    msgs = _one_message_each(r, range(1, 5))
    assert [msgs[n]["status"] for n in (1, 2, 3, 4)] == ["ok", "ok", "error", "ok"]
    assert "could not store" in msgs[3]["error"] and "rejected by the test" in msgs[3]["error"]
    assert _rows(r) == [(1, "ok", 1), (2, "ok", 1), (3, "error", 1), (4, "ok", 1)]


def test_weights_replaced_while_running(tmp_path: Path, bright_weights: Path,  # noqa: F811
                                        caplog: pytest.LogCaptureFixture) -> None:
    """New weights on disk are only logged until a reload; a reload while the file is still
    being copied is refused and the running model goes on; a complete file is taken whole.
    Every layer says which model made it."""
    from monitor.config import load_config
    from monitor.errors import WeightsError
    from tests.conftest import make_weights

    weights = tmp_path / "model.safetensors"
    shutil.copy(bright_weights, weights)
    blind = make_weights(tmp_path / "blind.safetensors", constant_prob={}).read_bytes()
    r = Rig(tmp_path, weights, NO_RULES)
    r.start()
    box = (10, 10, 20, 20)
    try:
        assert r.daemon.segmenter is not None
        old = r.daemon.segmenter.info.sha256
        r.write(1, box)
        staged = tmp_path / ".model.tmp"
        staged.write_bytes(blind)
        staged.replace(weights)  # on disk, atomically; the daemon has not been told
        r.write(2, box)
        assert "changed on disk; still serving model" in caplog.text
        weights.write_bytes(blind[: len(blind) // 2])  # a copy in progress
        with pytest.raises(WeightsError, match="incomplete"):
            r.daemon.reload(load_config(r.config))
        r.write(3, box)
        other = make_weights(tmp_path / "other.safetensors", classes=("a", "b"))
        shutil.copy(other, weights)
        with pytest.raises(WeightsError, match="classes a, b differ"):
            r.daemon.reload(load_config(r.config))
        r.write(4, box)
        weights.write_bytes(blind)
        assert r.daemon.reload(load_config(r.config)) == []
        r.write(5, box)
    finally:
        r.stop()
    assert r.listener is not None
    msgs = {n: m[0] for n, m in r.listener.layers().items()}
    new = hashlib.sha256(blind).hexdigest()
    assert {n: m["model_sha256"] for n, m in msgs.items()} == {
        1: old, 2: old, 3: old, 4: old, 5: new}
    assert [msgs[n]["classes"]["swelling"]["pixel_count"] for n in range(1, 6)] == [
        400, 400, 400, 400, 0]
