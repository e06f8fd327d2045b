"""What the writer's jobs do, each inside its transaction: layers with their statistics and
components, defect maps, alarm transitions, verdicts, rule states, tracks, mutes, builds
marked good and the outbox.

Outgoing messages are kept in the outbox table until the publisher has sent them and every
enabled sink's cursor is past them, so a crash between the commit and the send loses
nothing: they are re-sent on restart with their seq.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session

from monitor.errors import StoreError, UnknownBuild
from monitor.records import (
    AlarmEvent,
    AlarmRecord,
    EncodedMap,
    GoodBuild,
    LayerRecord,
    OutboxStart,
    Outgoing,
    Track,
    present_key,
)
from monitor.store.queries import (
    build_id_of,
    find_build,
    good_build,
    last_seq,
    outbox_after,
    pending_outbox,
    present,
)
from monitor.store.schema import (
    Alarm,
    Build,
    ClassStat,
    ComponentRow,
    Layer,
    LayerMap,
    Mute,
    OutboxRow,
    PartStatRow,
    PresentRow,
    RegionStat,
    RuleStateRow,
    SinkCursor,
    TrackRow,
)


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
    for p in rec.parts:
        row.parts.append(PartStatRow(
            part=p.id, nominal_mm2=p.nominal_mm2, printed_fraction=p.printed_fraction,
            excess_fraction=p.excess_fraction, centroid_shift_mm=p.centroid_shift_mm,
            classes=json.dumps(p.classes)))
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
    """Queue messages for publishing in the current transaction; assigns their seq, and
    records which of them are now the present (outbox_present)."""
    rows = [OutboxRow(topic=t, payload=json.dumps(p), created_at=time.time())
            for t, p in messages]
    s.add_all(rows)
    s.flush()
    out = [Outgoing(r.seq, r.topic, json.loads(r.payload)) for r in rows]
    latest: dict[str, int | None] = {}  # key -> its newest message; None: an alarm cleared
    for m in out:
        if (key := present_key(m)) is not None:
            latest[key] = None if m.payload.get("state") == "cleared" else m.seq
    if latest:
        s.execute(delete(PresentRow).where(PresentRow.key.in_(latest)))
        kept = [{"key": k, "seq": v} for k, v in latest.items() if v is not None]
        if kept:
            s.execute(insert(PresentRow), kept)
    return out


def mark_published(s: Session, seqs: list[int]) -> None:
    s.execute(update(OutboxRow).where(OutboxRow.seq.in_(seqs)).values(published=True))


def prune_outbox(s: Session, *, keep: int = 10_000, floor: int | None = None) -> int:
    """Drop published messages beyond the newest `keep` that every enabled sink has taken
    (seq <= floor) and that are not part of the present; the layers table is the record.
    Returns the seq up to which it pruned."""
    newest = s.scalar(select(OutboxRow.seq).order_by(OutboxRow.seq.desc()).limit(1)) or 0
    limit = newest - keep if floor is None else min(newest - keep, floor)
    s.execute(delete(OutboxRow).where(OutboxRow.published.is_(True), OutboxRow.seq <= limit,
                                      OutboxRow.seq.not_in(select(PresentRow.seq))))
    return limit


def open_outbox(s: Session, sinks: Iterable[str], *, keep: int = 10_000) -> OutboxStart:
    """At start: each enabled sink's cursor (a sink without one starts where ZeroMQ is), the
    outbox pruned to what ZeroMQ or an enabled sink may still need, the present, and each
    sink's backlog (what was committed after its cursor). A sink that is off loses its
    cursor once the outbox is pruned past it: switched on again, it starts afresh from the
    present rather than with a hole in its backlog."""
    last = last_seq(s)
    pending = pending_outbox(s)
    frontier = pending[0].seq - 1 if pending else last  # ZeroMQ sent everything up to here
    now = time.time()
    cursors: dict[str, int] = {}
    for name in sinks:
        row = s.get(SinkCursor, name)
        if row is None:
            row = SinkCursor(name=name, seq=frontier, updated_at=now)
            s.add(row)
        elif row.seq > last:  # the outbox lost its newest rows (edited by hand): seqs recur
            row.seq, row.updated_at = last, now
        cursors[name] = row.seq
    s.flush()
    pruned = prune_outbox(s, keep=keep, floor=min(cursors.values(), default=None))
    s.execute(delete(SinkCursor).where(SinkCursor.name.not_in(cursors),
                                       SinkCursor.seq < pruned))
    after = outbox_after(s, min(cursors.values())) if cursors else []
    return OutboxStart(
        last_seq=last, pending=pending, present=present(s), cursors=cursors,
        backlog={n: [m for m in after if m.seq > c] for n, c in cursors.items()})


def set_cursors(s: Session, cursors: Mapping[str, int]) -> None:
    """Move sinks' cursors forward (never back: a late write of an older one is a no-op)."""
    now = time.time()
    for name, seq in cursors.items():
        s.execute(update(SinkCursor).where(SinkCursor.name == name, SinkCursor.seq < seq)
                  .values(seq=seq, updated_at=now))


def apply_alarm(s: Session, build_id: int, ev: AlarmEvent, now: float) -> list[AlarmRecord]:
    """Record an alarm transition; returns the alarms it opened or cleared."""
    if ev.action == "open":
        row = Alarm(build_id=build_id, layer=ev.layer, class_name=ev.class_name, rule=ev.rule,
                    severity=ev.severity, state="open", value=ev.value, threshold=ev.threshold,
                    opened_at=now, track=ev.track, part=ev.part,
                    model_trusted=ev.model_trusted, unit=ev.unit, url=ev.url,
                    position_x_mm=ev.position_mm[0] if ev.position_mm else None,
                    position_y_mm=ev.position_mm[1] if ev.position_mm else None)
        s.add(row)
        s.flush()
        return [row.record(ev.printer, ev.build)]
    q = select(Alarm).where(Alarm.build_id == build_id, Alarm.rule == ev.rule,
                            Alarm.state.in_(("open", "acknowledged")))
    if ev.track is not None:
        q = q.where(Alarm.track == ev.track)
    rows = list(s.scalars(q))
    for row in rows:
        row.state, row.cleared_at, row.cleared_layer = "cleared", now, ev.layer
    s.flush()
    return [row.record(ev.printer, ev.build) for row in rows]


def acknowledge_alarm(s: Session, alarm_id: int, now: float) -> AlarmRecord:
    """open -> acknowledged; StoreError if there is no such open alarm."""
    row = s.get(Alarm, alarm_id)
    if row is None:
        raise StoreError(f"no alarm with id {alarm_id}")
    if row.state != "open":
        raise StoreError(f"alarm {alarm_id} is {row.state}, not open")
    row.state, row.acked_at = "acknowledged", now
    s.flush()
    build = s.get(Build, row.build_id)
    assert build is not None  # the foreign key
    return row.record(build.printer, build.name)


VERDICTS = ("confirmed", "false_alarm")


def set_verdict(s: Session, alarm_id: int, verdict: str, note: str | None, now: float
                ) -> AlarmRecord:
    """An operator's verdict on an alarm (in any state; a new verdict replaces the old)."""
    if verdict not in VERDICTS:
        raise StoreError(f"verdict {verdict!r}: expected one of {', '.join(VERDICTS)}")
    row = s.get(Alarm, alarm_id)
    if row is None:
        raise StoreError(f"no alarm with id {alarm_id}")
    row.verdict, row.verdict_note, row.verdict_at = verdict, note or None, now
    s.flush()
    build = s.get(Build, row.build_id)
    assert build is not None  # the foreign key
    return row.record(build.printer, build.name)


MAX_NOTE = 2000  # characters in a good build's note, as in a verdict's


def mark_good(s: Session, printer: str | None, build: str, note: str | None,
              good: bool = True, *, now: float | None = None) -> GoodBuild | None:
    """An operator's word that a build printed well: its ok layers become the printer's
    healthy examples for `pbf-monitor adapt`. good=False removes the mark; marking again
    replaces the time and the note. Returns the build's mark after the change (None once
    removed).

    printer None: the build's printer, when only one printer has a build of that name.
    Raises UnknownBuild naming a build that is not in the database.

    Runs in the caller's transaction: on the running daemon's writer thread (the state
    endpoint's mark-good command), or, with no daemon running, in the short transaction of
    `pbf-monitor mark-good` (BEGIN IMMEDIATE, SQLite in WAL mode: readers are not held up).
    """
    if note is not None and (len(note) > MAX_NOTE or "\x00" in note):
        raise StoreError(f"note: at most {MAX_NOTE} characters, without NUL")
    row = find_build(s, printer, build)
    if good:
        row.marked_good_at = time.time() if now is None else now
        row.marked_good_note = note or None
    else:
        row.marked_good_at = row.marked_good_note = None
    s.flush()
    return good_build(s, row.id)


def mark_good_reply(build: str, printer: str | None, mark: GoodBuild | None
                    ) -> dict[str, Any]:
    """What mark_good did, as the state endpoint's mark-good command answers it."""
    if mark is None:
        return {"good": False, "build": build, "printer": printer}
    return {"good": True, **mark.summary()}


def set_evaluated(s: Session, build_id: int, *, first_layer: int | None, layer: int) -> None:
    """The alarm engine evaluated `layer` of the build (its first layer as it saw it)."""
    build = s.get(Build, build_id)
    assert build is not None  # put_layer made it in this transaction
    build.first_layer = first_layer
    build.last_evaluated_layer = max(build.last_evaluated_layer or layer, layer)


def put_rule_states(s: Session, build_id: int, states: Mapping[str, dict[str, Any]]
                    ) -> None:
    existing = {r.rule: r for r in s.scalars(
        select(RuleStateRow).where(RuleStateRow.build_id == build_id))}
    for rule, state in states.items():
        st = {**state, "history": json.dumps(state.get("history", []))}
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
            "area_mm2": t.area_mm2, "growing": t.growing,
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


def no_build(printer: str, name: str) -> UnknownBuild:
    return UnknownBuild(name, printer)


def add_mute(s: Session, printer: str, name: str, class_name: str | None, now: float) -> None:
    bid = build_id_of(s, printer, name)
    if bid is None:
        raise no_build(printer, name)
    s.add(Mute(build_id=bid, class_name=class_name, created_at=now))


def remove_mutes(s: Session, printer: str, name: str, class_name: str | None) -> None:
    bid = build_id_of(s, printer, name)
    if bid is None:
        raise no_build(printer, name)
    q = delete(Mute).where(Mute.build_id == bid)
    q = q.where(Mute.class_name.is_(None) if class_name is None else
                Mute.class_name == class_name)
    s.execute(q)


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
