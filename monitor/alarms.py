"""Alarm rules: per-layer statistics -> alarm transitions (open, cleared).

This first rule opens an alarm when a class covers more than a set fraction of a layer and
clears it on the first layer below the threshold; while it is open the same condition does
not raise it again, so a persistent defect gives one alarm, not one per layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from monitor.errors import ConfigError
from monitor.stats import LayerStats

RULE_AREA_FRACTION = "area_fraction"


@dataclass(frozen=True)
class AlarmEvent:
    action: Literal["open", "clear"]
    printer: str
    build: str
    layer: int
    class_name: str
    rule: str
    severity: str
    value: float
    threshold: float


class AreaFractionRules:
    """One threshold per class on the fraction of the layer it covers."""

    def __init__(
        self, thresholds: Mapping[str, float], *, severity: str, class_names: Sequence[str]
    ) -> None:
        unknown = set(thresholds) - set(class_names)
        if unknown:
            raise ConfigError(f"alarms.area_fraction.{sorted(unknown)[0]}: unknown class; the "
                              f"weights' classes are {', '.join(class_names)}")
        self.thresholds = dict(thresholds)
        self.severity = severity
        self._open: set[tuple[str, str, str]] = set()

    def restore(self, open_alarms: Iterable[tuple[str, str, str, str]]) -> None:
        """Adopt alarms left open by a previous run: (printer, build, class, rule)."""
        for printer, build, cls, rule in open_alarms:
            if rule == RULE_AREA_FRACTION:
                self._open.add((printer, build, cls))

    def evaluate(self, printer: str, build: str, layer: int, stats: LayerStats) -> list[AlarmEvent]:
        events: list[AlarmEvent] = []
        for cls, limit in self.thresholds.items():
            c = stats.classes.get(cls)
            if c is None:
                continue
            key = (printer, build, cls)
            above = c.area_fraction > limit
            if above == (key in self._open):
                continue
            action: Literal["open", "clear"] = "open" if above else "clear"
            (self._open.add if above else self._open.discard)(key)
            events.append(AlarmEvent(action, printer, build, layer, cls, RULE_AREA_FRACTION,
                                     self.severity, c.area_fraction, limit))
        return events
