"""Schema migrations: a new database gets the head revision, the migration matches the
models, older databases are refused or backed up."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner

from monitor.cli import main
from monitor.store import migrate
from monitor.store.connect import open_db
from monitor.store.schema import Base


def test_new_database_is_at_head_and_matches_the_models(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    engine = open_db(url)
    try:
        assert migrate.current(engine) == migrate.head()
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == []  # the migrations build exactly what the models describe
        assert migrate.upgrade(engine, url) is None  # at head: nothing to do, no backup
    finally:
        engine.dispose()


def test_backup_before_a_schema_change(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    engine = open_db(url)
    try:
        backup = migrate._backup(engine, url, "0001")
    finally:
        engine.dispose()
    assert backup is not None and Path(backup).name.startswith("db.sqlite.0001.")
    with sqlite3.connect(backup) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert {"layers", "alarms", "alembic_version"} <= tables


def test_cli_db_upgrade(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[store]\nstate_dir = "state"\n')
    r = CliRunner().invoke(main, ["db", "upgrade", "-c", str(cfg)])
    assert r.exit_code == 0, r.output
    assert f"schema empty -> {migrate.head()}" in r.output
    r = CliRunner().invoke(main, ["db", "upgrade", "-c", str(cfg)])
    assert f"schema {migrate.head()} -> {migrate.head()}" in r.output


def test_0005_fills_the_present_from_the_outbox(tmp_path: Path) -> None:
    """A database at 0004 with messages in its outbox: the upgrade records which of them are
    the present (each printer's last layer, each alarm not cleared)."""
    from alembic import command
    from sqlalchemy import create_engine, text

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    engine = create_engine(url)
    cfg = migrate._config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0004")
    messages = [("layer", {"printer": "", "layer": 1}), ("alarm", {"id": 4, "state": "open"}),
                ("alarm", {"id": 5, "state": "open"}), ("layer", {"printer": "", "layer": 2}),
                ("alarm", {"id": 5, "state": "cleared"}), ("layer", {"printer": "b", "layer": 9}),
                ("alarm", {"id": 0, "state": "open", "test": True})]
    with engine.begin() as conn:
        for topic, payload in messages:
            conn.execute(text("INSERT INTO outbox (topic, payload, created_at, published) "
                              "VALUES (:t, :p, 0, 1)"), {"t": topic, "p": json.dumps(payload)})
    try:
        assert migrate.upgrade(engine, url) is not None  # backed up first
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT key, seq FROM outbox_present ORDER BY seq")).all()
        assert [tuple(r) for r in rows] == [("alarm/4", 2), ("layer/", 4), ("layer/b", 6)]
    finally:
        engine.dispose()
