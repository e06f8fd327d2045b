"""Defects that stack: components of one class linked through consecutive layers.

A component in layer L extends a track when its bounding box, grown by the link distance,
overlaps the box of one of the track's components in the track's last layer (at most
``max_gap_layers`` layers back, counted in layers received: see ``update``'s ``steps``).
A track's volume is the sum of its components' areas times the layer thickness. A track
that spans ``alarm_layers`` layers, or whose volume exceeds ``alarm_volume_mm3``, is a
defect growing through the part: it raises one alarm, which clears when the track stops (no
continuation within the gap). So does a track of a ``grow_classes`` class whose area grew by
``grow_ratio`` on each of its last ``grow_layers`` layers, to ``grow_min_area_mm2``: a
swelling rises layer by layer, and the recoater meets it before its volume is large.
``track_events`` turns a layer's track changes into those alarms (rule ``track.<class>``).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Iterable, Sequence

from monitor.config import TracksConfig
from monitor.records import AlarmEvent, BuildKey, RuleState, Track, TrackChange
from monitor.vision.stats import Component, LayerStats

TRACK_PREFIX = "track."


def _box(c: Component) -> tuple[int, int, int, int]:
    return (c.x, c.y, c.x + c.w, c.y + c.h)


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int], grow: float) -> float:
    """Overlap area of a (grown by `grow` px on every side) and b; > 0 means they link."""
    w = min(a[2] + grow, b[2]) - max(a[0] - grow, b[0])
    h = min(a[3] + grow, b[3]) - max(a[1] - grow, b[1])
    return w * h if w > 0 and h > 0 else 0.0


def growing(t: Track, cfg: TracksConfig) -> bool:
    """The track has grown layer on layer long enough, and is large enough, to alarm."""
    return (cfg.grow_layers > 0 and t.class_name in cfg.grow_classes
            and t.growing >= cfg.grow_layers and t.area_mm2 >= cfg.grow_min_area_mm2)


def crossed(t: Track, cfg: TracksConfig) -> tuple[float, float, str] | None:
    """The alarm limit the track has crossed, as (value, limit, unit): its length in layers,
    its volume, or the area it grew to; None while under all three. Volume counts only once
    the defect is seen stacking (two layers or more): a large defect in a single layer is
    the threshold rules' business."""
    if t.layers >= cfg.alarm_layers:
        return float(t.layers), float(cfg.alarm_layers), "layers"
    if t.layers >= 2 and t.volume_mm3 > cfg.alarm_volume_mm3:
        return t.volume_mm3, cfg.alarm_volume_mm3, "mm³"
    if growing(t, cfg):
        return t.area_mm2, cfg.grow_min_area_mm2, "mm²"
    return None


class BuildTracks:
    """The live tracks of one build."""

    def __init__(self, cfg: TracksConfig, *, pixel_size_mm: float, layer_thickness_mm: float,
                 next_number: int = 1) -> None:
        self.cfg = cfg
        self.px_mm2 = pixel_size_mm * pixel_size_mm
        self.grow = cfg.link_distance_mm / pixel_size_mm
        self.thickness = layer_thickness_mm
        self.next_number = next_number
        self.live: list[Track] = []
        self.last_layer: int | None = None

    def adopt(self, tracks: Iterable[Track]) -> None:
        """Tracks restored from the database (still live at the last stored layer)."""
        for t in tracks:
            self.live.append(t)
            self.next_number = max(self.next_number, t.number + 1)
            self.last_layer = max(self.last_layer or t.last_layer, t.last_layer)

    def update(self, layer: int, stats: LayerStats,
               steps: Callable[[int, int], int] | None = None) -> TrackChange:
        """Link the layer's components into tracks.

        Args:
            steps: (a, b) -> layers received after layer a up to b; default b - a.
        """
        cfg = self.cfg
        gap = steps or (lambda a, b: b - a)
        min_px = cfg.min_area_mm2 / self.px_mm2
        assignments: dict[tuple[str, int], int] = {}
        touched: dict[int, Track] = {}
        layer_area: dict[int, float] = {}
        alarms: list[Track] = []
        reachable = [t for t in self.live
                     if t.last_layer < layer and gap(t.last_layer, layer) <= cfg.max_gap_layers + 1]
        for cls in cfg.classes:
            st = stats.classes.get(cls)
            if st is None:
                continue
            candidates = [t for t in reachable if t.class_name == cls]
            new_boxes: dict[int, list[tuple[int, int, int, int]]] = {}
            for i, comp in enumerate(st.component_list):
                if comp.area_px < min_px:
                    continue
                box = _box(comp)
                best, best_overlap = None, 0.0
                for t in candidates:
                    ov = max((_overlap(box, b, self.grow) for b in t.boxes), default=0.0)
                    if ov > best_overlap:
                        best, best_overlap = t, ov
                if best is None:
                    best = Track(number=self.next_number, class_name=cls, first_layer=layer,
                                 last_layer=layer, layers=0, volume_mm3=0.0, max_area_mm2=0.0,
                                 x0=box[0], y0=box[1], x1=box[2], y1=box[3])
                    self.next_number += 1
                    self.live.append(best)
                area_mm2 = comp.area_px * self.px_mm2
                if best.number not in touched:  # first component of this track in this layer
                    best.layers += 1
                    best.last_layer = layer
                    touched[best.number] = best
                layer_area[best.number] = layer_area.get(best.number, 0.0) + area_mm2
                best.volume_mm3 += area_mm2 * self.thickness
                best.x0, best.y0 = min(best.x0, box[0]), min(best.y0, box[1])
                best.x1, best.y1 = max(best.x1, box[2]), max(best.y1, box[3])
                new_boxes.setdefault(best.number, []).append(box)
                assignments[(cls, i)] = best.number
            for number, boxes in new_boxes.items():
                touched[number].boxes = boxes
        for t in touched.values():
            area = layer_area[t.number]
            grew = t.layers >= 2 and 0 < t.area_mm2 * cfg.grow_ratio <= area
            t.growing = t.growing + 1 if grew else 0
            t.area_mm2 = area
            t.max_area_mm2 = max(t.max_area_mm2, area)
            if not t.alarmed and crossed(t, cfg) is not None:
                t.alarmed = True
                alarms.append(t)
        ended = [t for t in self.live
                 if t.number not in touched and gap(t.last_layer, layer) > cfg.max_gap_layers]
        for t in ended:
            t.ended = True
        self.live = [t for t in self.live if not t.ended]
        self.last_layer = layer
        return TrackChange(assignments, list(touched.values()), ended, alarms)


def usual_look(change: TrackChange, rules: dict[str, RuleState], on: LayerStats,
               cfg: TracksConfig, touched: list[str], *, thickness: float) -> TrackChange:
    """The layer's track alarms less those of tracks that are the build's usual look.

    A model that is not at home with a camera marks some of a class on every layer (a
    texture, a lighting change that comes and goes), and those marks stack as surely as a
    defect. Each tracked class's area (`on`: the parts' zone, or the layer) is kept over the
    last `baseline_window` layers in its rule state ``track.<class>`` of `rules` (stored
    with the build, so a restart keeps it); a track whose area per layer is under
    `baseline_share` of that window's median is held back, unless its volume passes
    `absolute_volume_mm3`.
    A held track may alarm on a later layer, once it stands out or grows past that.
    """
    usual: dict[str, float] = {}
    for cls in cfg.classes:
        rule_id = TRACK_PREFIX + cls
        rs = rules.setdefault(rule_id, RuleState())
        if len(rs.history) >= cfg.baseline_learn_layers:
            usual[cls] = statistics.median(rs.history)
        c = on.classes.get(cls)
        rs.history.append(c.area_mm2 if c is not None else 0.0)
        del rs.history[:-cfg.baseline_window]
        touched.append(rule_id)
    if not cfg.baseline_share or not change.alarms:
        return change
    alarms = []
    for t in change.alarms:
        per_layer_mm2 = t.volume_mm3 / thickness / max(t.layers, 1)
        # A growing track is not the usual look: the build's usual area of its class is made
        # of the same defects (a build that swells often), which would hide a new one.
        if (t.volume_mm3 <= cfg.absolute_volume_mm3 and not growing(t, cfg)
                and t.class_name in usual
                and per_layer_mm2 < cfg.baseline_share * usual[t.class_name]):
            t.alarmed = False  # judged again on the next layer it grows in
            continue
        alarms.append(t)
    return dataclasses.replace(change, alarms=alarms)


def _box_centre(boxes: Sequence[tuple[int, int, int, int]]) -> tuple[float, float] | None:
    if not boxes:
        return None
    return ((min(b[0] for b in boxes) + max(b[2] for b in boxes)) / 2,
            (min(b[1] for b in boxes) + max(b[3] for b in boxes)) / 2)


def track_events(key: BuildKey, layer: int, change: TrackChange, live: Iterable[Track], *,
                 cfg: TracksConfig, in_grace: bool, muted: Callable[[str], bool],
                 capped: bool, locate: Callable[[float, float], int | None] | None
                 ) -> list[AlarmEvent]:
    """A layer's track alarms: tracks that reached the limits open one, ended ones clear.

    Args:
        live: the build's live tracks (after the layer's update).
        in_grace: the layer is in the build's grace layers (no track alarm opens).
        muted: class -> whether the build's class is muted.
        capped: the model is not trusted on this camera (warning, no hook).
        locate: image (x, y) -> the nominal part there, for tracks.one_per_part.
    """
    events: list[AlarmEvent] = []
    sev = "warning" if capped else cfg.severity

    def where(t: Track) -> tuple[float, float]:
        return _box_centre(t.boxes) or ((t.x0 + t.x1) / 2, (t.y0 + t.y1) / 2)

    def group(t: Track) -> tuple[str, int | None]:
        return (t.class_name, locate(*where(t)) if locate is not None else None)

    fresh = {id(t) for t in change.alarms}
    # (class, part) groups with a track alarm open: one alarm per class and part at a time
    busy = ({group(t) for t in live if t.alarmed and id(t) not in fresh}
            if cfg.one_per_part else set())
    for t in change.alarms:
        g = group(t) if cfg.one_per_part else None
        if in_grace or muted(t.class_name) or g in busy:
            t.alarmed = False  # may still alarm once the grace is over, unmuted or free
            continue
        if g is not None:
            busy.add(g)
        past = crossed(t, cfg)
        assert past is not None  # update() put it in change.alarms for crossing one
        value, limit, unit = past
        events.append(AlarmEvent(
            "open", key.printer, key.build, layer, t.class_name,
            TRACK_PREFIX + t.class_name, sev, value, limit, track=t.number,
            model_trusted=not capped, unit=unit, position_px=where(t)))
    for t in change.ended:
        if t.alarmed:
            events.append(AlarmEvent(
                "clear", key.printer, key.build, layer, t.class_name,
                TRACK_PREFIX + t.class_name, sev, float(t.layers),
                float(cfg.alarm_layers), track=t.number, model_trusted=not capped,
                unit="layers"))
    return events
