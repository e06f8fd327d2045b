"""Database engines with the settings pbf-monitor relies on (SQLite WAL, busy timeout,
IMMEDIATE write transactions, read-only readers); the writer's upgrades the schema.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import create_engine, event, inspect
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from monitor.errors import StoreError

log = logging.getLogger(__name__)


class NoDatabase(StoreError):
    """A reader found no database where the config points: nothing has been stored yet."""


def _sqlite_pragmas(engine: Engine, *, writer: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin (see "begin" below).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout = 30000")
        cur.execute("PRAGMA foreign_keys = ON")
        if writer:
            mode = cur.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("SQLite refused WAL mode (journal_mode=%s): readers will block "
                            "the writer; is the state dir on a network share?", mode)
            cur.execute("PRAGMA synchronous = NORMAL")
        else:
            cur.execute("PRAGMA query_only = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # IMMEDIATE takes the write lock up front, so busy_timeout applies instead of a
        # deadlock error when a read transaction later wants to write.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if writer else "BEGIN")


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (None for other databases and in-memory ones)."""
    if not url.startswith("sqlite"):
        return None
    path = url.split("///", 1)[-1] if "///" in url else ""
    return Path(path) if path and path != ":memory:" else None


def make_engine(url: str, *, writer: bool) -> Engine:
    """An engine with the SQLite settings pbf-monitor relies on. A reader opens an existing
    SQLite file read-only (mode=ro): reading never creates a database."""
    if url.startswith("sqlite"):
        path = sqlite_file(url)
        args: dict[str, Any] = {"check_same_thread": False, "timeout": 30}
        if writer and path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"{path.parent}: cannot create state directory "
                                 f"({e.strerror})") from e
        elif path is not None:
            if not path.is_file():
                raise NoDatabase(
                    f"no database yet at {path} (the daemon makes it on its first start); "
                    "point at one with --config FILE, or set store.state_dir or store.url")
            ro = f"file:{quote(str(path.absolute()))}?mode=ro"
            args = {**args, "uri": True}
            engine = create_engine(url, creator=lambda: sqlite3.connect(ro, **args))
            _sqlite_pragmas(engine, writer=False)
            return engine
        engine = create_engine(url, connect_args=args)
        _sqlite_pragmas(engine, writer=writer)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    return engine


def open_db(url: str, *, writer: bool = True) -> Engine:
    """Connect, and on a writer create the schema; StoreError names the database."""
    engine = make_engine(url, writer=writer)
    try:
        if writer:
            from monitor.store.migrate import upgrade

            upgrade(engine, url)
        else:
            tables = set(inspect(engine).get_table_names())
            if "builds" not in tables:
                engine.dispose()
                raise NoDatabase(
                    f"{url}: no pbf-monitor database there yet (no tables); point at one "
                    "with --config FILE, or set store.state_dir or store.url")
    except SQLAlchemyError as e:
        engine.dispose()
        orig = getattr(e, "orig", None)
        reason = str(orig) if orig is not None else str(e)
        raise StoreError(f"{url}: cannot open database ({reason})") from e
    return engine
