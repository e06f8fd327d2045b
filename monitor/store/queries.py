"""Read queries: the rescan, the alarm engine's state after a restart, the state endpoint,
reports, the dashboard and the CLI. Nothing here writes.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Integer, func, select
from sqlalchemy.orm import Session, selectinload

from monitor.records import AlarmRecord, EngineState, Outgoing, RuleState, Track
from monitor.store.schema import (
    Alarm,
    Build,
    Layer,
    LayerMap,
    Mute,
    OutboxRow,
    RuleStateRow,
    TrackRow,
)


def pending_outbox(s: Session) -> list[Outgoing]:
    rows = s.scalars(select(OutboxRow).where(OutboxRow.published.is_(False))
                     .order_by(OutboxRow.seq))
    return [Outgoing(r.seq, r.topic, json.loads(r.payload)) for r in rows]


def last_seq(s: Session) -> int:
    return s.scalar(select(OutboxRow.seq).order_by(OutboxRow.seq.desc()).limit(1)) or 0


def known_images(s: Session) -> dict[str, tuple[int | None, int | None]]:
    """image path -> (size, mtime_ns) of every stored layer, for the rescan."""
    rows = s.execute(select(Layer.image_path, Layer.image_size, Layer.image_mtime_ns))
    return {p: (size, mtime) for p, size, mtime in rows}


def list_builds(s: Session) -> list[dict[str, Any]]:
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
    q = select(Layer).join(Build).where(Build.name == build)
    if printer is not None:
        q = q.where(Build.printer == printer)
    return list(s.scalars(q.options(selectinload(Layer.classes), selectinload(Layer.regions),
                                    selectinload(Layer.parts))
                          .order_by(Layer.layer)))


def build_id_of(s: Session, printer: str, name: str) -> int | None:
    return s.scalar(select(Build.id).where(Build.printer == printer, Build.name == name))


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
              alarmed=t.alarmed, boxes=[tuple(b) for b in json.loads(t.boxes)])
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
