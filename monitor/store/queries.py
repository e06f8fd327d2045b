"""Read queries: the rescan, the alarm engine's state after a restart, the state endpoint,
reports, the dashboard and the CLI. Nothing here writes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from sqlalchemy import ColumnElement, Integer, and_, func, select
from sqlalchemy.orm import Session, selectinload

from monitor.errors import StoreError, UnknownBuild
from monitor.records import (
    AdaptLayer,
    AlarmRecord,
    EngineState,
    GoodBuild,
    Outgoing,
    Present,
    RuleState,
    Track,
    VerdictAlarm,
)
from monitor.store.schema import (
    Alarm,
    Build,
    ComponentRow,
    Layer,
    LayerMap,
    Mute,
    OutboxRow,
    PresentRow,
    RuleStateRow,
    TrackRow,
)


def pending_outbox(s: Session) -> list[Outgoing]:
    rows = s.scalars(select(OutboxRow).where(OutboxRow.published.is_(False))
                     .order_by(OutboxRow.seq))
    return [Outgoing(r.seq, r.topic, json.loads(r.payload)) for r in rows]


def last_seq(s: Session) -> int:
    return s.scalar(select(OutboxRow.seq).order_by(OutboxRow.seq.desc()).limit(1)) or 0


def outbox_after(s: Session, seq: int) -> list[Outgoing]:
    """Every message committed after `seq`, sent or not, in seq order (a sink's backlog)."""
    rows = s.scalars(select(OutboxRow).where(OutboxRow.seq > seq).order_by(OutboxRow.seq))
    return [Outgoing(r.seq, r.topic, json.loads(r.payload)) for r in rows]


def present(s: Session) -> Present:
    """Each printer's last layer message and each open or acknowledged alarm's latest one,
    as of the newest message committed."""
    rows = s.scalars(select(OutboxRow).join(PresentRow, PresentRow.seq == OutboxRow.seq)
                     .order_by(OutboxRow.seq))
    return Present(last_seq(s),
                   tuple(Outgoing(r.seq, r.topic, json.loads(r.payload)) for r in rows))


def known_images(s: Session) -> dict[str, tuple[int | None, int | None]]:
    """image path -> (size, mtime_ns) of every stored layer, for the rescan."""
    rows = s.execute(select(Layer.image_path, Layer.image_size, Layer.image_mtime_ns))
    return {p: (size, mtime) for p, size, mtime in rows}


def list_builds(s: Session) -> list[dict[str, Any]]:
    q = (
        select(Build.printer, Build.name, Build.created_at, Build.last_layer_at,
               func.count(Layer.id), func.min(Layer.layer), func.max(Layer.layer),
               func.sum((Layer.status == "error").cast(Integer)),
               Build.marked_good_at, Build.marked_good_note)
        .outerjoin(Layer, Layer.build_id == Build.id)
        .group_by(Build.id)
        .order_by(Build.created_at)
    )
    return [
        {"printer": p, "build": n, "created_at": c, "last_layer_at": last, "layers": cnt,
         "first_layer": lo, "last_layer": hi, "errors": int(err or 0),
         "marked_good_at": good, "marked_good_note": note}
        for p, n, c, last, cnt, lo, hi, err, good, note in s.execute(q)
    ]


def build_layers(s: Session, build: str, *, printer: str | None = None) -> list[Layer]:
    """All layers of a build in order, with their class statistics loaded."""
    q = select(Layer).join(Build).where(Build.name == build)
    if printer is not None:
        q = q.where(Build.printer == printer)
    return list(s.scalars(q.options(selectinload(Layer.classes), selectinload(Layer.regions),
                                    selectinload(Layer.parts))
                          .order_by(Layer.layer)))


def build_id_of(s: Session, printer: str, name: str) -> int | None:
    return s.scalar(select(Build.id).where(Build.printer == printer, Build.name == name))


def find_build(s: Session, printer: str | None, name: str) -> Build:
    """The build `name` on `printer`, or with printer None on whichever printer has one.

    Raises UnknownBuild if there is none, StoreError if several printers have one.
    """
    q = select(Build).where(Build.name == name)
    if printer is not None:
        q = q.where(Build.printer == printer)
    rows = list(s.scalars(q.order_by(Build.printer)))
    if not rows:
        raise UnknownBuild(name, printer)
    if len(rows) > 1:
        raise StoreError(f"build {name!r} is on printers "
                         f"{', '.join(repr(b.printer) for b in rows)}: say which printer")
    return rows[0]


def _good_builds(s: Session, *where: ColumnElement[bool]) -> list[GoodBuild]:
    ok = func.sum((Layer.status == "ok").cast(Integer))
    q = (select(Build.printer, Build.name, Build.marked_good_at, Build.marked_good_note, ok)
         .outerjoin(Layer, Layer.build_id == Build.id)
         .where(Build.marked_good_at.is_not(None), *where)
         .group_by(Build.id)
         .order_by(Build.marked_good_at, Build.id))
    return [GoodBuild(printer=p, build=n, marked_at=float(at or 0.0), note=note,
                      layers=int(k or 0))
            for p, n, at, note, k in s.execute(q)]  # at: never NULL here (the WHERE)


def good_builds(s: Session, printer: str | None = None) -> list[GoodBuild]:
    """Builds an operator marked good (`pbf-monitor mark-good`), oldest mark first: on
    `printer`, or on every printer with None."""
    return _good_builds(s) if printer is None else _good_builds(s, Build.printer == printer)


def good_build(s: Session, build_id: int) -> GoodBuild | None:
    """The build's mark, None if it is not marked good."""
    found = _good_builds(s, Build.id == build_id)
    return found[0] if found else None


def adapt_layers(s: Session, builds: Iterable[str | GoodBuild], printer: str | None = None
                 ) -> list[AdaptLayer]:
    """The layers with status ok of the given builds, by printer, build and layer.

    Args:
        builds: build names (every build of that name on `printer`, or on any printer with
            None) or GoodBuild records from good_builds (that printer's build). Marked good
            or not: the caller chooses.
        printer: only builds on this printer.

    Raises UnknownBuild for an entry that matches no build.
    """
    ids: set[int] = set()
    for b in builds:
        name, on = (b.build, b.printer) if isinstance(b, GoodBuild) else (b, None)
        q = select(Build.id).where(Build.name == name)
        for p in (on, printer):
            if p is not None:
                q = q.where(Build.printer == p)
        found = list(s.scalars(q))
        if not found:
            raise UnknownBuild(name, printer if on is None else on)
        ids.update(found)
    if not ids:
        return []
    q2 = (select(Build.printer, Build.name, Layer.layer, Layer.image_path, Layer.image_sha256)
          .join(Build, Layer.build_id == Build.id)
          .where(Layer.build_id.in_(ids), Layer.status == "ok")
          .order_by(Build.printer, Build.name, Layer.layer))
    return [AdaptLayer(printer=p, build=n, layer=k, image_path=path, image_sha256=sha or None)
            for p, n, k, path, sha in s.execute(q2)]


def verdict_alarms(s: Session, printer: str | None = None) -> list[VerdictAlarm]:
    """Alarms an operator marked confirmed or false_alarm, by printer, build, layer and id;
    on `printer`, or on every printer with None."""
    q = (select(Alarm, Build.printer, Build.name, Layer.image_path)
         .join(Build, Alarm.build_id == Build.id)
         .outerjoin(Layer, and_(Layer.build_id == Alarm.build_id, Layer.layer == Alarm.layer))
         .where(Alarm.verdict.is_not(None)))
    if printer is not None:
        q = q.where(Build.printer == printer)
    out = []
    for a, p, n, image in s.execute(q.order_by(Build.printer, Build.name, Alarm.layer,
                                               Alarm.id)):
        out.append(VerdictAlarm(
            id=a.id, printer=p, build=n, layer=a.layer, class_name=a.class_name or None,
            rule=a.rule, verdict=str(a.verdict), note=a.verdict_note, image_path=image,
            part=a.part, track=a.track,
            position_mm=(None if a.position_x_mm is None or a.position_y_mm is None
                         else (a.position_x_mm, a.position_y_mm)),
            boxes_px=_alarm_boxes(s, a)))
    return out


def _alarm_boxes(s: Session, a: Alarm) -> tuple[tuple[int, int, int, int], ...]:
    """The stored components of the alarm's class in its layer (of its track, for track
    alarms), largest first."""
    if not a.class_name:
        return ()
    q = (select(ComponentRow.x, ComponentRow.y, ComponentRow.w, ComponentRow.h)
         .join(Layer, ComponentRow.layer_id == Layer.id)
         .where(Layer.build_id == a.build_id, Layer.layer == a.layer,
                ComponentRow.class_name == a.class_name))
    if a.track is not None:
        q = q.where(ComponentRow.track == a.track)
    q = q.order_by(ComponentRow.area_px.desc(), ComponentRow.id)
    return tuple((x, y, w, h) for x, y, w, h in s.execute(q))


def load_engine_state(s: Session, printer: str, name: str) -> EngineState | None:
    """What the alarm engine needs to go on with a build after a restart."""
    build = s.scalar(select(Build).where(Build.printer == printer, Build.name == name))
    if build is None:
        return None
    rules = {r.rule: RuleState(streak=r.streak, open=r.open, active=r.active,
                               last_open_layer=r.last_open_layer,
                               history=[float(v) for v in json.loads(r.history or "[]")])
             for r in s.scalars(select(RuleStateRow).where(RuleStateRow.build_id == build.id))}
    live = [
        Track(number=t.number, class_name=t.class_name, first_layer=t.first_layer,
              last_layer=t.last_layer, layers=t.layers, volume_mm3=t.volume_mm3,
              max_area_mm2=t.max_area_mm2, x0=t.x0, y0=t.y0, x1=t.x1, y1=t.y1,
              alarmed=t.alarmed, area_mm2=t.area_mm2, growing=t.growing,
              boxes=[tuple(b) for b in json.loads(t.boxes)])
        for t in s.scalars(select(TrackRow).where(TrackRow.build_id == build.id,
                                                  TrackRow.ended.is_(False)))
    ]
    top = s.scalar(select(func.max(TrackRow.number)).where(TrackRow.build_id == build.id)) or 0
    arrivals = [t for (t,) in s.execute(
        select(Layer.detected_at).where(Layer.build_id == build.id)
        .order_by(Layer.layer.desc()).limit(21))][::-1]
    stall_open = s.scalar(select(Alarm.id).where(
        Alarm.build_id == build.id, Alarm.rule == "stall",
        Alarm.state.in_(("open", "acknowledged"))).limit(1)) is not None
    last_layer = s.scalar(select(func.max(Layer.layer)).where(Layer.build_id == build.id))
    # the layers the engine saw: "the previous layer" is the previous one received
    evaluated = [n for (n,) in s.execute(
        select(Layer.layer).where(Layer.build_id == build.id, Layer.status == "ok",
                                  Layer.layer <= (build.last_evaluated_layer or -1))
        .order_by(Layer.layer))]
    return EngineState(
        first_layer=build.first_layer, last_evaluated=build.last_evaluated_layer,
        last_layer=last_layer, rules=rules, tracks=live, next_track=top + 1,
        arrivals=arrivals, stall_open=stall_open, last_layer_at=build.last_layer_at,
        evaluated_layers=evaluated)


def active_builds(s: Session, since: float) -> list[tuple[str, str]]:
    """(printer, build) of builds with a layer after `since`, newest first."""
    q = select(Build.printer, Build.name).where(Build.last_layer_at >= since).order_by(
        Build.last_layer_at.desc())
    return [(p, n) for p, n in s.execute(q)]


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


def alarm_records(s: Session, *, build: str | None = None, open_only: bool = False
                  ) -> list[AlarmRecord]:
    """list_alarms as records, newest first (what alarm messages are built from)."""
    return [a.record(p, n) for a, p, n in list_alarms(s, build=build, open_only=open_only)]


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
    q = (select(Layer).where(Layer.build_id == build_id)
         .options(selectinload(Layer.classes), selectinload(Layer.regions),
                  selectinload(Layer.parts))
         .order_by(Layer.layer.desc()).limit(1))
    return s.scalar(q)


def alarm_by_id(s: Session, alarm_id: int) -> AlarmRecord | None:
    row = s.execute(select(Alarm, Build.printer, Build.name).join(Build)
                    .where(Alarm.id == alarm_id)).first()
    return None if row is None else row[0].record(row[1], row[2])
