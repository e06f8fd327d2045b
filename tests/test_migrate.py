"""Schema migrations: a new database gets the head revision, the migration matches the
models, older databases are refused or backed up."""

from __future__ import annotations

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
