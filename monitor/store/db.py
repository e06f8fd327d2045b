"""SQLAlchemy models, the single database writer, and read-only queries for reports.

Writes go through one thread (StoreWriter) fed by a queue: SQLite allows one writer, and a
queue keeps the model worker from ever waiting on a lock. Each job runs in one transaction,
so a layer, its statistics, its alarms and its outgoing messages land together or not at all.
Outgoing messages are kept in an outbox table until the publisher has sent them, so a crash
between the commit and the send loses nothing: they are re-sent on restart with their seq.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from monitor.alarms.engine import AlarmEvent
from monitor.alarms.tracks import Track
from monitor.errors import StoreError
from monitor.reports.maps import EncodedMap
from monitor.vision.stats import ClassStats, LayerStats

log = logging.getLogger(__name__)
T = TypeVar("T")


class Base(DeclarativeBase):
    pass


class Build(Base):
    __tablename__ = "builds"
    __table_args__ = (UniqueConstraint("printer", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    printer: Mapped[str] = mapped_column(String(200), default="")
    name: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[float] = mapped_column(Float)
    last_layer_at: Mapped[float | None] = mapped_column(Float)
    first_layer: Mapped[int | None] = mapped_column(Integer)  # as the alarm engine saw it
    last_evaluated_layer: Mapped[int | None] = mapped_column(Integer)


class Layer(Base):
    __tablename__ = "layers"
    __table_args__ = (UniqueConstraint("build_id", "layer"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"), index=True)
    layer: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(10))  # ok | error
    error: Mapped[str | None] = mapped_column(Text)
    image_path: Mapped[str] = mapped_column(Text, index=True)
    image_size: Mapped[int | None] = mapped_column(BigInteger)
    image_mtime_ns: Mapped[int | None] = mapped_column(BigInteger)  # > 2**31: 64 bits
    image_sha256: Mapped[str | None] = mapped_column(String(64))
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    model_sha256: Mapped[str] = mapped_column(String(64))
    detected_at: Mapped[float] = mapped_column(Float)
    processed_at: Mapped[float] = mapped_column(Float)
    decode_ms: Mapped[float | None] = mapped_column(Float)
    infer_ms: Mapped[float | None] = mapped_column(Float)
    total_ms: Mapped[float | None] = mapped_column(Float)
    versions: Mapped[int] = mapped_column(Integer, default=1)  # > 1: the image was replaced

    classes: Mapped[list[ClassStat]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True, order_by="ClassStat.id"
    )
    components: Mapped[list[ComponentRow]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True
    )
    regions: Mapped[list[RegionStat]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True, order_by="RegionStat.id"
    )


class _StatColumns:
    """The per-class statistics columns, shared by whole-layer and per-region rows."""

    class_name: Mapped[str] = mapped_column(String(100))
    pixel_count: Mapped[int] = mapped_column(Integer)
    area_fraction: Mapped[float] = mapped_column(Float)
    area_mm2: Mapped[float] = mapped_column(Float)
    components: Mapped[int] = mapped_column(Integer)
    largest_component_px: Mapped[int] = mapped_column(Integer)
    largest_component_mm2: Mapped[float] = mapped_column(Float)

    @staticmethod
    def values(c: ClassStats) -> dict[str, Any]:
        return {"class_name": c.name, **c.summary()}

    def summary(self) -> dict[str, Any]:
        """The per-class object of messages and reports."""
        return {"pixel_count": self.pixel_count, "area_fraction": self.area_fraction,
                "area_mm2": self.area_mm2, "components": self.components,
                "largest_component_px": self.largest_component_px,
                "largest_component_mm2": self.largest_component_mm2}


class ClassStat(_StatColumns, Base):
    __tablename__ = "class_stats"

    id: Mapped[int] = mapped_column(primary_key=True)
    layer_id: Mapped[int] = mapped_column(ForeignKey("layers.id", ondelete="CASCADE"), index=True)


class ComponentRow(Base):
    __tablename__ = "components"

    id: Mapped[int] = mapped_column(primary_key=True)
    layer_id: Mapped[int] = mapped_column(ForeignKey("layers.id", ondelete="CASCADE"), index=True)
    class_name: Mapped[str] = mapped_column(String(100))
    x: Mapped[int] = mapped_column(Integer)
    y: Mapped[int] = mapped_column(Integer)
    w: Mapped[int] = mapped_column(Integer)
    h: Mapped[int] = mapped_column(Integer)
    area_px: Mapped[int] = mapped_column(Integer)
    cx: Mapped[float] = mapped_column(Float)
    cy: Mapped[float] = mapped_column(Float)
    track: Mapped[int | None] = mapped_column(Integer)  # track number in the build


class RegionStat(_StatColumns, Base):
    """Per-class statistics inside one named part region; area_fraction is of the region."""

    __tablename__ = "region_stats"

    id: Mapped[int] = mapped_column(primary_key=True)
    layer_id: Mapped[int] = mapped_column(ForeignKey("layers.id", ondelete="CASCADE"), index=True)
    region: Mapped[str] = mapped_column(String(100))


class TrackRow(Base):
    """A defect followed through consecutive layers."""

    __tablename__ = "tracks"
    __table_args__ = (UniqueConstraint("build_id", "number"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    class_name: Mapped[str] = mapped_column(String(100))
    first_layer: Mapped[int] = mapped_column(Integer)
    last_layer: Mapped[int] = mapped_column(Integer)
    layers: Mapped[int] = mapped_column(Integer)
    volume_mm3: Mapped[float] = mapped_column(Float)
    max_area_mm2: Mapped[float] = mapped_column(Float)
    x0: Mapped[int] = mapped_column(Integer)
    y0: Mapped[int] = mapped_column(Integer)
    x1: Mapped[int] = mapped_column(Integer)
    y1: Mapped[int] = mapped_column(Integer)
    alarmed: Mapped[bool] = mapped_column(Boolean, default=False)
    ended: Mapped[bool] = mapped_column(Boolean, default=False)
    boxes: Mapped[str] = mapped_column(Text, default="[]")  # last layer's boxes, JSON


class RuleStateRow(Base):
    """The alarm engine's memory of one rule in one build (streak, open, cooldown)."""

    __tablename__ = "rule_states"
    __table_args__ = (UniqueConstraint("build_id", "rule"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"), index=True)
    rule: Mapped[str] = mapped_column(String(200))
    streak: Mapped[int] = mapped_column(Integer, default=0)
    open: Mapped[bool] = mapped_column(Boolean, default=False)
    active: Mapped[bool] = mapped_column(Boolean, default=False)
    last_open_layer: Mapped[int | None] = mapped_column(Integer)


class LayerMap(Base):
    """A layer's defect map and camera thumbnail (see monitor.reports.maps); pruned by age."""

    __tablename__ = "layer_maps"

    id: Mapped[int] = mapped_column(primary_key=True)
    layer_id: Mapped[int] = mapped_column(ForeignKey("layers.id", ondelete="CASCADE"),
                                          unique=True)
    classes: Mapped[str] = mapped_column(Text)  # JSON list, bit order of mask_png
    scale: Mapped[int] = mapped_column(Integer)
    mask_png: Mapped[bytes] = mapped_column(LargeBinary)
    thumb_jpeg: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[float] = mapped_column(Float, index=True)


class Mute(Base):
    """A muted build, or one class of it (class_name NULL = every class and stalls)."""

    __tablename__ = "mutes"

    id: Mapped[int] = mapped_column(primary_key=True)
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"), index=True)
    class_name: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[float] = mapped_column(Float)


class Alarm(Base):
    __tablename__ = "alarms"

    id: Mapped[int] = mapped_column(primary_key=True)
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"), index=True)
    layer: Mapped[int] = mapped_column(Integer)
    class_name: Mapped[str] = mapped_column(String(100))
    rule: Mapped[str] = mapped_column(String(200))
    severity: Mapped[str] = mapped_column(String(20))
    state: Mapped[str] = mapped_column(String(20), index=True)  # open|acknowledged|cleared
    value: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    opened_at: Mapped[float] = mapped_column(Float)
    acked_at: Mapped[float | None] = mapped_column(Float)
    cleared_at: Mapped[float | None] = mapped_column(Float)
    cleared_layer: Mapped[int | None] = mapped_column(Integer)
    track: Mapped[int | None] = mapped_column(Integer)  # track alarms: the track number


class OutboxRow(Base):
    __tablename__ = "outbox"

    seq: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    topic: Mapped[str] = mapped_column(String(50))
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    published: Mapped[bool] = mapped_column(Boolean, default=False, index=True)


@dataclass(frozen=True)
class LayerRecord:
    """Everything the worker learned about one image, ready to store."""

    printer: str
    build: str
    layer: int
    status: str
    error: str | None
    image_path: str
    image_size: int | None
    image_mtime_ns: int | None
    image_sha256: str | None
    model_sha256: str
    detected_at: float
    processed_at: float
    decode_ms: float | None = None
    infer_ms: float | None = None
    total_ms: float | None = None
    stats: LayerStats | None = None
    regions: dict[str, LayerStats] | None = None
    classes: tuple[str, ...] = ()  # the model's, in mask order


@dataclass(frozen=True)
class Outgoing:
    """A committed message waiting to be published."""

    seq: int
    topic: str
    payload: dict[str, Any]


# ---------------------------------------------------------------- engines


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


def make_engine(url: str, *, writer: bool) -> Engine:
    """An engine with the SQLite settings pbf-monitor relies on."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if writer and path and path != ":memory:":
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"{Path(path).parent}: cannot create state directory "
                                 f"({e.strerror})") from e
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
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
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
    except SQLAlchemyError as e:
        engine.dispose()
        orig = getattr(e, "orig", None)
        reason = str(orig) if orig is not None else str(e)
        raise StoreError(f"{url}: cannot open database ({reason})") from e
    return engine


# ---------------------------------------------------------------- writes


def _get_build(s: Session, printer: str, name: str, now: float) -> Build:
    build = s.scalar(select(Build).where(Build.printer == printer, Build.name == name))
    if build is None:
        build = Build(printer=printer, name=name, created_at=now)
        s.add(build)
        s.flush()
    return build


def put_layer(s: Session, rec: LayerRecord, *, max_components: int = 200,
              tracks: dict[tuple[str, int], int] | None = None) -> tuple[int, bool]:
    """Insert or replace one layer with its statistics; returns (build id, replaced).

    tracks: (class, component index) -> track number, from the alarm engine.
    """
    build = _get_build(s, rec.printer, rec.build, rec.processed_at)
    build.last_layer_at = max(build.last_layer_at or 0.0, rec.processed_at)
    old = s.scalar(select(Layer).where(Layer.build_id == build.id, Layer.layer == rec.layer))
    versions = 1
    if old is not None:
        versions = old.versions + 1
        s.delete(old)
        s.flush()
    row = Layer(
        build_id=build.id, layer=rec.layer, status=rec.status, error=rec.error,
        image_path=rec.image_path, image_size=rec.image_size, image_mtime_ns=rec.image_mtime_ns,
        image_sha256=rec.image_sha256, model_sha256=rec.model_sha256,
        detected_at=rec.detected_at, processed_at=rec.processed_at, decode_ms=rec.decode_ms,
        infer_ms=rec.infer_ms, total_ms=rec.total_ms, versions=versions,
        width=rec.stats.width if rec.stats else None,
        height=rec.stats.height if rec.stats else None,
    )
    comps: list[dict[str, Any]] = []
    if rec.stats is not None:
        for c in rec.stats.classes.values():
            row.classes.append(ClassStat(**ClassStat.values(c)))
            comps += [{"class_name": c.name, "x": comp.x, "y": comp.y, "w": comp.w,
                       "h": comp.h, "area_px": comp.area_px, "cx": comp.cx, "cy": comp.cy,
                       "track": (tracks or {}).get((c.name, i))}
                      for i, comp in enumerate(c.component_list[:max_components])]
    for region, rs in (rec.regions or {}).items():
        for c in rs.classes.values():
            row.regions.append(RegionStat(region=region, **RegionStat.values(c)))
    s.add(row)
    s.flush()
    if comps:
        # One multi-row INSERT: hundreds of components through the unit of work took
        # tens of milliseconds on the latency path.
        s.execute(insert(ComponentRow), [{**c, "layer_id": row.id} for c in comps])
    return build.id, old is not None


def put_map(s: Session, rec: LayerRecord, m: EncodedMap) -> None:
    """Attach a map to the stored layer it was made from (skipped if that layer has been
    replaced or deleted since)."""
    layer = s.scalar(select(Layer).join(Build).where(
        Build.printer == rec.printer, Build.name == rec.build, Layer.layer == rec.layer,
        Layer.processed_at == rec.processed_at))
    if layer is not None:
        s.execute(delete(LayerMap).where(LayerMap.layer_id == layer.id))
        s.add(LayerMap(layer_id=layer.id, classes=json.dumps(list(rec.classes)),
                       scale=m.scale, mask_png=m.mask_png, thumb_jpeg=m.thumb_jpeg,
                       created_at=rec.processed_at))


def put_outbox(s: Session, messages: Iterable[tuple[str, dict[str, Any]]]) -> list[Outgoing]:
    """Queue messages for publishing in the current transaction; assigns their seq."""
    rows = [OutboxRow(topic=t, payload=json.dumps(p), created_at=time.time())
            for t, p in messages]
    s.add_all(rows)
    s.flush()
    return [Outgoing(r.seq, r.topic, json.loads(r.payload)) for r in rows]


def mark_published(s: Session, seqs: list[int]) -> None:
    s.execute(update(OutboxRow).where(OutboxRow.seq.in_(seqs)).values(published=True))


def pending_outbox(s: Session) -> list[Outgoing]:
    rows = s.scalars(select(OutboxRow).where(OutboxRow.published.is_(False))
                     .order_by(OutboxRow.seq))
    return [Outgoing(r.seq, r.topic, json.loads(r.payload)) for r in rows]


def prune_outbox(s: Session, *, keep: int = 10_000) -> None:
    """Drop published messages beyond the newest `keep`; the layers table is the record."""
    newest = s.scalar(select(OutboxRow.seq).order_by(OutboxRow.seq.desc()).limit(1)) or 0
    s.execute(delete(OutboxRow).where(OutboxRow.published.is_(True),
                                      OutboxRow.seq <= newest - keep))


def last_seq(s: Session) -> int:
    return s.scalar(select(OutboxRow.seq).order_by(OutboxRow.seq.desc()).limit(1)) or 0


# ---------------------------------------------------------------- reads


def known_images(s: Session) -> dict[str, tuple[int | None, int | None]]:
    """image path -> (size, mtime_ns) of every stored layer, for the rescan."""
    rows = s.execute(select(Layer.image_path, Layer.image_size, Layer.image_mtime_ns))
    return {p: (size, mtime) for p, size, mtime in rows}


def list_builds(s: Session) -> list[dict[str, Any]]:
    from sqlalchemy import func

    q = (
        select(Build.printer, Build.name, Build.created_at, Build.last_layer_at,
               func.count(Layer.id), func.min(Layer.layer), func.max(Layer.layer),
               func.sum((Layer.status == "error").cast(Integer)))
        .outerjoin(Layer, Layer.build_id == Build.id)
        .group_by(Build.id)
        .order_by(Build.created_at)
    )
    return [
        {"printer": p, "build": n, "created_at": c, "last_layer_at": last, "layers": cnt,
         "first_layer": lo, "last_layer": hi, "errors": int(err or 0)}
        for p, n, c, last, cnt, lo, hi, err in s.execute(q)
    ]


def build_layers(s: Session, build: str, *, printer: str | None = None) -> list[Layer]:
    """All layers of a build in order, with their class statistics loaded."""
    from sqlalchemy.orm import selectinload

    q = select(Layer).join(Build).where(Build.name == build)
    if printer is not None:
        q = q.where(Build.printer == printer)
    return list(s.scalars(q.options(selectinload(Layer.classes), selectinload(Layer.regions))
                          .order_by(Layer.layer)))


# ---------------------------------------------------------------- the writer thread

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


def apply_alarm(s: Session, build_id: int, ev: AlarmEvent, now: float) -> list[Alarm]:
    """Record an alarm transition; returns the rows it opened or cleared."""
    if ev.action == "open":
        row = Alarm(build_id=build_id, layer=ev.layer, class_name=ev.class_name, rule=ev.rule,
                    severity=ev.severity, state="open", value=ev.value, threshold=ev.threshold,
                    opened_at=now, track=ev.track)
        s.add(row)
        s.flush()
        return [row]
    q = select(Alarm).where(Alarm.build_id == build_id, Alarm.rule == ev.rule,
                            Alarm.state.in_(("open", "acknowledged")))
    if ev.track is not None:
        q = q.where(Alarm.track == ev.track)
    rows = list(s.scalars(q))
    for row in rows:
        row.state, row.cleared_at, row.cleared_layer = "cleared", now, ev.layer
    s.flush()
    return rows


def acknowledge_alarm(s: Session, alarm_id: int, now: float) -> Alarm:
    """open -> acknowledged; StoreError if there is no such open alarm."""
    row = s.get(Alarm, alarm_id)
    if row is None:
        raise StoreError(f"no alarm with id {alarm_id}")
    if row.state != "open":
        raise StoreError(f"alarm {alarm_id} is {row.state}, not open")
    row.state, row.acked_at = "acknowledged", now
    s.flush()
    return row


def put_rule_states(s: Session, build_id: int, states: dict[str, dict[str, Any]]) -> None:
    existing = {r.rule: r for r in s.scalars(
        select(RuleStateRow).where(RuleStateRow.build_id == build_id))}
    for rule, st in states.items():
        row = existing.get(rule)
        if row is None:
            s.add(RuleStateRow(build_id=build_id, rule=rule, **st))
        else:
            for k, v in st.items():
                setattr(row, k, v)


def put_tracks(s: Session, build_id: int, tracks: Iterable[Track]) -> None:
    """Insert or update tracks (touched or ended by a layer)."""
    tracks = list(tracks)
    if not tracks:
        return
    # Bulk statements rather than ORM objects: a layer touches dozens of tracks, and the
    # unit of work made this the costliest part of the layer's transaction.
    ids: dict[int, int] = {number: id_ for number, id_ in s.execute(
        select(TrackRow.number, TrackRow.id).where(
            TrackRow.build_id == build_id, TrackRow.number.in_([t.number for t in tracks])))}
    new, changed = [], []
    for t in tracks:
        values = {
            "first_layer": t.first_layer, "last_layer": t.last_layer, "layers": t.layers,
            "volume_mm3": t.volume_mm3, "max_area_mm2": t.max_area_mm2,
            "x0": t.x0, "y0": t.y0, "x1": t.x1, "y1": t.y1,
            "alarmed": t.alarmed, "ended": t.ended, "boxes": json.dumps(t.boxes),
        }
        if t.number in ids:
            changed.append({"id": ids[t.number], **values})
        else:
            new.append({"build_id": build_id, "number": t.number, "class_name": t.class_name,
                        **values})
    if new:
        s.execute(insert(TrackRow), new)
    if changed:
        s.execute(update(TrackRow), changed)  # by primary key, one executemany


def build_id_of(s: Session, printer: str, name: str) -> int | None:
    return s.scalar(select(Build.id).where(Build.printer == printer, Build.name == name))


def load_engine_state(s: Session, printer: str, name: str) -> dict[str, Any] | None:
    """What the alarm engine needs to go on with a build after a restart."""
    build = s.scalar(select(Build).where(Build.printer == printer, Build.name == name))
    if build is None:
        return None
    rules = {r.rule: {"streak": r.streak, "open": r.open, "active": r.active,
                      "last_open_layer": r.last_open_layer}
             for r in s.scalars(select(RuleStateRow).where(RuleStateRow.build_id == build.id))}
    live = [
        Track(number=t.number, class_name=t.class_name, first_layer=t.first_layer,
              last_layer=t.last_layer, layers=t.layers, volume_mm3=t.volume_mm3,
              max_area_mm2=t.max_area_mm2, x0=t.x0, y0=t.y0, x1=t.x1, y1=t.y1,
              alarmed=t.alarmed, boxes=[tuple(b) for b in json.loads(t.boxes)])
        for t in s.scalars(select(TrackRow).where(TrackRow.build_id == build.id,
                                                  TrackRow.ended.is_(False)))
    ]
    from sqlalchemy import func

    top = s.scalar(select(func.max(TrackRow.number)).where(TrackRow.build_id == build.id)) or 0
    arrivals = [t for (t,) in s.execute(
        select(Layer.detected_at).where(Layer.build_id == build.id)
        .order_by(Layer.layer.desc()).limit(21))][::-1]
    stall_open = s.scalar(select(Alarm.id).where(
        Alarm.build_id == build.id, Alarm.rule == "stall",
        Alarm.state.in_(("open", "acknowledged"))).limit(1)) is not None
    last_layer = s.scalar(select(func.max(Layer.layer)).where(Layer.build_id == build.id))
    return {"first_layer": build.first_layer, "last_evaluated": build.last_evaluated_layer,
            "last_layer": last_layer, "rules": rules, "tracks": live, "next_track": top + 1,
            "arrivals": arrivals, "stall_open": stall_open,
            "last_layer_at": build.last_layer_at}


def active_builds(s: Session, since: float) -> list[tuple[str, str]]:
    """(printer, build) of builds with a layer after `since`, newest first."""
    q = select(Build.printer, Build.name).where(Build.last_layer_at >= since).order_by(
        Build.last_layer_at.desc())
    return [(p, n) for p, n in s.execute(q)]


def add_mute(s: Session, printer: str, name: str, class_name: str | None, now: float) -> None:
    bid = build_id_of(s, printer, name)
    if bid is None:
        raise StoreError(f"no build {name!r}" + (f" on printer {printer!r}" if printer else ""))
    s.add(Mute(build_id=bid, class_name=class_name, created_at=now))


def remove_mutes(s: Session, printer: str, name: str, class_name: str | None) -> None:
    bid = build_id_of(s, printer, name)
    if bid is None:
        raise StoreError(f"no build {name!r}" + (f" on printer {printer!r}" if printer else ""))
    q = delete(Mute).where(Mute.build_id == bid)
    q = q.where(Mute.class_name.is_(None) if class_name is None else
                Mute.class_name == class_name)
    s.execute(q)


def all_mutes(s: Session) -> list[tuple[str, str, str | None]]:
    q = select(Build.printer, Build.name, Mute.class_name).join(Build)
    return [(p, n, c) for p, n, c in s.execute(q)]


def list_alarms(s: Session, *, build: str | None = None, build_id: int | None = None,
                open_only: bool = False) -> list[tuple[Alarm, str, str]]:
    """(alarm, printer, build) newest first."""
    q = select(Alarm, Build.printer, Build.name).join(Build)
    if build is not None:
        q = q.where(Build.name == build)
    if build_id is not None:
        q = q.where(Build.id == build_id)
    if open_only:
        q = q.where(Alarm.state.in_(("open", "acknowledged")))
    return [(a, p, n) for a, p, n in s.execute(q.order_by(Alarm.id.desc()))]


def prune_maps(s: Session, *, older_than: float) -> int:
    """Delete defect maps made before `older_than` (statistics and alarms are kept)."""
    result = s.execute(delete(LayerMap).where(LayerMap.created_at < older_than))
    return int(getattr(result, "rowcount", 0) or 0)


def prune_oldest_maps(s: Session, *, fraction: float) -> int:
    """Delete the oldest `fraction` of the stored maps (at least one, if any)."""
    from sqlalchemy import func

    total = s.scalar(select(func.count(LayerMap.id))) or 0
    n = max(1, int(total * fraction)) if total else 0
    if not n:
        return 0
    ids = list(s.scalars(select(LayerMap.id).order_by(LayerMap.created_at).limit(n)))
    s.execute(delete(LayerMap).where(LayerMap.id.in_(ids)))
    return len(ids)


def layer_maps(s: Session, build_id: int, layers: range | None = None
               ) -> dict[int, LayerMap]:
    """layer number -> its map, for the layers of a build that still have one."""
    q = select(Layer.layer, LayerMap).join(LayerMap, LayerMap.layer_id == Layer.id).where(
        Layer.build_id == build_id)
    if layers is not None:
        q = q.where(Layer.layer >= layers.start, Layer.layer < layers.stop)
    return {n: m for n, m in s.execute(q)}


def build_tracks(s: Session, build_id: int) -> list[TrackRow]:
    q = select(TrackRow).where(TrackRow.build_id == build_id).order_by(TrackRow.number)
    return list(s.scalars(q))


def last_layer(s: Session, build_id: int) -> Layer | None:
    from sqlalchemy.orm import selectinload

    q = (select(Layer).where(Layer.build_id == build_id)
         .options(selectinload(Layer.classes), selectinload(Layer.regions))
         .order_by(Layer.layer.desc()).limit(1))
    return s.scalar(q)
