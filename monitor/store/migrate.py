"""Database schema migrations (Alembic): the daemon upgrades at start, `pbf-monitor db
upgrade` by hand. A SQLite file is copied aside before its schema changes.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from contextlib import closing
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Engine

from monitor.errors import StoreError

log = logging.getLogger(__name__)
SCRIPTS = Path(__file__).with_name("migrations")


def _config(engine: Engine) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(SCRIPTS))
    cfg.attributes["engine"] = engine
    return cfg


def head() -> str:
    rev = ScriptDirectory(str(SCRIPTS)).get_current_head()
    assert rev is not None
    return rev


def current(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, url: str) -> str | None:
    """Bring the schema to the newest revision; returns the backup made, if any.

    A database made before migrations existed (tables but no revision) is refused: its
    columns cannot be known.
    """
    rev = current(engine)
    tables = set(inspect(engine).get_table_names())
    if rev is None and tables - {"alembic_version"}:
        raise StoreError(f"{url}: the database has tables but no schema revision (made by an "
                         f"older pbf-monitor); move it aside (store.state_dir) to start a new "
                         f"one")
    if rev == head():
        return None
    backup = _backup(engine, url, rev) if rev is not None else None
    cfg = _config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    log.info("database schema %s -> %s%s", rev or "empty", head(),
             f" (backup {backup})" if backup else "")
    return backup


def _backup(engine: Engine, url: str, rev: str) -> str | None:
    """Copy a SQLite file aside before its schema changes."""
    if engine.dialect.name != "sqlite":
        log.warning("upgrading %s in place: back it up with the server's own tools", url)
        return None
    db = engine.url.database
    if not db or db == ":memory:":
        return None
    src = Path(db)
    dst = src.with_name(f"{src.name}.{rev}.{time.strftime('%Y%m%d-%H%M%S')}.bak")
    # SQLite's online backup: a consistent copy, including what is still in the WAL.
    with closing(sqlite3.connect(src)) as a, closing(sqlite3.connect(dst)) as b:
        a.backup(b)
    return str(dst)
