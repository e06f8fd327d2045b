"""The records that pass between the daemon's stages and out to the store and the publisher.

Plain typed objects with no behaviour beyond their own shape, below every module that uses
them: the alarm engine makes events, tracks and rule states; the store writes and reads them;
the publisher turns them into messages. None of those needs to import another for its types.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from monitor.vision.stats import LayerStats


def storable(text: str) -> str:
    """A name from the file system as text every database and JSON take: the bytes of a name
    that is not UTF-8 (os.fsdecode's surrogate escapes) become ``\\xNN``, so
    b"bad\\xff" is stored, published and reported as ``bad\\xff``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class BuildKey:
    printer: str
    build: str


@dataclass(frozen=True)
class PartRecord:
    """One nominal part in one layer, against its slice. Fractions are of its nominal area."""

    id: int
    nominal_mm2: float
    printed_fraction: float
    excess_fraction: float  # printed outside every part's tolerance zone, nearest this part
    centroid_shift_mm: float | None  # printed vs nominal centroid; None if nothing printed
    classes: dict[str, float] = field(default_factory=dict)  # defect area / nominal area
    # its widest inscribed circle in image pixels: below alarms.parts.min_width_px the camera
    # does not resolve it well enough to call it missing (not stored: a property of the slice)
    width_px: float = math.inf

    def summary(self) -> dict[str, Any]:
        """The per-part object of messages and reports."""
        return {"id": self.id, "nominal_mm2": round(self.nominal_mm2, 4),
                "printed_fraction": round(self.printed_fraction, 4),
                "excess_fraction": round(self.excess_fraction, 4),
                "centroid_shift_mm": (None if self.centroid_shift_mm is None
                                      else round(self.centroid_shift_mm, 4)),
                "classes": {k: round(v, 6) for k, v in self.classes.items()}}


@dataclass(frozen=True)
class LayerRecord:
    """Everything the daemon learned about one image, ready to store."""

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
    parts: tuple[PartRecord, ...] = ()  # per nominal part; () without a nominal slice

    def __post_init__(self) -> None:
        # Names and reasons may carry a file name that is not UTF-8.
        for name in ("build", "image_path", "error"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, storable(value))


@dataclass(frozen=True)
class AlarmEvent:
    """An alarm to open, or the open/acknowledged alarms of a rule to clear."""

    action: Literal["open", "clear"]
    printer: str
    build: str
    layer: int
    class_name: str
    rule: str
    severity: str
    value: float
    threshold: float
    track: int | None = None  # track alarms: the track number in the build
    part: int | None = None  # part alarms: the nominal part id; others: the part it is on
    model_trusted: bool = True  # False: a defect-class alarm capped by an untrusted model
    unit: str = ""  # of value and threshold: mm², mm³, fraction, count, layers
    position_px: tuple[float, float] | None = None  # where to look, image pixels (x, y)
    position_mm: tuple[float, float] | None = None  # the same on the plate, mm
    url: str | None = None  # the layer's overlay in the dashboard


@dataclass(frozen=True)
class AlarmRecord:
    """One stored alarm in its current state (what the `alarm` message carries)."""

    id: int
    printer: str
    build: str
    layer: int
    class_name: str
    rule: str
    severity: str
    state: str  # open | acknowledged | cleared
    value: float
    threshold: float
    opened_at: float
    acked_at: float | None = None
    cleared_at: float | None = None
    cleared_layer: int | None = None
    track: int | None = None
    part: int | None = None
    model_trusted: bool = True
    unit: str = ""
    position_mm: tuple[float, float] | None = None
    url: str | None = None
    verdict: str | None = None  # confirmed | false_alarm, by an operator
    verdict_note: str | None = None
    verdict_at: float | None = None


@dataclass
class RuleState:
    """The alarm engine's memory of one rule in one build."""

    streak: int = 0
    open: bool = False  # an unacknowledged alarm of the rule is open
    active: bool = False  # an open or acknowledged alarm waits to be cleared
    last_open_layer: int | None = None
    # Relative rules: the metric's values of the last layers that form the baseline,
    # oldest first (at most the rule's window).
    history: list[float] = field(default_factory=list)

    def as_row(self) -> dict[str, Any]:
        return {"streak": self.streak, "open": self.open, "active": self.active,
                "last_open_layer": self.last_open_layer, "history": list(self.history)}


@dataclass
class Track:
    """One defect followed through layers."""

    number: int  # unique per build
    class_name: str
    first_layer: int
    last_layer: int
    layers: int
    volume_mm3: float
    max_area_mm2: float
    x0: int
    y0: int
    x1: int
    y1: int
    alarmed: bool = False
    ended: bool = False
    area_mm2: float = 0.0  # in its last layer
    growing: int = 0  # layers in a row its area grew by tracks.grow_ratio or more
    # The boxes of its components in its last layer, for linking the next one.
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class TrackChange:
    """What one layer did to the tracks of a build."""

    # (class, index in the class's component_list) -> track number
    assignments: dict[tuple[str, int], int]
    touched: list[Track]  # created or extended in this layer
    ended: list[Track]  # ended because this layer did not continue them
    alarms: list[Track]  # crossed an alarm limit in this layer


@dataclass(frozen=True)
class LayerAlarms:
    """What evaluating one layer produced; persisted with the layer in one transaction."""

    events: list[AlarmEvent]
    rule_states: dict[str, dict[str, Any]]
    first_layer: int | None
    tracks: TrackChange | None
    evaluated: bool  # False: a layer number already seen (a replaced image), not re-counted


@dataclass(frozen=True)
class EngineState:
    """What the alarm engine needs to go on with a build after a restart."""

    first_layer: int | None
    last_evaluated: int | None
    last_layer: int | None
    rules: dict[str, RuleState]
    tracks: list[Track]  # the live ones
    next_track: int
    arrivals: list[float]  # detection times of the last layers, oldest first
    stall_open: bool
    last_layer_at: float | None
    # layer numbers the engine evaluated, ascending (what "the previous layer" means)
    evaluated_layers: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Outgoing:
    """A committed message waiting to be published."""

    seq: int
    topic: str
    payload: dict[str, Any]


def present_key(m: Outgoing) -> str | None:
    """What part of the present a message is the latest of: ``layer/<printer>`` (a
    printer's last layer), ``alarm/<id>`` (an alarm not yet cleared); None for a test alarm
    and anything else. MQTT's retained topics and the OPC UA address space show these."""
    if m.topic == "layer":
        return f"layer/{m.payload.get('printer') or ''}"
    if m.topic == "alarm" and not m.payload.get("test"):
        return f"alarm/{m.payload.get('id')}"
    return None


@dataclass(frozen=True)
class Present:
    """The present as of message `seq`: each printer's last layer message and each open or
    acknowledged alarm's latest one, in seq order (the outbox_present table)."""

    seq: int
    messages: tuple[Outgoing, ...] = ()


@dataclass(frozen=True)
class OutboxStart:
    """The outbox as the daemon finds it at start (monitor.store.writes.open_outbox)."""

    last_seq: int
    pending: list[Outgoing]  # not yet sent on ZeroMQ, in seq order
    present: Present
    cursors: dict[str, int]  # sink -> the last seq it took responsibility for
    backlog: dict[str, list[Outgoing]]  # sink -> committed after its cursor, in seq order


@dataclass(frozen=True)
class EncodedMap:
    """A layer's defect map and thumbnail, encoded (see monitor.reports.maps)."""

    scale: int  # original pixels per map pixel, along each axis
    mask_png: bytes
    thumb_jpeg: bytes


# What `pbf-monitor adapt` reads from the store: builds an operator marked good, their
# layers, and alarms an operator gave a verdict on.


@dataclass(frozen=True)
class GoodBuild:
    """A build an operator marked good (`pbf-monitor mark-good`)."""

    printer: str
    build: str
    marked_at: float  # time.time() of the mark
    note: str | None
    layers: int  # its layers with status ok

    def summary(self) -> dict[str, Any]:
        """The mark as the state endpoint's mark-good reply carries it."""
        return {"printer": self.printer, "build": self.build, "marked_good_at": self.marked_at,
                "note": self.note, "layers": self.layers}


@dataclass(frozen=True)
class AdaptLayer:
    """One stored layer with status ok: where its camera image is."""

    printer: str
    build: str
    layer: int
    image_path: str  # as stored: the path the daemon read (the file may since be gone)
    image_sha256: str | None  # of the bytes the daemon read, to tell a file replaced since


@dataclass(frozen=True)
class VerdictAlarm:
    """An alarm an operator marked confirmed or false_alarm, with what it points at."""

    id: int
    printer: str
    build: str
    layer: int
    class_name: str | None  # the defect class; None for part and stall alarms
    rule: str
    verdict: str  # confirmed | false_alarm
    note: str | None
    image_path: str | None  # the alarm layer's image as stored; None if no such layer
    part: int | None  # the nominal part it is on (part alarms: the part itself)
    track: int | None  # track alarms: the track number in the build
    position_mm: tuple[float, float] | None  # [x, y] on the plate, as published
    # Stored components of the class in the alarm's layer, (x, y, w, h) image pixels,
    # largest first: a track alarm's own components; for a class rule every stored one of
    # the layer (its metric may have counted only a region or the parts zone, and a layer
    # keeps its largest store.max_components per class); () for part and stall alarms and
    # no_defect.
    boxes_px: tuple[tuple[int, int, int, int], ...] = ()
