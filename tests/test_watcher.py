"""The settler with a real watchdog observer on a temp folder."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import time
from collections.abc import Iterator
from pathlib import Path, PurePath

import pytest

from monitor.config import WatchConfig
from monitor.daemon.watcher import Candidate, LayerKey, Settler, parse_layer_path


@pytest.mark.parametrize(
    ("rel", "pattern", "expected"),
    [
        ("B7/layer_00042.png", None, LayerKey("B7", 42)),
        ("B7/sub/2024-01-01_L0003.tif", None, LayerKey("B7", 3)),
        ("layer12.png", None, LayerKey("default", 12)),
        ("B7/photo.png", None, None),
        ("SI3773JOB17_0042.png", r"^SI3773(?P<build>\w+?)_(?P<layer>\d+)\.\w+$",
         LayerKey("JOB17", 42)),
        ("other.png", r"^SI3773(?P<build>\w+?)_(?P<layer>\d+)\.\w+$", None),
    ],
)
def test_parse_layer_path(rel: str, pattern: str | None, expected: LayerKey | None) -> None:
    assert parse_layer_path(PurePath(rel), re.compile(pattern) if pattern else None) == expected


def make(tmp_path: Path, **over: object) -> tuple[Settler, queue.Queue[Candidate], dict]:
    known: dict[str, tuple[int | None, int | None]] = {}
    cfg = WatchConfig.model_validate(
        {"dir": tmp_path, "settle_s": 0.6, "rescan_interval_s": 0, **over})
    q: queue.Queue[Candidate] = queue.Queue()
    return Settler(cfg, q, known=lambda: dict(known)), q, known


@pytest.fixture
def settler(tmp_path: Path) -> Iterator[tuple[Settler, queue.Queue[Candidate], dict]]:
    s, q, known = make(tmp_path)
    s.start()
    yield s, q, known
    s.stop()


def drain(q: queue.Queue[Candidate], wait: float) -> list[Candidate]:
    out = []
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty):
            out.append(q.get(timeout=0.05))
    return out


def test_closed_file_is_ready_before_settle_time(tmp_path: Path) -> None:
    # settle_s is far beyond the wait below, so only the close-after-write event can hand
    # the file over (no wall-clock assertion needed).
    # The folder exists before the watch starts: a file in a folder created later may land
    # before that folder's watch is armed, and is then found by a scan and settles instead.
    (tmp_path / "b").mkdir()
    s, q, _ = make(tmp_path, settle_s=120)
    s.start()
    try:
        (tmp_path / "b" / "layer_1.png").write_bytes(b"x" * 100)
        cand = q.get(timeout=10)
        assert cand.key == LayerKey("b", 1)
        assert drain(q, 1.0) == []  # exactly once
    finally:
        s.stop()


def test_open_file_waits_until_settled(tmp_path: Path, settler: tuple) -> None:
    _, q, _ = settler
    path = tmp_path / "layer_2.png"
    with path.open("wb") as f:
        for _ in range(4):
            f.write(b"x" * 50)
            f.flush()
            time.sleep(0.3)
            assert q.empty()  # still growing: never handed over early
        got = q.get(timeout=5)  # settled while still open
    assert got.path == path
    assert drain(q, 1.0) == []  # the late close event is not a second layer


def test_rename_into_place_and_ignored_names(tmp_path: Path, settler: tuple) -> None:
    _, q, _ = settler
    hidden = tmp_path / ".layer_3.png.tmp"
    hidden.write_bytes(b"data")
    (tmp_path / "notes.txt").write_text("layer 4")
    (tmp_path / "no_number.png").write_bytes(b"x")
    hidden.rename(tmp_path / "layer_3.png")
    got = drain(q, 1.5)
    assert [c.key for c in got] == [LayerKey("default", 3)]


def test_rescan_finds_unrecorded_files_in_order(tmp_path: Path) -> None:
    b = tmp_path / "B"
    b.mkdir()
    for n in (3, 1, 2, 10):
        (b / f"layer_{n}.png").write_bytes(b"x" * n)
    old = time.time() - 60
    for p in b.iterdir():
        os.utime(p, (old, old))
    s, q, known = make(tmp_path)
    known[str(b / "layer_2.png")] = (2, (b / "layer_2.png").stat().st_mtime_ns)
    s.start()
    try:
        got = drain(q, 1.5)
    finally:
        s.stop()
    assert [c.key.layer for c in got] == [1, 3, 10]


def test_new_subfolder_files_are_seen(tmp_path: Path, settler: tuple) -> None:
    _, q, _ = settler
    # Created and filled faster than the recursive watch on the new folder is armed.
    staging = tmp_path.parent / f"{tmp_path.name}-staging"
    staging.mkdir()
    (staging / "layer_5.png").write_bytes(b"x")
    staging.rename(tmp_path / "B9")
    got = drain(q, 2.0)
    assert [c.key for c in got] == [LayerKey("B9", 5)]


def test_polling_observer(tmp_path: Path) -> None:
    s, q, _ = make(tmp_path, polling=True, poll_interval_s=0.1)
    s.start()
    try:
        (tmp_path / "layer_7.png").write_bytes(b"x")
        got = drain(q, 2.5)
    finally:
        s.stop()
    assert [c.key.layer for c in got] == [7]


def test_late_events_for_a_file_handed_over_then_gone(tmp_path: Path, settler: tuple) -> None:
    """A layer handed over and then deleted: a late event about it is not a second layer (a
    second outcome would be a 'replaced' error); the same name written again later is."""
    s, q, _ = settler
    path = tmp_path / "layer_5.png"
    path.write_bytes(b"x" * 100)
    (first,) = drain(q, 1.5)
    s.done(first, (100, path.stat().st_mtime_ns))
    path.unlink()
    s.notify("changed", str(path))  # as a late inotify event would
    assert drain(q, 1.5) == []
    path.write_bytes(b"y" * 50)
    assert [c.path for c in drain(q, 1.5)] == [path]
