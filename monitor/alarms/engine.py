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

The engine keeps the builds' state (monitor.alarms.lifecycle) and calls the checks:
threshold rules (monitor.alarms.rules), part alarms (.parts), track alarms (.tracks) and
stalls (.stall).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from monitor.alarms.lifecycle import BuildState
from monitor.alarms.parts import check_parts
from monitor.alarms.rules import check_rule
from monitor.alarms.stall import check_stalls, stall_event, stall_limit
from monitor.alarms.tracks import BuildTracks, track_events, usual_look
from monitor.config import AlarmsConfig
from monitor.errors import ConfigError
from monitor.records import AlarmEvent, BuildKey, EngineState, LayerAlarms, PartRecord, RuleState
from monitor.vision.stats import AREA_ONLY_METRICS, NO_DEFECT, LayerStats

RULE_TEST = "test"

log = logging.getLogger(__name__)


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
        tracks = self.cfg.tracks
        return (bool(tracks.classes) and tracks.scope == "parts") or any(
            r.scope == "parts" and not r.region and r.class_name != NO_DEFECT
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
            events += check_rule(key, st, rule, layer, stats, regions, parts_zone,
                                 grace_layers=self._grace(rule.grace_layers),
                                 untrusted=self.untrusted,
                                 muted=self.muted(key, rule.class_name or None))
        touched: list[str] = []
        if parts is not None and self.cfg.parts.enabled:
            events += check_parts(key, st, layer, parts, touched, cfg=self.cfg.parts,
                                  grace_layers=self._grace(self.cfg.parts.grace_layers),
                                  untrusted=self.untrusted, muted=self.muted(key, None))
        change = None
        if self.cfg.tracks.classes:
            assert st.tracks is not None
            # a defect stacks inside a part: off the parts, the camera's own look (walls,
            # ghosts, glints) stacks from layer to layer too
            on = parts_zone if parts_zone is not None and self.cfg.tracks.scope == "parts" \
                else stats
            change = st.tracks.update(layer, on, steps=st.steps)
            change = usual_look(change, st.rules, on, self.cfg.tracks, touched,
                                thickness=st.tracks.thickness)
            events += track_events(
                key, layer, change, st.tracks.live, cfg=self.cfg.tracks,
                in_grace=st.in_grace(layer, self.cfg.grace_layers),
                muted=lambda c: self.muted(key, c), capped=key.printer in self.untrusted,
                locate=locate)
        states = {r: st.rules[r].as_row() for r in [*(r.rule_id for r in self.cfg.rules),
                                                     *touched]}
        return LayerAlarms(events, states, st.first_layer, change, evaluated=True)

    def _grace(self, grace: int | None) -> int:
        """A rule's grace layers, else the engine's."""
        return self.cfg.grace_layers if grace is None else grace

    def last_arrivals(self) -> dict[str, float]:
        """When the last layer of each active build arrived ("printer/build" when a printer
        is named)."""
        return {(f"{k.printer}/{k.build}" if k.printer else k.build): st.arrivals[-1]
                for k, st in self._builds.items() if st.arrivals and not st.finished}

    # ------------------------------------------------------------ stall

    def _stall_event(self, action: Literal["open", "clear"], key: BuildKey, st: BuildState,
                     value: float, limit: float) -> AlarmEvent:
        return stall_event(action, key, st, value, limit, severity=self.cfg.stall.severity)

    def stall_limit(self, st: BuildState) -> float | None:
        """Seconds without a layer after which the build is stalled; None if unknown yet."""
        return stall_limit(self.cfg.stall, st)

    def check_stalls(self, now: float) -> list[AlarmEvent]:
        """Open a stall alarm for each active build whose next layer is overdue."""
        return check_stalls(self.cfg.stall, self._builds, now,
                            muted=lambda key: self.muted(key, None))
