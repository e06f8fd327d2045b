"""The one thread that writes to the database (StoreWriter).

Writes go through one thread fed by a queue: SQLite allows one writer, and a queue keeps the
pipeline from ever waiting on a lock. Each job runs in one transaction, so a layer, its
statistics, its alarms and its outgoing messages land together or not at all.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

log = logging.getLogger(__name__)
T = TypeVar("T")

_STOP = object()


class StoreWriter:
    """The one thread that writes to the database.

    Jobs are functions of a Session run in one transaction. A transient failure (database
    locked, disk full, connection lost) is retried with back-off until it succeeds or the
    writer is stopped, so a layer is never dropped because the database was briefly
    unavailable. A job that fails for any other reason runs its fallback instead (for a
    layer: an error record saying why), so the failure is on record rather than only in a log.
    """

    def __init__(self, engine: Engine, *, on_error: Callable[[str], None] | None = None) -> None:
        self.engine = engine
        self._q: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._stopping = threading.Event()
        self._on_error = on_error
        # Why writes are failing right now (None when they work): health and heartbeats.
        self.failing: str | None = None
        # A SQLite file deleted or replaced under the daemon would take writes into the
        # void: its identity at start is compared before every commit and by health.
        db = engine.url.database if engine.dialect.name == "sqlite" else None
        self._file = Path(db) if db and db != ":memory:" else None
        self._file_id = _file_id(self._file) if self._file is not None else None

    @property
    def file_problem(self) -> str | None:
        """Why the database file is no longer the one opened at start, else None. Cheap (a
        stat), callable from any thread."""
        if self._file is None or self._file_id is None:
            return None
        now = _file_id(self._file)
        if now == self._file_id:
            return None
        what = "deleted" if now is None else "replaced"
        return (f"{self._file}: the database file was {what} under the running daemon; "
                "nothing more is stored: restart the daemon (its rescan catches up the layers)")

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Callable[[Session], T], done: Callable[[T], None] | None = None,
               *, fallback: Callable[[Session, Exception], T] | None = None) -> None:
        """Run job(session) in a transaction on the writer thread, then done(result). If the
        job fails for a reason retrying will not cure, fallback(session, error) runs in its
        place (then done gets its result)."""
        self._q.put((job, done, fallback))

    def then(self, fn: Callable[[], object]) -> None:
        """Run fn on the writer thread once every job submitted before it is done (and
        its done callback has run)."""
        self._q.put((None, fn, None))

    def call(self, job: Callable[[Session], T], timeout: float = 60.0) -> T:
        """Run a job and wait for its result (for start-up and tests)."""
        box: queue.Queue[T] = queue.Queue(maxsize=1)
        self.submit(job, box.put)
        return box.get(timeout=timeout)

    @property
    def depth(self) -> int:
        return self._q.qsize()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        with Session(self.engine, expire_on_commit=False) as session:
            while True:
                item = self._q.get()
                if item is _STOP:
                    return
                job, done, fallback = item
                if job is None:  # then(fn)
                    try:
                        done()
                    except Exception:
                        log.exception("store callback failed")
                    continue
                result = self._run_job(session, job, fallback)
                if result is not _STOP and done is not None:
                    try:
                        done(result)
                    except Exception:
                        log.exception("store callback failed")

    def _run_job(self, session: Session, job: Callable[[Session], Any],
                 fallback: Callable[[Session, Exception], Any] | None) -> Any:
        delay = 0.5
        attempt = job
        while True:
            if (gone := self.file_problem) is not None:
                # No retry: this process can never write that file again. The images stay
                # without a record, and the restart's rescan processes them.
                self.failing = gone
                log.error("write dropped: %s", gone)
                return _STOP
            try:
                with session.begin():
                    result = attempt(session)
            except OperationalError as e:
                session.rollback()
                self.failing = _transient_reason(e)
                msg = f"database write failed, retrying in {delay:.1f}s: {self.failing}"
                log.error("%s", msg)
                if self._on_error:
                    self._on_error(msg)
                if self._stopping.wait(delay):
                    log.error("store writer stopping with a write still failing; the layer "
                              "will be processed again on restart")
                    return _STOP
                delay = min(delay * 2, 30.0)
                continue
            except Exception as e:
                session.rollback()
                if fallback is None or attempt is not job:
                    log.exception("database write failed and was dropped")
                    return _STOP
                log.exception("database write failed; storing what went wrong instead")
                attempt = _bind(fallback, e)
                continue
            if self.failing is not None:
                log.warning("database writes work again (were failing: %s)", self.failing)
                self.failing = None
            return result

    def stop(self, timeout: float = 30.0) -> None:
        """Finish queued writes, then end the thread. Idempotent."""
        if self._thread.is_alive():
            self._q.put(_STOP)
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._stopping.set()
                self._thread.join(5)


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _bind(fallback: Callable[[Session, Exception], T], error: Exception
          ) -> Callable[[Session], T]:
    return lambda s: fallback(s, error)


def _transient_reason(e: OperationalError) -> str:
    """The database's own message, with what to do about the common cases."""
    text = str(e.orig)
    if "disk is full" in text or "No space left" in text:
        return (f"{text}: the state disk is full; free space there (layers wait in memory "
                f"and are stored once writes succeed)")
    if "locked" in text or "busy" in text:
        return f"{text}: another process holds the database's write lock"
    return text
