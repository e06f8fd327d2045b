"""Stall alarms: a build whose next layer is overdue (no new layer file).

The limit is ``factor`` times the median time between the build's recent layers (at least
``min_s``, once ``min_layers`` have arrived); a build idle for longer than ``active_s`` is
no longer watched. The next layer's arrival clears the alarm.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable, Mapping
from typing import Literal

from monitor.alarms.lifecycle import BuildState
from monitor.config import StallConfig
from monitor.records import AlarmEvent, BuildKey

RULE_STALL = "stall"


def stall_event(action: Literal["open", "clear"], key: BuildKey, st: BuildState,
                value: float, limit: float, *, severity: str) -> AlarmEvent:
    """A stall alarm's transition, at the build's last layer that arrived."""
    return AlarmEvent(action, key.printer, key.build, st.last_arrival_layer or 0, "",
                      RULE_STALL, severity, value, limit, unit="s")


def stall_limit(cfg: StallConfig, st: BuildState) -> float | None:
    """Seconds without a layer after which the build is stalled; None if unknown yet."""
    if len(st.arrivals) < cfg.min_layers:
        return None
    times = list(st.arrivals)
    median = statistics.median(b - a for a, b in itertools.pairwise(times))
    return max(cfg.min_s, cfg.factor * median)


def check_stalls(cfg: StallConfig, builds: Mapping[BuildKey, BuildState], now: float, *,
                 muted: Callable[[BuildKey], bool]) -> list[AlarmEvent]:
    """Open a stall alarm for each active build whose next layer is overdue."""
    if not cfg.enabled:
        return []
    events: list[AlarmEvent] = []
    for key, st in builds.items():
        if st.stall_open or st.finished or not st.arrivals:
            continue
        idle = now - st.arrivals[-1]
        limit = stall_limit(cfg, st)
        if limit is None or idle <= limit or idle > cfg.active_s:
            continue
        if muted(key):
            continue
        st.stall_open = True
        events.append(stall_event("open", key, st, idle, limit, severity=cfg.severity))
    return events
