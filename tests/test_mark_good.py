"""Builds marked good and what `pbf-monitor adapt` reads: the 0004 migration, mark_good,
good_builds, adapt_layers, verdict_alarms, and `pbf-monitor mark-good` straight into the
database and through a running daemon's state endpoint. A real SQLite file throughout."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from alembic import command
from click.testing import CliRunner, Result
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from monitor.cli import main
from monitor.config import Config, load_config
from monitor.errors import StoreError, UnknownBuild
from monitor.records import AdaptLayer, AlarmEvent, GoodBuild, LayerRecord
from monitor.store import migrate, queries, writes
from monitor.store.connect import make_engine, open_db
from monitor.store.queries import adapt_layers, good_builds, verdict_alarms
from monitor.store.writes import mark_good
from monitor.vision.stats import layer_stats
from tests.conftest import free_endpoint, write_config

CLASSES = ["no_defect", "spatter", "swelling"]


def _masks() -> np.ndarray:
    """20x20 px: spatter in a 4x4 blob at (2, 2) and a 2x2 one at (10, 10)."""
    m = np.zeros((len(CLASSES), 20, 20), bool)
    m[1, 2:6, 2:6] = True
    m[1, 10:12, 10:12] = True
    return m


def _layer(s: Session, printer: str, build: str, n: int, *, status: str = "ok",
           track: int | None = None) -> int:
    """One layer as the daemon stores it; `track` goes to the largest spatter component."""
    ok = status == "ok"
    bid, _ = writes.put_layer(s, LayerRecord(
        printer=printer, build=build, layer=n, status=status,
        error=None if ok else "truncated PNG",
        image_path=f"/cam/{printer or 'one'}/{build}/{n}.png",
        image_size=1, image_mtime_ns=1, image_sha256=f"sha{n}" if ok else None,
        model_sha256="m", detected_at=0, processed_at=0,
        stats=layer_stats(_masks(), CLASSES, pixel_size_mm=0.1) if ok else None),
        tracks={("spatter", 0): track} if track is not None else None)
    return bid


def _alarm(s: Session, bid: int, printer: str, build: str, layer: int, class_name: str,
           rule: str, *, verdict: str | None = None, note: str | None = None,
           **kw: Any) -> int:
    ev = AlarmEvent("open", printer, build, layer, class_name, rule, "warning", 1.0, 0.5, **kw)
    (rec,) = writes.apply_alarm(s, bid, ev, now=1.0)
    if verdict is not None:
        writes.set_verdict(s, rec.id, verdict, note, now=2.0)
    return rec.id


@pytest.fixture
def db(tmp_path: Path) -> Iterator[tuple[Path, Config, Engine]]:
    """A config and its database: B1 (layers 1, 2 ok, 3 an error) and B2 (layer 1) on the
    single printer, B1 again on printer "p2"; alarms with and without verdicts."""
    path = write_config(tmp_path / "c.toml", '[store]\nstate_dir = "state"\n')
    cfg = load_config(path)
    engine = open_db(cfg.store_url)
    with Session(engine) as s, s.begin():
        b1 = _layer(s, "", "B1", 1)
        _layer(s, "", "B1", 2, track=7)
        _layer(s, "", "B1", 3, status="error")
        _layer(s, "", "B2", 1)
        p2 = _layer(s, "p2", "B1", 1)
        _alarm(s, b1, "", "B1", 2, "spatter", "spatter.area_mm2", verdict="confirmed",
               note="real spatter", position_mm=(0.35, 0.35), part=4, unit="mm²")
        _alarm(s, b1, "", "B1", 2, "spatter", "track.spatter", verdict="false_alarm",
               track=7, position_mm=(0.4, 0.4))
        _alarm(s, b1, "", "B1", 1, "", "part_missing.part3", verdict="false_alarm",
               note="part removed on purpose", part=3)
        _alarm(s, b1, "", "B1", 2, "swelling", "swelling.area_mm2")  # no verdict
        _alarm(s, p2, "p2", "B1", 1, "spatter", "spatter.components", verdict="confirmed")
    try:
        yield path, cfg, engine
    finally:
        engine.dispose()


# -- the migration ----------------------------------------------------------------------


def test_0004_upgrades_a_0003_database_and_downgrades(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    engine = make_engine(url, writer=True)
    try:
        acfg = migrate._config(engine)
        with engine.begin() as conn:
            acfg.attributes["connection"] = conn
            command.upgrade(acfg, "0003")
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO builds (printer, name, created_at) "
                              "VALUES ('', 'old', 1.0)"))
        backup = migrate.upgrade(engine, url)
        assert backup is not None and ".0003." in backup  # copied aside first
        assert migrate.current(engine) == migrate.head()  # through 0004 (and what follows)
        with Session(engine) as s, s.begin():
            assert good_builds(s) == []  # the old build is there, not marked
            mark = mark_good(s, None, "old", "kept from 0003", now=5.0)
        assert mark == GoodBuild(printer="", build="old", marked_at=5.0,
                                 note="kept from 0003", layers=0)
        with engine.begin() as conn:
            acfg.attributes["connection"] = conn
            command.downgrade(acfg, "0003")
    finally:
        engine.dispose()
    with sqlite3.connect(tmp_path / "db.sqlite") as conn:
        cols = {r[1] for r in conn.execute("PRAGMA table_info(builds)")}
        assert "name" in cols and not cols & {"marked_good_at", "marked_good_note"}
        assert conn.execute("SELECT name FROM builds").fetchall() == [("old",)]


# -- the store functions ----------------------------------------------------------------


def test_mark_unmark_and_good_builds(db: tuple[Path, Config, Engine]) -> None:
    _, _, engine = db
    with Session(engine) as s, s.begin():
        assert good_builds(s) == []
        mark = mark_good(s, "", "B1", "clean build", now=10.0)
        assert mark == GoodBuild("", "B1", 10.0, "clean build", layers=2)  # ok layers only
        mark_good(s, "p2", "B1", None, now=20.0)
        mark_good(s, None, "B2", "", now=15.0)  # the one printer with a B2; "" is no note
    with Session(engine) as s:
        assert [(g.printer, g.build, g.note) for g in good_builds(s)] == [
            ("", "B1", "clean build"), ("", "B2", None), ("p2", "B1", None)]  # by mark time
        assert [g.build for g in good_builds(s, "")] == ["B1", "B2"]
        assert [g.printer for g in good_builds(s, "p2")] == ["p2"]
        assert good_builds(s, "nobody") == []
    with Session(engine) as s, s.begin():
        again = mark_good(s, "", "B1", "re-checked", now=30.0)  # replaces time and note
        assert again is not None and (again.marked_at, again.note) == (30.0, "re-checked")
        assert mark_good(s, "", "B2", None, good=False) is None
        assert mark_good(s, "", "B2", None, good=False) is None  # unmarking twice is fine
    with Session(engine) as s:
        assert [(g.printer, g.build) for g in good_builds(s)] == [("p2", "B1"), ("", "B1")]
        listed = {(b["printer"], b["build"]): b for b in queries.list_builds(s)}
        assert listed[("", "B1")]["marked_good_note"] == "re-checked"
        assert listed[("", "B2")]["marked_good_at"] is None


def test_unknown_ambiguous_and_bad_note(db: tuple[Path, Config, Engine]) -> None:
    _, _, engine = db
    with Session(engine) as s, s.begin():
        with pytest.raises(UnknownBuild, match=r"^no build 'nope'$") as e:
            mark_good(s, None, "nope", None)
        assert e.value.build == "nope"
        with pytest.raises(UnknownBuild, match=r"no build 'B2' on printer 'p2'"):
            mark_good(s, "p2", "B2", None)
        with pytest.raises(UnknownBuild):
            mark_good(s, "", "nope", None, good=False)
        with pytest.raises(StoreError, match=r"build 'B1' is on printers '', 'p2'"):
            mark_good(s, None, "B1", None)
        with pytest.raises(StoreError, match="at most 2000 characters"):
            mark_good(s, "", "B1", "x" * 2001)
    with Session(engine) as s:
        assert good_builds(s) == []  # nothing of it was written


def test_adapt_layers(db: tuple[Path, Config, Engine]) -> None:
    _, _, engine = db
    with Session(engine) as s:
        layers = adapt_layers(s, ["B1"], printer="")
        assert layers == [AdaptLayer("", "B1", 1, "/cam/one/B1/1.png", "sha1"),
                          AdaptLayer("", "B1", 2, "/cam/one/B1/2.png", "sha2")]  # no error layer
        # A name without a printer takes every printer's build of that name.
        assert [(a.printer, a.build, a.layer) for a in adapt_layers(s, ["B2", "B1"])] == [
            ("", "B1", 1), ("", "B1", 2), ("", "B2", 1), ("p2", "B1", 1)]
        assert adapt_layers(s, []) == []
        with pytest.raises(UnknownBuild, match="no build 'B2' on printer 'p2'"):
            adapt_layers(s, ["B1", "B2"], printer="p2")
    with Session(engine) as s, s.begin():
        mark_good(s, "p2", "B1", None)
    with Session(engine) as s:
        # A GoodBuild keeps to its own printer: the good B1 of p2, not the other B1.
        assert [(a.printer, a.build, a.layer) for a in adapt_layers(s, good_builds(s))] == [
            ("p2", "B1", 1)]
        assert adapt_layers(s, good_builds(s), printer="p2") == adapt_layers(s, ["B1"], "p2")
        with pytest.raises(UnknownBuild):
            adapt_layers(s, good_builds(s), printer="")


def test_verdict_alarms(db: tuple[Path, Config, Engine]) -> None:
    _, _, engine = db
    with Session(engine) as s:
        found = verdict_alarms(s, "")
        everywhere = verdict_alarms(s)
        assert [a.printer for a in verdict_alarms(s, "p2")] == ["p2"]
    assert len(everywhere) == 4 and everywhere[:3] == found  # the unjudged alarm is left out
    part, rule, track = found  # by layer, then id
    assert (part.layer, part.rule, part.class_name, part.verdict, part.note, part.part,
            part.position_mm, part.boxes_px, part.image_path) == (
        1, "part_missing.part3", None, "false_alarm", "part removed on purpose", 3, None, (),
        "/cam/one/B1/1.png")
    assert (rule.layer, rule.class_name, rule.verdict, rule.note, rule.part, rule.track,
            rule.position_mm) == (2, "spatter", "confirmed", "real spatter", 4, None,
                                  (0.35, 0.35))
    assert rule.boxes_px == ((2, 2, 4, 4), (10, 10, 2, 2))  # every spatter blob, largest first
    assert (track.rule, track.verdict, track.track, track.position_mm) == (
        "track.spatter", "false_alarm", 7, (0.4, 0.4))
    assert track.boxes_px == ((2, 2, 4, 4),)  # the track's own component only
    assert track.image_path == "/cam/one/B1/2.png" and track.build == "B1"


# -- the command ------------------------------------------------------------------------


def _cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def _one_error_line(res: Result) -> str:
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)  # no traceback
    (line,) = res.output.strip().splitlines()
    assert line.startswith("pbf-monitor: error: "), line
    return line


def test_cli_straight_into_the_database(db: tuple[Path, Config, Engine]) -> None:
    path, _, engine = db
    res = _cli("mark-good", "B2", "--note", "no defects seen", "-c", str(path))
    assert res.exit_code == 0, res.output
    assert res.output.strip() == "build B2 marked good (1 ok layers)"
    res = _cli("builds", "-c", str(path), "--json")
    b2 = next(b for b in json.loads(res.output) if b["build"] == "B2")
    assert b2["marked_good_note"] == "no defects seen" and b2["marked_good_at"] > 0
    res = _cli("builds", "-c", str(path))
    assert res.exit_code == 0, res.output
    (row,) = [ln for ln in res.output.splitlines() if "B2" in ln]
    assert "yes: no defects seen" in row
    res = _cli("mark-good", "B1", "--printer", "p2", "-c", str(path))
    assert res.output.strip() == "build B1 on printer p2 marked good (1 ok layers)"
    res = _cli("mark-good", "B2", "--undo", "-c", str(path))
    assert res.exit_code == 0, res.output
    assert res.output.strip() == "build B2 no longer marked good"
    with Session(engine) as s:
        assert [(g.printer, g.build) for g in good_builds(s)] == [("p2", "B1")]

    assert "no build 'nope'" in _one_error_line(_cli("mark-good", "nope", "-c", str(path)))
    assert "is on printers '', 'p2'" in _one_error_line(
        _cli("mark-good", "B1", "-c", str(path)))
    assert "--note goes with a mark" in _one_error_line(
        _cli("mark-good", "B1", "--undo", "--note", "x", "-c", str(path)))
    with Session(engine) as s:
        assert [(g.printer, g.build) for g in good_builds(s)] == [("p2", "B1")]


def test_cli_without_a_database_says_so_and_makes_none(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.toml", '[store]\nstate_dir = "state"\n')
    line = _one_error_line(_cli("mark-good", "B1", "-c", str(path)))
    assert "no database yet" in line
    assert not (tmp_path / "state").exists()


def test_cli_through_the_running_daemon(tmp_path: Path) -> None:
    """With the state folder's lock held, the command goes to the state endpoint: here the
    daemon's own handler, committer and writer thread behind a real endpoint (no model)."""
    from monitor.daemon.committer import Committer
    from monitor.daemon.control import ControlServer
    from monitor.daemon.instance import claim_state_dir
    from monitor.daemon.metrics import Metrics
    from monitor.daemon.requests import Requests
    from monitor.records import Outgoing
    from monitor.store.writer import StoreWriter

    endpoint = free_endpoint()
    path = write_config(tmp_path / "c.toml", f'[store]\nstate_dir = "state"\n'
                                             f'[publish]\nstate_endpoint = "{endpoint}"\n')
    cfg = load_config(path)
    engine = open_db(cfg.store_url)
    with Session(engine) as s, s.begin():
        _layer(s, "", "B1", 1)
        _layer(s, "", "B1", 2)
    published: list[Outgoing] = []

    class Publisher:
        def publish(self, messages: Any) -> None:
            published.extend(messages)

    lock = claim_state_dir(cfg.state_dir, cfg.store_url)  # as the daemon holds it
    writer = StoreWriter(engine)
    writer.start()
    committer = Committer(writer=writer, publisher=Publisher(), hook=None,
                          metrics=Metrics(lambda: 0, dict), max_components=200,
                          hook_severities=())
    handler = Requests(printer="", reader=engine, analyser=None,  # type: ignore[arg-type]
                       committer=committer, health=dict, active_s=60.0).handle
    try:
        with ControlServer(endpoint, handler) as server:
            res = _cli("mark-good", "B1", "--note", "via the daemon", "-c", str(path))
            assert res.exit_code == 0, res.output
            assert res.output.strip() == "build B1 marked good (2 ok layers)"
            assert server.answered == 1  # the daemon stored it, not the command
            with Session(engine) as s:
                (g,) = good_builds(s)
                assert (g.build, g.note) == ("B1", "via the daemon")
            line = _one_error_line(_cli("mark-good", "nope", "-c", str(path)))
            assert "no build 'nope'" in line and server.answered == 2
            res = _cli("mark-good", "B1", "--undo", "-c", str(path))
            assert res.output.strip() == "build B1 no longer marked good"
            with Session(engine) as s:
                assert good_builds(s) == []
            assert published == []  # a mark is not a message
    finally:
        writer.stop()
        lock.release()
        engine.dispose()


@pytest.mark.parametrize("req, error", [
    ({"build": ""}, "'build' must not be empty"),
    ({"build": 7}, "'build' must be a string"),
    ({"build": "B1", "printer": ["a"]}, "'printer' must be a string"),
    ({"build": "B1", "good": "yes"}, "'good' must be true or false"),
    ({"build": "B1", "note": "x" * 2001}, "'note' must be a string of at most 2000"),
])
def test_state_endpoint_checks_mark_good_fields(req: dict[str, Any], error: str) -> None:
    from monitor.daemon.control import validate_request

    with pytest.raises(ValueError, match=error):
        validate_request({"cmd": "mark-good", **req})
    validate_request({"cmd": "mark-good", "build": "B1", "printer": "p", "note": "n",
                      "good": False})
