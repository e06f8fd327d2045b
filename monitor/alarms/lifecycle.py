"""A build's alarm state and one layer of a rule's lifecycle: streak, open, clear.

Threshold rules and part alarms go through ``step``; the lifecycle and how layers are
counted are described in monitor.alarms.engine.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from monitor.alarms.tracks import BuildTracks
from monitor.records import AlarmEvent, BuildKey, RuleState


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

    def in_grace(self, layer: int, grace: int) -> bool:
        """Whether the layer is among the build's first `grace` layers (not checked)."""
        return self.first_layer is not None and self.steps(self.first_layer, layer) < grace


@dataclass(frozen=True)
class Cond:
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


def step(key: BuildKey, st: BuildState, layer: int, c: Cond, *, untrusted: frozenset[str],
         muted: bool) -> list[AlarmEvent]:
    """One layer of a rule's lifecycle: streak, open (persistence, cooldown, mute), clear.

    Args:
        untrusted: printers whose camera the weights were not adapted to.
        muted: whether the build (or the condition's class of it) is muted.
    """
    rs = st.rules.setdefault(c.rule_id, RuleState())
    rs.streak = rs.streak + 1 if c.holds else 0

    # Defect-class alarms of a model not adapted to this camera: warning, no hook.
    capped = bool(c.class_name) and key.printer in untrusted

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
    if not rs.open and rs.streak >= c.consecutive and cooled and not muted:
        rs.open = rs.active = True
        rs.last_open_layer = layer
        return [event("open")]
    return []
