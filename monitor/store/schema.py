"""The database schema: SQLAlchemy models of builds (and an operator's mark that one printed
well), layers, statistics, alarms, tracks, defect maps, mutes, the outbox with the present
and its sinks' delivery cursors. Migrations (monitor.store.migrate) must match them.
"""

from __future__ import annotations

import json
from typing import Any

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
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from monitor.records import AlarmRecord, PartRecord
from monitor.vision.stats import ClassStats


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
    # An operator's word that the build printed well: its ok layers are this printer's
    # healthy examples for `pbf-monitor adapt`. NULL: not marked.
    marked_good_at: Mapped[float | None] = mapped_column(Float)
    marked_good_note: Mapped[str | None] = mapped_column(Text)


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
    parts: Mapped[list[PartStatRow]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True, order_by="PartStatRow.id"
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


class PartStatRow(Base):
    """One nominal part in one layer against its slice; fractions are of its nominal area."""

    __tablename__ = "part_stats"

    id: Mapped[int] = mapped_column(primary_key=True)
    layer_id: Mapped[int] = mapped_column(ForeignKey("layers.id", ondelete="CASCADE"), index=True)
    part: Mapped[int] = mapped_column(Integer)  # the slice's part id, stable through layers
    nominal_mm2: Mapped[float] = mapped_column(Float)
    printed_fraction: Mapped[float] = mapped_column(Float)
    excess_fraction: Mapped[float] = mapped_column(Float)
    centroid_shift_mm: Mapped[float | None] = mapped_column(Float)
    classes: Mapped[str] = mapped_column(Text, default="{}")  # JSON: class -> area / nominal

    def record(self) -> PartRecord:
        return PartRecord(id=self.part, nominal_mm2=self.nominal_mm2,
                          printed_fraction=self.printed_fraction,
                          excess_fraction=self.excess_fraction,
                          centroid_shift_mm=self.centroid_shift_mm,
                          classes=json.loads(self.classes))


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
    area_mm2: Mapped[float] = mapped_column(Float, default=0.0)  # in its last layer
    growing: Mapped[int] = mapped_column(Integer, default=0)  # layers in a row it grew
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
    history: Mapped[str] = mapped_column(Text, default="[]")  # relative rules' baseline, JSON


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
    part: Mapped[int | None] = mapped_column(Integer)  # the nominal part it is on
    # False: a defect-class alarm of weights not adapted to this camera (capped, no hook)
    model_trusted: Mapped[bool] = mapped_column(Boolean, default=True)
    unit: Mapped[str] = mapped_column(String(20), default="")  # of value and threshold
    position_x_mm: Mapped[float | None] = mapped_column(Float)  # where to look on the plate
    position_y_mm: Mapped[float | None] = mapped_column(Float)
    url: Mapped[str | None] = mapped_column(Text)  # the layer's overlay in the dashboard
    verdict: Mapped[str | None] = mapped_column(String(20))  # confirmed | false_alarm
    verdict_note: Mapped[str | None] = mapped_column(Text)
    verdict_at: Mapped[float | None] = mapped_column(Float)

    def record(self, printer: str, build: str) -> AlarmRecord:
        """This row as the plain record messages are built from."""
        return AlarmRecord(
            id=self.id, printer=printer, build=build, layer=self.layer,
            class_name=self.class_name, rule=self.rule, severity=self.severity,
            state=self.state, value=self.value, threshold=self.threshold,
            opened_at=self.opened_at, acked_at=self.acked_at, cleared_at=self.cleared_at,
            cleared_layer=self.cleared_layer, track=self.track, part=self.part,
            model_trusted=self.model_trusted, unit=self.unit,
            position_mm=(None if self.position_x_mm is None or self.position_y_mm is None
                         else (self.position_x_mm, self.position_y_mm)),
            url=self.url, verdict=self.verdict, verdict_note=self.verdict_note,
            verdict_at=self.verdict_at)


class OutboxRow(Base):
    __tablename__ = "outbox"

    seq: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    topic: Mapped[str] = mapped_column(String(50))
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    published: Mapped[bool] = mapped_column(Boolean, default=False, index=True)


class PresentRow(Base):
    """The outbox messages that are the present: each printer's last layer, each open or
    acknowledged alarm's latest transition (key: records.present_key). Written with the
    outbox, never pruned; the MQTT retained topics and the OPC UA address space are seeded
    from them at start."""

    __tablename__ = "outbox_present"

    key: Mapped[str] = mapped_column(String(250), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer)


class SinkCursor(Base):
    """How far a sink of the committed stream (mqtt, opcua) has taken responsibility: every
    message up to `seq` was delivered, or dropped and counted. The outbox is not pruned
    past the lowest cursor of an enabled sink, and a sink catches up from its own at start."""

    __tablename__ = "sink_cursors"

    name: Mapped[str] = mapped_column(String(50), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[float] = mapped_column(Float)
