"""The alarm engine: per-layer statistics and defect tracks -> alarm transitions.

Lifecycle of an alarm: open -> acknowledged -> cleared. Per build and rule:

"Layers" count the layers received in the build, not layer numbers: a build numbered 10,
20, 30 (or with a layer the camera missed) has consecutive layers 10 and 20, so streaks,
``grace_layers``, ``cooldown_layers`` and track gaps follow the layers that arrived.

* A threshold rule's condition must hold for ``consecutive`` layers in a row (its streak)
  before it opens an alarm; layers in the build's first ``grace_layers`` are not checked.
* While an alarm of the rule is open, the rule opens no other. Acknowledging it resets the
  streak, so a condition that goes on opens a new alarm only after ``consecutive`` more layers
  (and the cooldown), not at once.
* ``cooldown_layers`` after an alarm opened, the rule opens no new one (no flapping).
* The first layer where the condition no longer holds clears the rule's open and acknowledged
  alarms.
* A muted build (or class of a build) opens no alarms; open ones stay until cleared.

Track alarms (a defect stacking through layers), part alarms (a nominal part missing or
printed past its outline, per part: rule ids ``part_missing.part7``, ``part_excess.part7``)
and stall alarms (no new layer) follow the same lifecycle. The engine has one owner, the
daemon's analyser thread: layers, stall checks, acks, mutes and reloads reach it in order
through the analyser's queue, so it takes no lock.
Its state is persisted with each layer.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import statistics
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from monitor.alarms.tracks import BuildTracks
from monitor.config import AlarmRule, AlarmsConfig
from monitor.errors import ConfigError
from monitor.records import (
    AlarmEvent,
    BuildKey,
    EngineState,
    LayerAlarms,
    PartRecord,
    RuleState,
    Track,
    TrackChange,
)
from monitor.vision.stats import AREA_ONLY_METRICS, NO_DEFECT, LayerStats

RULE_STALL = "stall"
RULE_TEST = "test"
TRACK_PREFIX = "track."
PART_MISSING = "part_missing"
PART_EXCESS = "part_excess"
PART_RULES = (PART_MISSING, PART_EXCESS)


def part_rule_id(kind: str, part: int) -> str:
    """The rule id of a part alarm, e.g. part_missing.part7 (its state is kept under it)."""
    return f"{kind}.part{part}"


def _part_of(rule_id: str) -> tuple[str, int] | None:
    kind, sep, rest = rule_id.partition(".part")
    if not sep or kind not in PART_RULES or not rest.isdigit():
        return None
    return kind, int(rest)

log = logging.getLogger(__name__)


@dataclass
class BuildState:
    first_layer: int | None = None
    last_layer: int | None = None  # last layer the rules saw
    rules: dict[str, RuleState] = field(default_factory=dict)
    tracks: BuildTracks | None = None
    arrivals: deque[float] = field(default_factory=lambda: deque(maxlen=21))
    last_arrival_layer: int | None = None
    stall_open: bool = False
    finished: bool = False  # a newer build started on the printer
    # Layer numbers the rules saw, ascending: distances between layers are counted in them.
    seen: list[int] = field(default_factory=list)
    jump_logged: bool = False

    def steps(self, a: int, b: int) -> int:
        """Layers received after layer a up to layer b; layer numbers where a predates what
        this build's history holds."""
        if not self.seen or a < self.seen[0]:
            return b - a
        return bisect.bisect_right(self.seen, b) - bisect.bisect_right(self.seen, a)


@dataclass(frozen=True)
class _Cond:
    """A rule's condition on one layer, as the lifecycle sees it."""

    rule_id: str
    class_name: str  # "" for part alarms
    severity: str
    value: float
    threshold: float
    holds: bool
    consecutive: int
    cooldown: int
    part: int | None = None
    unit: str = ""
    position_px: tuple[float, float] | None = None


UNITS = {"area_fraction": "fraction", "area_mm2": "mm²", "components": "count",
         "largest_component_mm2": "mm²"}


def _scope(rule: AlarmRule, stats: LayerStats, regions: Mapping[str, LayerStats],
           parts_zone: LayerStats | None = None) -> LayerStats | None:
    if rule.region:
        return regions.get(rule.region)
    if rule.scope == "parts" and parts_zone is not None and rule.class_name != NO_DEFECT:
        return parts_zone
    return stats


def largest_at(class_name: str, *stats: LayerStats | None) -> tuple[float, float] | None:
    """Centroid (x, y) in pixels of the class's largest component in the first statistics
    that list one."""
    for st in stats:
        c = st.classes.get(class_name) if st is not None else None
        if c is not None and c.component_list:
            big = max(c.component_list, key=lambda k: k.area_px)
            return (big.cx, big.cy)
    return None


def metric_value(rule: AlarmRule, stats: LayerStats, regions: Mapping[str, LayerStats],
                 parts_zone: LayerStats | None = None) -> float | None:
    """The rule's metric: in its region, else on and around the parts (scope "parts", when
    the layer has a nominal slice), else over the whole layer."""
    if rule.region:
        st = regions.get(rule.region)
    elif rule.scope == "parts" and parts_zone is not None and rule.class_name != NO_DEFECT:
        st = parts_zone
    else:
        st = stats
    if st is None:
        return None
    c = st.classes.get(rule.class_name)
    return None if c is None else float(getattr(c, rule.metric))


def relative_limit(rule: AlarmRule, history: Sequence[float]) -> float | None:
    """A relative rule's limit from its baseline window; None while it is still learning.

    limit = max(threshold, m * factor, m + min_delta, m + mad_k * 1.4826 * MAD), where m is
    the median of the window and MAD the median absolute deviation from it.
    """
    if len(history) < rule.learn_layers:
        return None
    m = statistics.median(history)
    limit = max(rule.floor, m * rule.factor, m + rule.min_delta)
    if rule.mad_k:
        mad = statistics.median(abs(v - m) for v in history)
        limit = max(limit, m + rule.mad_k * 1.4826 * mad)
    return limit


def _box_centre(boxes: Sequence[tuple[int, int, int, int]]) -> tuple[float, float] | None:
    if not boxes:
        return None
    return ((min(b[0] for b in boxes) + max(b[2] for b in boxes)) / 2,
            (min(b[1] for b in boxes) + max(b[3] for b in boxes)) / 2)


def _learn(rule: AlarmRule, rs: RuleState, value: float) -> None:
    rs.history.append(value)
    del rs.history[:-rule.window]


class AlarmEngine:
    """Rules, tracks and stall checks for every build; used by one thread (no lock)."""

    def __init__(
        self,
        cfg: AlarmsConfig,
        *,
        class_names: Sequence[str],
        part_regions: Sequence[str] = (),
        pixel_size_mm: float = 0.1,
        layer_thickness_mm: float = 0.05,
        cameras: Mapping[str, tuple[float, float]] | None = None,
    ) -> None:
        self.class_names = tuple(class_names)
        self.part_regions = tuple(part_regions)
        self._check(cfg)
        self.cfg = cfg
        self.pixel_size_mm = pixel_size_mm
        self.layer_thickness_mm = layer_thickness_mm
        # printer -> (pixel_size_mm, layer_thickness_mm) where a fleet's cameras differ
        self.cameras = dict(cameras or {})
        self._builds: dict[BuildKey, BuildState] = {}
        # Printers whose camera the weights were not adapted to (monitor.alarms.trust): set
        # by the daemon when weights load, read by the analyser thread.
        self.untrusted: frozenset[str] = frozenset()
        self._mutes: set[tuple[BuildKey, str | None]] = set()

    def _check(self, cfg: AlarmsConfig) -> None:
        class_names, part_regions = self.class_names, self.part_regions
        for i, r in enumerate(cfg.rules):
            if r.class_name not in class_names:
                raise ConfigError(f"alarms.rules[{i}].class: unknown class {r.class_name!r}; "
                                  f"the weights' classes are {', '.join(class_names)}")
            if r.class_name == NO_DEFECT and r.metric not in AREA_ONLY_METRICS:
                raise ConfigError(f"alarms.rules[{i}].metric: {NO_DEFECT} has area statistics "
                                  f"only ({', '.join(AREA_ONLY_METRICS)}), not {r.metric!r}")
            if r.region and r.region not in part_regions:
                raise ConfigError(f"alarms.rules[{i}].region: no part region named "
                                  f"{r.region!r} in [[regions]]")
        for c in cfg.tracks.classes:
            if c == NO_DEFECT:
                raise ConfigError(f"alarms.tracks.classes: {NO_DEFECT} is not tracked (its "
                                  f"components are not counted)")
            if c not in class_names:
                raise ConfigError(f"alarms.tracks.classes: unknown class {c!r}; the weights' "
                                  f"classes are {', '.join(class_names)}")

    def reload(self, cfg: AlarmsConfig) -> None:
        """New rules and limits (SIGHUP); streaks of rules that keep their id carry on, and
        live tracks keep going under the new track limits."""
        self._check(cfg)
        self.cfg = cfg
        for st in self._builds.values():
            if st.tracks is not None:
                st.tracks.cfg = cfg.tracks

    @property
    def wants_parts_zone(self) -> bool:
        """Whether a rule counts defects on and around the parts (scope "parts")."""
        return any(r.scope == "parts" and not r.region and r.class_name != NO_DEFECT
                   for r in self.cfg.rules)

    # ------------------------------------------------------------ state

    def known(self, key: BuildKey) -> bool:
        return key in self._builds

    def restore_build(self, key: BuildKey, state: EngineState) -> None:
        """Adopt a build's state from the database (after a restart)."""
        b = BuildState(first_layer=state.first_layer, last_layer=state.last_evaluated,
                       stall_open=state.stall_open, seen=sorted(state.evaluated_layers))
        b.rules = {k: RuleState(**v.as_row()) for k, v in state.rules.items()}
        b.tracks = self._new_tracks(key.printer, state.next_track)
        b.tracks.adopt(state.tracks)
        b.arrivals.extend(state.arrivals)
        b.last_arrival_layer = state.last_evaluated
        self._builds[key] = b

    def mute(self, key: BuildKey, class_name: str | None) -> None:
        self._mutes.add((key, class_name))

    def unmute(self, key: BuildKey, class_name: str | None) -> None:
        self._mutes.discard((key, class_name))

    def muted(self, key: BuildKey, class_name: str | None) -> bool:
        return (key, None) in self._mutes or (class_name is not None
                                              and (key, class_name) in self._mutes)

    def acknowledge(self, key: BuildKey, rule: str) -> dict[str, Any] | None:
        """An operator acknowledged the rule's open alarm: reset its streak.

        Returns the rule's new state to persist (None for rules without state).
        """
        st = self._builds.get(key)
        if st is None or rule not in st.rules:
            return None
        rs = st.rules[rule]
        rs.open = False
        rs.streak = 0
        return rs.as_row()

    def _new_tracks(self, printer: str, next_number: int = 1) -> BuildTracks:
        px, thickness = self.cameras.get(printer, (self.pixel_size_mm, self.layer_thickness_mm))
        return BuildTracks(self.cfg.tracks, pixel_size_mm=px, layer_thickness_mm=thickness,
                           next_number=next_number)

    def _build(self, key: BuildKey) -> BuildState:
        st = self._builds.get(key)
        if st is None:
            st = self._builds[key] = BuildState(tracks=self._new_tracks(key.printer))
        return st

    # ------------------------------------------------------------ layers

    def arrival(self, key: BuildKey, layer: int, at: float) -> list[AlarmEvent]:
        """A layer file of the build arrived (ok or not): feeds the stall check and clears a
        stall alarm. A build newer than the printer's others finishes them."""
        events: list[AlarmEvent] = []
        st = self._build(key)
        if st.last_arrival_layer is None or layer > st.last_arrival_layer:
            st.arrivals.append(at)
            st.last_arrival_layer = layer
        st.finished = False
        if st.stall_open:
            st.stall_open = False
            events.append(self._stall_event("clear", key, st, 0.0, 0.0))
        for other, ost in self._builds.items():
            newer = bool(ost.arrivals) and ost.arrivals[-1] < at
            if other.printer == key.printer and other != key and not ost.finished and newer:
                ost.finished = True
                if ost.stall_open:
                    ost.stall_open = False
                    events.append(self._stall_event("clear", other, ost, 0.0, 0.0))
        return events

    def evaluate(
        self, key: BuildKey, layer: int, stats: LayerStats,
        regions: Mapping[str, LayerStats] | None = None, *,
        parts: Sequence[PartRecord] | None = None, parts_zone: LayerStats | None = None,
        locate: Callable[[float, float], int | None] | None = None,
    ) -> LayerAlarms:
        """Check the rules, parts and tracks on one layer of a build.

        Args:
            parts: the layer's parts against its nominal slice; None without a slice (part
                alarms keep their state).
            parts_zone: statistics of the masks on and around the parts, for rules of
                scope "parts"; None: they use the whole layer.
            locate: image (x, y) -> the nominal part there (None off the parts); without
                it every place is "off the parts" (tracks.one_per_part groups by it).
        """
        regions = regions or {}
        st = self._build(key)
        if st.last_layer is not None and layer <= st.last_layer:
            return LayerAlarms([], {}, st.first_layer, None, evaluated=False)
        if st.first_layer is None or layer < st.first_layer:
            st.first_layer = layer
        if st.last_layer is not None and layer - st.last_layer > 1 and not st.jump_logged:
            st.jump_logged = True
            log.info("build %s: layer numbers jump from %d to %d; alarm persistence, cooldown, "
                     "grace and tracks count the layers received, not the numbers", key.build,
                     st.last_layer, layer)
        st.last_layer = layer
        st.seen.append(layer)
        events: list[AlarmEvent] = []
        for rule in self.cfg.rules:
            events += self._check_rule(key, st, rule, layer, stats, regions, parts_zone)
        touched: list[str] = []
        if parts is not None and self.cfg.parts.enabled:
            events += self._check_parts(key, st, layer, parts, touched)
        change = None
        if self.cfg.tracks.classes:
            assert st.tracks is not None
            change = st.tracks.update(layer, stats, steps=st.steps)
            events += self._track_events(key, st, layer, change, locate)
        states = {r: st.rules[r].as_row() for r in [*(r.rule_id for r in self.cfg.rules),
                                                     *touched]}
        return LayerAlarms(events, states, st.first_layer, change, evaluated=True)

    def _in_grace(self, st: BuildState, layer: int, grace: int | None) -> bool:
        g = self.cfg.grace_layers if grace is None else grace
        return st.first_layer is not None and st.steps(st.first_layer, layer) < g

    def _check_rule(self, key: BuildKey, st: BuildState, rule: AlarmRule, layer: int,
                    stats: LayerStats, regions: Mapping[str, LayerStats],
                    parts_zone: LayerStats | None) -> list[AlarmEvent]:
        value = metric_value(rule, stats, regions, parts_zone)
        rs = st.rules.setdefault(rule.rule_id, RuleState())
        if value is None:
            rs.streak = 0
            return []
        limit = relative_limit(rule, rs.history) if rule.relative else rule.floor
        if self._in_grace(st, layer, rule.grace_layers) or limit is None:
            rs.streak = 0
            if rule.relative:  # grace layers and learning layers teach the baseline
                _learn(rule, rs, value)
            return []
        holds = value > limit
        where = largest_at(rule.class_name, _scope(rule, stats, regions, parts_zone), stats)
        events = self._step(key, st, layer, _Cond(
            rule.rule_id, rule.class_name, rule.severity, value, limit, holds,
            rule.consecutive, rule.cooldown_layers, unit=UNITS[rule.metric],
            position_px=where if rule.class_name != NO_DEFECT else None))
        # A value above the limit is not learnt (a defect must not raise its own baseline)
        # unless it has held for a whole window: then it is the build's new normal.
        if rule.relative and (not holds or rs.streak >= rule.window):
            _learn(rule, rs, value)
        return events

    def _step(self, key: BuildKey, st: BuildState, layer: int, c: _Cond) -> list[AlarmEvent]:
        """One layer of a rule's lifecycle: streak, open (persistence, cooldown, mute), clear."""
        rs = st.rules.setdefault(c.rule_id, RuleState())
        rs.streak = rs.streak + 1 if c.holds else 0

        # Defect-class alarms of a model not adapted to this camera: warning, no hook.
        capped = bool(c.class_name) and key.printer in self.untrusted

        def event(action: Literal["open", "clear"]) -> AlarmEvent:
            return AlarmEvent(action, key.printer, key.build, layer, c.class_name, c.rule_id,
                              "warning" if capped else c.severity, c.value, c.threshold,
                              part=c.part, model_trusted=not capped, unit=c.unit,
                              position_px=c.position_px)

        if not c.holds:
            if rs.active:
                rs.active = rs.open = False
                return [event("clear")]
            return []
        cooled = (rs.last_open_layer is None
                  or st.steps(rs.last_open_layer, layer) >= c.cooldown)
        if (not rs.open and rs.streak >= c.consecutive and cooled
                and not self.muted(key, c.class_name or None)):
            rs.open = rs.active = True
            rs.last_open_layer = layer
            return [event("open")]
        return []

    def _check_parts(self, key: BuildKey, st: BuildState, layer: int,
                     parts: Sequence[PartRecord], touched: list[str]) -> list[AlarmEvent]:
        """part_missing and part_excess for each part of the layer's slice. A part that is
        not in this layer's slice (it ended, or has not begun) clears its alarms."""
        cfg = self.cfg.parts
        events: list[AlarmEvent] = []
        in_grace = self._in_grace(st, layer, cfg.grace_layers)
        present = {p.id for p in parts}
        for p in parts:
            for c in (
                _Cond(part_rule_id(PART_MISSING, p.id), "", cfg.missing_severity,
                      p.printed_fraction, cfg.missing_fraction,
                      p.printed_fraction < cfg.missing_fraction, cfg.missing_layers,
                      cfg.cooldown_layers, p.id, unit="fraction"),
                _Cond(part_rule_id(PART_EXCESS, p.id), "", cfg.excess_severity,
                      p.excess_fraction, cfg.excess_fraction,
                      p.excess_fraction > cfg.excess_fraction, cfg.excess_layers,
                      cfg.cooldown_layers, p.id, unit="fraction"),
            ):
                touched.append(c.rule_id)
                if in_grace:
                    st.rules.setdefault(c.rule_id, RuleState()).streak = 0
                else:
                    events += self._step(key, st, layer, c)
        for rule_id, rs in list(st.rules.items()):
            which = _part_of(rule_id)
            if which is None or which[1] in present or not (rs.streak or rs.active):
                continue
            touched.append(rule_id)
            kind, pid = which
            limit = cfg.missing_fraction if kind == PART_MISSING else cfg.excess_fraction
            sev = cfg.missing_severity if kind == PART_MISSING else cfg.excess_severity
            events += self._step(key, st, layer, _Cond(rule_id, "", sev, 0.0, limit, False, 1,
                                                       0, pid, unit="fraction"))
        return events

    def _track_events(self, key: BuildKey, st: BuildState, layer: int, change: TrackChange,
                      locate: Callable[[float, float], int | None] | None
                      ) -> list[AlarmEvent]:
        cfg = self.cfg.tracks
        events: list[AlarmEvent] = []
        capped = key.printer in self.untrusted
        sev = "warning" if capped else cfg.severity

        def where(t: Track) -> tuple[float, float]:
            return _box_centre(t.boxes) or ((t.x0 + t.x1) / 2, (t.y0 + t.y1) / 2)

        def group(t: Track) -> tuple[str, int | None]:
            return (t.class_name, locate(*where(t)) if locate is not None else None)

        fresh = {id(t) for t in change.alarms}
        assert st.tracks is not None
        # (class, part) groups with a track alarm open: one alarm per class and part at a time
        busy = ({group(t) for t in st.tracks.live if t.alarmed and id(t) not in fresh}
                if cfg.one_per_part else set())
        for t in change.alarms:
            g = group(t) if cfg.one_per_part else None
            if (self._in_grace(st, layer, None) or self.muted(key, t.class_name)
                    or g in busy):
                t.alarmed = False  # may still alarm once the grace is over, unmuted or free
                continue
            if g is not None:
                busy.add(g)
            by_layers = t.layers >= cfg.alarm_layers
            events.append(AlarmEvent(
                "open", key.printer, key.build, layer, t.class_name,
                TRACK_PREFIX + t.class_name, sev,
                float(t.layers) if by_layers else t.volume_mm3,
                float(cfg.alarm_layers) if by_layers else cfg.alarm_volume_mm3, track=t.number,
                model_trusted=not capped, unit="layers" if by_layers else "mm³",
                position_px=where(t)))
        for t in change.ended:
            if t.alarmed:
                events.append(AlarmEvent(
                    "clear", key.printer, key.build, layer, t.class_name,
                    TRACK_PREFIX + t.class_name, sev, float(t.layers),
                    float(cfg.alarm_layers), track=t.number, model_trusted=not capped,
                    unit="layers"))
        return events

    def last_arrivals(self) -> dict[str, float]:
        """When the last layer of each active build arrived ("printer/build" when a printer
        is named)."""
        return {(f"{k.printer}/{k.build}" if k.printer else k.build): st.arrivals[-1]
                for k, st in self._builds.items() if st.arrivals and not st.finished}

    # ------------------------------------------------------------ stall

    def _stall_event(self, action: Literal["open", "clear"], key: BuildKey, st: BuildState,
                     value: float, limit: float) -> AlarmEvent:
        return AlarmEvent(action, key.printer, key.build, st.last_arrival_layer or 0, "",
                          RULE_STALL, self.cfg.stall.severity, value, limit, unit="s")

    def stall_limit(self, st: BuildState) -> float | None:
        """Seconds without a layer after which the build is stalled; None if unknown yet."""
        cfg = self.cfg.stall
        if len(st.arrivals) < cfg.min_layers:
            return None
        times = list(st.arrivals)
        median = statistics.median(b - a for a, b in itertools.pairwise(times))
        return max(cfg.min_s, cfg.factor * median)

    def check_stalls(self, now: float) -> list[AlarmEvent]:
        """Open a stall alarm for each active build whose next layer is overdue."""
        cfg = self.cfg.stall
        if not cfg.enabled:
            return []
        events: list[AlarmEvent] = []
        for key, st in self._builds.items():
            if st.stall_open or st.finished or not st.arrivals:
                continue
            idle = now - st.arrivals[-1]
            limit = self.stall_limit(st)
            if limit is None or idle <= limit or idle > cfg.active_s:
                continue
            if self.muted(key, None):
                continue
            st.stall_open = True
            events.append(self._stall_event("open", key, st, idle, limit))
        return events
