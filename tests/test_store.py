from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from monitor.errors import StoreError
from monitor.records import LayerRecord
from monitor.store import queries, writes
from monitor.store.connect import open_db
from monitor.store.schema import Build, ClassStat, ComponentRow, Layer, OutboxRow, SinkCursor
from monitor.store.writer import StoreWriter
from monitor.vision.stats import layer_stats


def record(layer: int, *, status: str = "ok", spots: int = 1) -> LayerRecord:
    masks = np.zeros((2, 20, 20), bool)
    for i in range(spots):
        masks[1, 2 * i, 2 * i] = True
    return LayerRecord(
        printer="", build="B", layer=layer, status=status,
        error=None if status == "ok" else "bad", image_path=f"/w/B/{layer}.png", image_size=10,
        image_mtime_ns=5, image_sha256="ab" * 32, model_sha256="cd" * 32, detected_at=1.0,
        processed_at=2.0, stats=layer_stats(masks, ["no_defect", "spatter"], pixel_size_mm=0.1)
        if status == "ok" else None,
    )


@pytest.fixture
def engine(tmp_path: Path):  # type: ignore[no-untyped-def]
    e = open_db(f"sqlite:///{tmp_path / 'db.sqlite'}")
    yield e
    e.dispose()


def test_sqlite_settings(tmp_path: Path, engine) -> None:  # type: ignore[no-untyped-def]
    with engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL


def test_same_layer_again_replaces_it(engine) -> None:  # type: ignore[no-untyped-def]
    with Session(engine) as s, s.begin():
        assert writes.put_layer(s, record(1, spots=3))[1] is False
    with Session(engine) as s, s.begin():
        assert writes.put_layer(s, record(1, spots=2))[1] is True
    with Session(engine) as s:
        layers = s.scalars(select(Layer)).all()
        assert [(r.layer, r.versions) for r in layers] == [(1, 2)]
        assert s.scalar(select(func.count()).select_from(ComponentRow)) == 2
        assert s.scalar(select(func.count()).select_from(ClassStat)) == 2


def test_outbox_seq_and_pending(engine) -> None:  # type: ignore[no-untyped-def]
    with Session(engine) as s, s.begin():
        out = writes.put_outbox(s, [("layer", {"a": 1}), ("alarm", {"b": 2})])
    assert [o.seq for o in out] == [1, 2]
    with Session(engine) as s, s.begin():
        writes.mark_published(s, [1])
    with Session(engine) as s:
        assert [o.seq for o in queries.pending_outbox(s)] == [2]
        assert queries.last_seq(s) == 2


def test_present_follows_the_outbox(engine) -> None:  # type: ignore[no-untyped-def]
    """Each printer's last layer and each alarm until it clears: what the plant sinks show
    at start."""
    def alarm(i: int, state: str, **extra: object) -> tuple[str, dict[str, object]]:
        return ("alarm", {"id": i, "printer": "", "state": state, **extra})

    steps: list[list[tuple[str, dict[str, object]]]] = [
        [("layer", {"printer": "", "layer": 1}), alarm(1, "open")],            # seq 1, 2
        [("layer", {"printer": "p2", "layer": 7}), alarm(2, "open")],          # 3, 4
        [("layer", {"printer": "", "layer": 2}), alarm(1, "acknowledged")],    # 5, 6
        [alarm(2, "cleared"), alarm(0, "open", test=True)],                    # 7, 8
    ]
    for msgs in steps:
        with Session(engine) as s, s.begin():
            writes.put_outbox(s, msgs)
    with Session(engine) as s:
        present = queries.present(s)
    assert present.seq == 8
    assert [(m.seq, m.topic, m.payload.get("layer", m.payload.get("state")))
            for m in present.messages] == [(3, "layer", 7), (5, "layer", 2),
                                           (6, "alarm", "acknowledged")]


@pytest.mark.parametrize(("stored", "enabled", "cursors", "kept_from", "dropped"), [
    # no plant sink: the newest `keep` (5) and the present are kept
    ({}, [], {}, 16, []),
    # MQTT behind at 8: nothing after it goes; a sink without a cursor starts where ZeroMQ is
    ({"mqtt": 8}, ["mqtt", "opcua"], {"mqtt": 8, "opcua": 20}, 9, []),
    # OPC UA off and pruned past: its cursor goes, so switched on again it starts afresh
    ({"mqtt": 18, "opcua": 3}, ["mqtt"], {"mqtt": 18}, 16, ["opcua"]),
    # off but not pruned past: kept for when it is switched on again
    ({"mqtt": 18, "opcua": 17}, ["mqtt"], {"mqtt": 18}, 16, []),
])
def test_outbox_at_start_is_pruned_to_what_sinks_need(  # type: ignore[no-untyped-def]
        engine, stored: dict[str, int], enabled: list[str], cursors: dict[str, int],
        kept_from: int, dropped: list[str]) -> None:
    with Session(engine) as s, s.begin():
        writes.put_outbox(s, [("layer", {"printer": "", "layer": n}) if n != 2 else
                              ("alarm", {"id": 1, "printer": "", "state": "open"})
                              for n in range(1, 21)])
        writes.mark_published(s, list(range(1, 21)))
        s.add_all(SinkCursor(name=n, seq=c, updated_at=0.0) for n, c in stored.items())
    with Session(engine) as s, s.begin():
        start = writes.open_outbox(s, enabled, keep=5)
    assert (start.last_seq, start.pending, start.cursors) == (20, [], cursors)
    assert [m.seq for m in start.present.messages] == [2, 20]  # the open alarm, last layer
    assert {n: [m.seq for m in b] for n, b in start.backlog.items()} == {
        n: list(range(c + 1, 21)) for n, c in cursors.items()}
    with Session(engine) as s:
        assert s.scalars(select(OutboxRow.seq)).all() == [2, *range(kept_from, 21)]
        left = {n: c for n, c in s.execute(select(SinkCursor.name, SinkCursor.seq))}
    assert left == {**{n: c for n, c in stored.items() if n not in dropped}, **cursors}


def test_sink_cursors_only_move_forward(engine) -> None:  # type: ignore[no-untyped-def]
    with Session(engine) as s, s.begin():
        writes.put_outbox(s, [("layer", {"printer": "", "layer": 1})])
        writes.mark_published(s, [1])
        assert writes.open_outbox(s, ["mqtt"]).cursors == {"mqtt": 1}
    for seq in (5, 3):  # a late write of an older cursor changes nothing
        with Session(engine) as s, s.begin():
            writes.set_cursors(s, {"mqtt": seq})
    with Session(engine) as s:
        assert s.get(SinkCursor, "mqtt").seq == 5  # type: ignore[union-attr]


def test_reader_reads_while_writer_holds_a_transaction(tmp_path: Path, engine) -> None:  # type: ignore[no-untyped-def]
    with Session(engine) as s, s.begin():
        writes.put_layer(s, record(1))
    reader = open_db(f"sqlite:///{tmp_path / 'db.sqlite'}", writer=False)
    with Session(engine) as w, w.begin():
        writes.put_layer(w, record(2))  # uncommitted, write lock held
        with Session(reader) as r:
            assert [x.layer for x in queries.build_layers(r, "B")] == [1]
    with Session(reader) as r:
        assert [x.layer for x in queries.build_layers(r, "B")] == [1, 2]
        with pytest.raises(Exception, match="readonly"):
            r.execute(Layer.__table__.delete())
    reader.dispose()


def test_writer_retries_while_the_database_is_locked(tmp_path: Path, engine) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "db.sqlite"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("PRAGMA busy_timeout = 0")
    other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    writer = StoreWriter(engine)
    writer.start()
    done = threading.Event()
    writer.submit(lambda s: writes.put_layer(s, record(7)), lambda _: done.set())
    try:
        assert not done.wait(1.0)  # waiting on the lock, not dropping the layer
        other.execute("COMMIT")
        assert done.wait(40)
    finally:
        other.close()
        writer.stop()
    with Session(engine) as s:
        assert [x.layer for x in queries.build_layers(s, "B")] == [7]


def test_unwritable_location(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="state directory"):
        open_db(f"sqlite:///{blocker / 'sub' / 'db.sqlite'}")


def test_older_schema_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:  # a layers table from before tracks existed
        conn.execute("CREATE TABLE components (id INTEGER PRIMARY KEY, layer_id INTEGER, "
                     "class_name TEXT, x INTEGER, y INTEGER, w INTEGER, h INTEGER, "
                     "area_px INTEGER, cx REAL, cy REAL)")
    with pytest.raises(StoreError, match="tables but no schema revision"):
        open_db(f"sqlite:///{db}")


def test_maps_are_stored_and_pruned_by_age_statistics_stay(engine) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    from monitor.reports.maps import encode_map

    masks = np.zeros((6, 64, 64), bool)
    masks[2, 10:20, 10:20] = True
    m = encode_map(np.zeros((64, 64), np.float32), masks)
    with Session(engine) as s, s.begin():
        for n, age_days in ((1, 200.0), (2, 1.0)):
            rec = replace(record(n), classes=("a",) * 6,
                          processed_at=1_000_000_000.0 - age_days * 86400)
            writes.put_layer(s, rec)
            writes.put_map(s, rec, m)
    with Session(engine) as s, s.begin():
        bid = s.scalar(select(Build.id))
        assert sorted(queries.layer_maps(s, bid)) == [1, 2]
        assert writes.prune_maps(s, older_than=1_000_000_000.0 - 180 * 86400) == 1
    with Session(engine) as s:
        assert sorted(queries.layer_maps(s, bid)) == [2]
        assert s.scalar(select(func.count(Layer.id))) == 2  # the layers themselves stay


def test_oldest_maps_go_first_when_space_is_short(engine) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    from monitor.reports.maps import encode_map

    m = encode_map(np.zeros((32, 32), np.float32), np.zeros((6, 32, 32), bool))
    with Session(engine) as s, s.begin():
        for n in range(1, 21):
            rec = replace(record(n), classes=("a",) * 6, processed_at=float(n))
            writes.put_layer(s, rec)
            writes.put_map(s, rec, m)
    with Session(engine) as s, s.begin():
        assert writes.prune_oldest_maps(s, fraction=0.1) == 2
        bid = s.scalar(select(Build.id))
        assert min(queries.layer_maps(s, bid)) == 3
